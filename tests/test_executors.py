"""Executors (quantgate/executors): `--executor ray` on a local Ray cluster of separate worker
processes gives the same verdicts, per-item results and registry state as `--executor local`; a
worker SIGKILLed mid-task is retried by Ray and resumes from its run directory (one registry
version, no partial artifacts); spent retries are one ERROR line and exit 3; an unknown executor
is exit 2 with a did-you-mean; two processes racing for one baseline evaluate it once.

One local Ray cluster (2 CPUs, no dashboard) serves the whole module; each `quantgate run` is a
separate driver process that connects to it through RAY_ADDRESS, as on a real cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.test_pipeline import LOOSE_GATE

RECIPES = {"fp8": "fp8", "int8": "int8_sq"}


def _write_workspace(ws: Path, model_dir: Path) -> Path:
    ws.mkdir(parents=True, exist_ok=True)
    base = {
        "model": {"source": str(model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 10, "golden": {"max_new_tokens": 6}},
        "gate": LOOSE_GATE,
        "tracking": {"uri": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "experiment": "qg-exec"},
        "output_dir": "runs",  # relative: a Ray task runs in the driver's working directory
    }
    (ws / "_base.yaml").write_text(yaml.safe_dump(base))
    for name, fmt in RECIPES.items():
        # One registered model per recipe: recipes of a concurrent matrix that shared one model
        # would race for its aliases (whichever PASS finished last holds `production`).
        spec = {"extends": "_base.yaml", "name": fmt, "quantization": {"format": fmt}, "promotion": {"registered_model": f"tiny-exec-{name}"}}
        (ws / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return ws


def _run(ws: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "QUANTGATE_CACHE": str(ws / "qg_cache"), **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "quantgate.cli", "run", *args], cwd=ws, capture_output=True, text=True, env=full, timeout=timeout)


def _client(ws: Path):
    from quantgate.tracking import _mlflow_client

    return _mlflow_client(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")


def _registry(ws: Path) -> dict[str, dict]:
    """Per registered model: the recipe of each version and the aliases (alias -> recipe)."""
    client = _client(ws)
    out = {}
    for name in (f"tiny-exec-{n}" for n in RECIPES):
        versions = client.search_model_versions(f"name='{name}'")
        by_version = {str(v.version): v.tags.get("quantgate.recipe") for v in versions}
        aliases = {a: by_version[str(v)] for a, v in client.get_registered_model(name).aliases.items()} if versions else {}
        out[name] = {"versions": sorted(by_version.values()), "aliases": aliases,
                     "run_keys": sorted(v.tags.get("quantgate.run_key", "") for v in versions)}
    return out


def _no_partial_files(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".partial" in p.parent.name]


@pytest.fixture(scope="module")
def ray_address():
    ray = pytest.importorskip("ray", reason="the Ray executor tests need `ray` (installed by make setup)")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ctx.address_info["gcs_address"]
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("executors")
    return _write_workspace(root / "local", tiny_model_dir), _write_workspace(root / "ray", tiny_model_dir)


def test_unknown_executor_is_bad_input_with_a_suggestion(pair):
    local, _ = pair
    res = _run(local, "fp8.yaml", "--executor", "rey")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown executor 'rey'; did you mean 'ray'?" in lines[0], res.stderr
    from quantgate.executors import ExecutorError, get_executor

    assert get_executor("local").name == "local"
    with pytest.raises(ExecutorError, match="did you mean 'local'"):
        get_executor("locale")


def test_ray_matrix_matches_local(pair, ray_address):
    local, remote = pair
    # Ray runs a 1-CPU task with OMP_NUM_THREADS=1; the same thread count locally makes the
    # floating-point sums, and so the per-item log-likelihoods, bit-identical.
    res_local = _run(local, "fp8.yaml", "int8.yaml", "--json", env={"OMP_NUM_THREADS": "1"})
    res_ray = _run(remote, "fp8.yaml", "int8.yaml", "--json", "--executor", "ray", env={"RAY_ADDRESS": ray_address})
    assert res_local.returncode == 0, res_local.stderr[-3000:]
    assert res_ray.returncode == 0, res_ray.stderr[-3000:]
    out_local, out_ray = json.loads(res_local.stdout), json.loads(res_ray.stdout)
    assert out_ray["exit_code"] == out_local["exit_code"]
    assert [(r["recipe"], r["decision"], r["exit_code"]) for r in out_ray["recipes"]] == [(r["recipe"], r["decision"], r["exit_code"]) for r in out_local["recipes"]]

    # Two worker processes, neither of them the driver; the baseline was evaluated once.
    assert "ray: submitting fp8 (num_cpus=1" in res_ray.stderr
    pids = set(re.findall(r"\[fp8\] preflight \(pid (\d+)\)", res_ray.stderr) + re.findall(r"\[int8_sq\] preflight \(pid (\d+)\)", res_ray.stderr))
    assert len(pids) == 2, pids
    # Each run's own log says whether it evaluated the baseline (the driver's stream is no proof:
    # Ray may fold identical lines of two workers into one).
    logs = [(Path(remote, r["run_dir"]) / "run.log").read_text() for r in out_ray["recipes"]]
    assert sum("baseline: cache miss" in text for text in logs) == 1, logs
    assert sum(bool(re.search(r"baseline: cache hit [0-9a-f]{20}", text)) for text in logs) == 1, logs

    for rl, rr in zip(out_local["recipes"], out_ray["recipes"], strict=True):
        dl, dr = Path(local, rl["run_dir"]), Path(remote, rr["run_dir"])
        assert dl.name == dr.name  # same artifact identity
        assert (dr / "items.jsonl").read_text() == (dl / "items.jsonl").read_text(), f"per-item results differ for {rl['recipe']}"
        assert json.loads((dr / "verdict.json").read_text())["decision"] == json.loads((dl / "verdict.json").read_text())["decision"]
        assert not _no_partial_files(dr)
    reg_local, reg_ray = _registry(local), _registry(remote)
    assert reg_ray == {k: {**v, "run_keys": reg_ray[k]["run_keys"]} for k, v in reg_local.items()}
    assert all(len(v["versions"]) == 1 for v in reg_ray.values()), reg_ray

    # The workers' runs are children of the driver's matrix parent, in the same store.
    client = _client(remote)
    runs = client.search_runs([client.get_experiment_by_name("qg-exec").experiment_id])
    parents = [r for r in runs if r.data.tags.get("quantgate.matrix") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["quantgate.recipe"] for r in children) == ["fp8", "int8_sq"]

    # The same command again: both complete on disk; no new run, the driver's parent is removed.
    again = _run(remote, "fp8.yaml", "int8.yaml", "--executor", "ray", env={"RAY_ADDRESS": ray_address})
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing re-run or uploaded") == 2
    active = client.search_runs([client.get_experiment_by_name("qg-exec").experiment_id])
    assert len(active) == len(runs)


def test_worker_killed_in_evaluate_is_retried_and_resumes(pair, ray_address):
    _, remote = pair
    marker = remote / "kill-once"
    env = {"RAY_ADDRESS": ray_address, "QUANTGATE_KILL_IN": "evaluate", "QUANTGATE_KILL_ONCE": str(marker)}
    res = _run(remote, "fp8.yaml", "--json", "--executor", "ray", "--set", "calibration.seed=11", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.is_file(), "the first attempt was not killed"
    out = json.loads(res.stdout)
    run_dir = Path(remote, out["run_dir"])
    log = (run_dir / "run.log").read_text()
    assert log.count("[fp8] evaluate: start") == 2 and log.count("[fp8] evaluate: done") == 1, log[-3000:]
    # The retry resumed after the last complete stage: the export was read back, not redone.
    assert "resume: export already complete" in log and log.count("[fp8] calibrate: start") == 1, log[-3000:]
    assert not _no_partial_files(run_dir)
    json.loads((run_dir / "candidate_results.json").read_text())
    # Registered once for this run directory; the killed attempt's MLflow run was closed.
    run_key = json.loads((run_dir / "manifest.json").read_text())["run_key"]
    assert _registry(remote)["tiny-exec-fp8"]["run_keys"].count(run_key) == 1
    client = _client(remote)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("qg-exec").experiment_id])
            if r.data.tags.get("quantgate.artifact_hash") and Path(out["run_dir"]).name.endswith(r.data.tags["quantgate.artifact_hash"][:10])]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"], [(r.info.status, r.data.tags) for r in runs]


def test_worker_killed_on_every_attempt_is_one_error_line(pair, ray_address):
    _, remote = pair
    env = {"RAY_ADDRESS": ray_address, "QUANTGATE_KILL_IN": "evaluate", "QUANTGATE_RAY_MAX_RETRIES": "1"}
    res = _run(remote, "fp8.yaml", "int8.yaml", "--executor", "ray", "--set", "calibration.seed=12", env=env)
    assert res.returncode == 3, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("quantgate: ")]
    assert len(errors) == 2 and all("Ray task lost after 2 attempt(s)" in line for line in errors), res.stderr[-3000:]
    assert "fp8: ERROR (exit 3)" in res.stdout and "int8_sq: ERROR (exit 3)" in res.stdout
    for name in ("fp8", "int8_sq"):
        run_dir = next(d for d in (remote / "runs").iterdir() if d.name.startswith(f"{name}-") and "evaluate: start" in (d / "run.log").read_text() and not (d / "verdict.json").exists())
        assert not (run_dir / "candidate_results.json").exists() and not _no_partial_files(run_dir)


def _reader(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in proc.stderr:
            lines.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _wait_for(lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(re.search(pattern, line) for line in lines):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared:\n{''.join(lines)[-3000:]}")


def test_two_processes_racing_for_one_baseline_evaluate_it_once(tmp_path, tiny_model_dir):
    """Process A evaluates the baseline and is held inside that stage until B is seen waiting for
    the same cache entry; B then reads A's evaluation from the cache instead of computing it."""
    ws = _write_workspace(tmp_path / "race", tiny_model_dir)
    release = tmp_path / "release"
    env = {**os.environ, "QUANTGATE_CACHE": str(tmp_path / "qg_cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "quantgate.cli", "run", "--json", "--set", "tracking.enabled=false", "--set", "quantization.format=fp16"]
    a = subprocess.Popen([*cmd, "--set", "name=race_a", "fp8.yaml"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**env, "QUANTGATE_PAUSE_IN": "baseline_evaluate", "QUANTGATE_PAUSE_UNTIL": str(release)})
    a_lines: list[str] = []
    threads = [_reader(a, a_lines)]
    b = None
    try:
        _wait_for(a_lines, r"baseline_evaluate: start", a)
        b = subprocess.Popen([*cmd, "--set", "name=race_b", "fp8.yaml"], cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        b_lines: list[str] = []
        threads.append(_reader(b, b_lines))
        _wait_for(b_lines, r"waiting: cache entry baseline-[0-9a-f]{20} is being filled by another quantgate process", b)
    finally:
        release.touch()
    out_a, out_b = a.stdout.read(), b.stdout.read() if b else ""
    assert a.wait(timeout=300) == 0 and b is not None and b.wait(timeout=300) == 0, "".join(a_lines + b_lines)[-3000:]
    for t in threads:
        t.join(timeout=10)
    err_a, err_b = "".join(a_lines), "".join(b_lines)
    assert "baseline: cache miss" in err_a and "baseline: cache miss" not in err_b
    assert re.search(r"baseline: cache hit [0-9a-f]{20}\n", err_b), err_b[-3000:]
    ra, rb = Path(ws, json.loads(out_a)["run_dir"]), Path(ws, json.loads(out_b)["run_dir"])
    assert ra != rb and (ra / "baseline_results.json").read_text() == (rb / "baseline_results.json").read_text()


def test_task_resources_and_environment_without_a_cluster(tmp_path, monkeypatch):
    """What a task asks for and runs with (no Ray needed)."""
    from quantgate.errors import PreflightError
    from quantgate.executors.ray import _task_context, job_environment, max_retries, task_resources
    from quantgate.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "quantization": {"format": "fp8"}}))
    recipe = load_recipe(str(tmp_path / "r.yaml"), [])
    assert task_resources(recipe, 0) == {"num_cpus": 1.0}  # auto on a CPU cluster
    assert task_resources(recipe, 8) == {"num_gpus": 1.0, "num_cpus": 1.0}  # auto on a GPU cluster
    recipe.engine.device, recipe.engine.tensor_parallel_size = "cuda", 2
    assert task_resources(recipe, 8) == {"num_gpus": 2.0, "num_cpus": 1.0}
    with pytest.raises(PreflightError, match="no GPU resources"):
        task_resources(recipe, 0)
    recipe.engine.device = "cpu"
    assert task_resources(recipe, 8) == {"num_cpus": 1.0}

    monkeypatch.setenv("QUANTGATE_CACHE", "relative-cache")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = job_environment()
    assert Path(env["QUANTGATE_CACHE"]).is_absolute() and env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    assert "CUDA_VISIBLE_DEVICES" not in env  # Ray sets it to the granted GPU

    # A task runs in the driver's directory with the driver's variables; both are restored after,
    # and a variable the driver did not set does not leak from the worker's earlier task.
    monkeypatch.setenv("QUANTGATE_KILL_IN", "evaluate")
    before = os.getcwd()
    with _task_context(str(tmp_path), {"QUANTGATE_CACHE": "/c"}):
        assert os.getcwd() == str(tmp_path) and os.environ["QUANTGATE_CACHE"] == "/c" and "QUANTGATE_KILL_IN" not in os.environ
    assert os.getcwd() == before and os.environ["QUANTGATE_KILL_IN"] == "evaluate"
    from quantgate.executors import ExecutorError

    with pytest.raises(ExecutorError, match="needs shared storage"), _task_context(str(tmp_path / "absent"), {}):
        pass
    monkeypatch.setenv("QUANTGATE_RAY_MAX_RETRIES", "-1")
    with pytest.raises(ExecutorError, match="QUANTGATE_RAY_MAX_RETRIES"):
        max_retries()
