"""The whole run on a tiny model: exit codes, --json, promotion only on PASS, baseline cache,
matrix runs, and resume after SIGKILL inside each stage. Real ModelOpt, lm-eval and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Loose margins so the tiny model's tiny sample can PASS; tests tighten them to force failures.
LOOSE_GATE = {
    "confidence": 0.9,
    "anomaly_margin": 10.0,
    "metrics": {
        "qg_ppl/word_perplexity": {"max_rel_drop": 5.0},
        "qg_cloze/acc": {"max_abs_drop": 1.0},
        "qg_nextsent/acc": {"max_abs_drop": 1.0},
    },
    "golden": {"max_mean_kl": 50.0},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    ws = tmp_path_factory.mktemp("ws")
    base = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 12, "golden": {"max_new_tokens": 6}},
        "gate": LOOSE_GATE,
        "promotion": {"registered_model": "tiny-llama"},
        "tracking": {"uri": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "experiment": "qg-test"},
        "output_dir": str(ws / "runs"),
    }
    (ws / "_base.yaml").write_text(yaml.safe_dump(base))
    for name, fmt in [("fp8", "fp8"), ("int8_sq", "int8_sq"), ("int4_awq", "int4_awq")]:
        (ws / f"{name}.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", "name": name, "quantization": {"format": fmt}}))
    return ws


def quantgate(ws: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    # Each workspace has its own quantgate cache, so its first run really evaluates its baseline
    # whatever other test files ran on the same tiny model before.
    full_env = {**os.environ, "QUANTGATE_CACHE": str(ws / "qg_cache"), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=ws, capture_output=True, text=True, env=full_env, timeout=timeout)


def alias_version(ws: Path, alias: str) -> str | None:
    from quantgate.tracking import alias_version as av

    return av("tiny-llama", alias, tracking_uri=f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


def versions(ws: Path) -> list[str]:
    from quantgate.tracking import _mlflow_client

    client = _mlflow_client(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    return sorted(str(v.version) for v in client.search_model_versions("name='tiny-llama'"))


def test_run_passes_promotes_and_prints_one_json_object(workspace):
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--junit-xml", "gate.xml", "--summary-md", "gate.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout holds exactly one JSON object
    assert out["verdict"] == "PASS" and out["exit_code"] == 0
    assert out["registered_version"] == "1" and out["promoted"] is True
    assert out["mlflow_run_id"]
    assert "baseline: cache miss" in proc.stderr
    assert alias_version(workspace, "production") == "1"
    run_dir = Path(out["run_dir"]) if Path(out["run_dir"]).is_absolute() else workspace / out["run_dir"]
    for name in ("verdict.json", "items.jsonl", "golden_diff.html", "checkpoint/hf_quant_config.json", "manifest.json"):
        assert (run_dir / name).is_file(), name
    import xml.etree.ElementTree as ET

    suites = ET.parse(workspace / "gate.xml").getroot()
    assert len(suites.findall(".//testcase")) >= 4
    assert "PASS" in (workspace / "gate.md").read_text()
    # Stage timings were logged.
    assert out["timings"]["calibrate"] > 0 and out["timings"]["evaluate"] > 0


def test_impossible_threshold_fails_and_leaves_production_alone(workspace):
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--set", "gate.metrics.qg_ppl/word_perplexity.max_rel_drop=0.0", "--set", "gate.golden.min_exact_match=1.01")
    assert proc.returncode == 2, proc.stderr[-2000:]  # 1.01 is not a rate: bad input, nothing runs
    assert "gate.golden.min_exact_match" in proc.stderr
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--set", "gate.golden.min_top1_agreement=1.0", "--set", "gate.golden.max_mean_kl=0.0")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["verdict"] == "REGRESSION", proc.stderr[-2000:]
    assert "baseline_evaluate: start" not in proc.stderr  # the baseline was evaluated once
    assert "resume: evaluate already complete" in proc.stderr  # only the gate re-judged the stored results
    assert out["promoted"] is False
    assert alias_version(workspace, "production") == "1"
    # Same artifact (only the gate changed): its existing version, not a new one; not promoted again.
    assert out["registered_version"] == "1" and alias_version(workspace, "candidate") == "1"


def test_regate_stored_results_with_other_thresholds(workspace):
    run_dirs = sorted((workspace / "runs").glob("fp8-*"))
    proc = quantgate(workspace, "gate", str(run_dirs[0]), "--json", "--set", "gate.golden.max_mean_kl=0.0", "--set", "gate.golden.min_top1_agreement=1.0")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["decision"] == "REGRESSION"
    bad = quantgate(workspace, "gate", str(run_dirs[0]), "--set", "calibration.seed=3")
    assert bad.returncode == 2 and "only gate.*" in bad.stderr


def test_matrix_runs_each_recipe_against_one_baseline(workspace):
    proc = quantgate(workspace, "run", "int8_sq.yaml", "int4_awq.yaml", "--json")
    out = json.loads(proc.stdout)
    assert [r["recipe"] for r in out["recipes"]] == ["int8_sq", "int4_awq"]
    assert all(r["baseline_cache"].startswith("hit") for r in out["recipes"])
    assert out["exit_code"] == max(r["exit_code"] for r in out["recipes"]) or out["exit_code"] in (1, 3, 4, 5)
    assert out["recipes"][1]["checkpoint_bytes"] < out["recipes"][0]["checkpoint_bytes"]  # 4-bit < 8-bit


KILL_STAGES = ["calibrate", "export", "evaluate", "gate", "track", "promote"]


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_sigkill_inside_a_stage_then_resume(workspace, stage):
    # A distinct seed per case gives each its own run directory (and registered version).
    args = ("run", "fp8.yaml", "--json", "--set", f"calibration.seed={100 + KILL_STAGES.index(stage)}")
    before = versions(workspace)
    killed = quantgate(workspace, *args, env={"QUANTGATE_KILL_IN": stage})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = quantgate(workspace, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout)
    after = versions(workspace)
    assert len(after) == len(before) + 1, "registered exactly once across the kill and the resume"
    if stage in ("evaluate", "gate", "track", "promote"):
        assert "resume: export already complete" in resumed.stderr
        assert "calibrate: start" not in resumed.stderr  # the checkpoint is reused, not recalibrated
    run_dir = Path(out["run_dir"]) if Path(out["run_dir"]).is_absolute() else workspace / out["run_dir"]
    assert not list(run_dir.glob(".*partial")), "no half-written folder is left in use"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"calibrate", "export", "evaluate", "gate", "promote"} <= set(manifest["stages"])
    assert {"files", "mlflow", "registry"} <= set(manifest["sinks"])


def test_corrupt_baseline_cache_entry_is_rejected_and_recomputed(workspace, tmp_path_factory):
    entries = [p for p in (workspace / "qg_cache" / "baselines").iterdir() if p.is_dir()]
    assert entries
    for entry in entries:
        (entry / "results.json").write_text('{"side": "baseline", "tasks": {}}')
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--fresh")
    assert "is corrupt; recomputing" in proc.stderr
    assert "baseline: cache miss" in proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "PASS"


def test_changed_task_file_invalidates_the_baseline(workspace, tmp_path):
    import shutil

    suite = tmp_path / "suite2"
    shutil.copytree(ROOT / "eval_suites" / "default", suite)
    text = (suite / "suite.yaml").read_text()
    (suite / "suite.yaml").write_text(text.replace("min_target_chars: 4", "min_target_chars: 5"))
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--set", f"evaluation.suite={suite}")
    assert "baseline: cache miss" in proc.stderr, proc.stderr[-2000:]


def test_prompts_longer_than_the_engine_limit_fail_before_calibration(workspace):
    proc = quantgate(workspace, "run", "fp8.yaml", "--json", "--set", "engine.max_input_len=16", "--set", "engine.max_seq_len=32", "--fresh")
    out = json.loads(proc.stdout)
    assert proc.returncode == 2 and out["exit_code"] == 2, proc.stderr[-2000:]
    assert "max_input_len" in out["reason"] and "\n" not in out["reason"]
    assert "calibrate" not in out["timings"]  # refused before any calibration


def test_regate_from_an_mlflow_run_id(workspace):
    # The workspace's store is mlruns/mlflow.db under the cwd: the default tracking URI.
    outcomes = [json.loads(p.read_text()) for p in (workspace / "runs").glob("fp8-*/outcome.json")]
    outcome = next(o for o in outcomes if o["exit_code"] in (0, 1) and o["mlflow_run_id"])  # a run that reached the gate
    proc = quantgate(workspace, "gate", outcome["mlflow_run_id"], "--json", "--set", "gate.golden.max_mean_kl=0.0", "--set", "gate.golden.min_top1_agreement=1.0")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["decision"] == "REGRESSION"
    missing = quantgate(workspace, "gate", "0123456789abcdef0123456789abcdef")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
