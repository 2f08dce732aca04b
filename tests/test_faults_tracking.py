"""Fault injection for the MLflow edge (issue 10): redaction keeps what is not a credential,
credentials never leak, an outage fails fast and resumes once, interrupted runs are closed in their
own store, concurrent stores/registrations stay consistent (sqlite and a PostgreSQL-backed
`mlflow server`), and `quantgate ui` takes its whole process tree down on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantgate.recipe import PromotionSpec, TrackingSpec
from quantgate.tracking import (
    REDACTED,
    TAG_RUN_KEY,
    RunTracker,
    TrackingError,
    _mlflow_client,
    check_store,
    free_port,
    redact,
    redact_params,
    redact_uri,
    register_checkpoint,
    registered_version_for,
    start_ui,
    stop_ui,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cret"

# ---- 1. redaction: credentials only ------------------------------------------------------------

GH = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHOULD_REDACT = [
    ("http://user:hunter2@127.0.0.1:5000", "hunter2"),
    ("postgresql://mlflow:pw123456@db.internal:5432/mlflow", "pw123456"),
    ("https://tok_abcdef@huggingface.co/org/model", "tok_abcdef"),
    ("https://h/x?token=abc123secret&rev=main", "abc123secret"),
    ("https://h/x?a=1&password=hunter2", "hunter2"),
    ("dsn host=db password=hunter2 user=u", "hunter2"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    (f"clone with {GH}", GH[4:]),
    ("key sk-proj-abcdefghijklmnopqrstuvwx1234", "abcdefghijklmnopqrstuvwx1234"),
    ("aws AKIAIOSFODNN7EXAMPLE in env", "AKIAIOSFODNN7EXAMPLE"),
    ("HF token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "abcdefghijklmnopqrstuvwxyzABCDEFGH"),
    ("slack xoxb-123456789012-abcdefghijkl", "123456789012-abcdefghijkl"),
    ('{"password": "hunter2", "n": 3}', "hunter2"),
    ('{"api_key": "k-12345"}', "k-12345"),
    ('{"client_secret": "cs-999"}', "cs-999"),
    ("hf_token: abcdef\n", "abcdef"),
    ("db:\n  password: hunter2\n", "hunter2"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG", "wJalrXUtnFEMIK7MDENG"),
    ("apiKey=k-0987654321", "k-0987654321"),
    ("secret: very-private\n", "very-private"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2", "hunter2"),
    ("authorization: opaque-value-1\n", "opaque-value-1"),
    ("access-key=AK-555-xyz", "AK-555-xyz"),
]
MUST_KEEP = [
    "quantgate.run_key=fp8-1a2b3c4d5e-9f8e7d6c",
    "quantgate.baseline_key: da34d2d35e8b7e2b31e9",
    '{"quantgate.run_key": "fp8-1a2b3c4d5e-9f8e7d6c"}',
    f"sha256 {SHA}",
    f"quantgate.calibration_sha256={SHA}",
    "PASS: all 4 gated checks pass (qg_cloze/acc, qg_nextsent/acc, qg_ppl/word_perplexity, golden/mean_kl)",
    "PASS: 'qg_cloze/acc' within margin",
    "passed: true",
    "key_parts: [model, format]",
    "max_new_tokens: 48",
    "pad_token: <|endoftext|>",
    "eos_token=<|im_end|>",
    "tokenizer: gpt2",
    "check                       baseline  candidate  worsening  status\nqg_cloze/acc  0.5  0.5  +0 (0%)  PASS",
    "http://127.0.0.1:5000/#/models/tiny-llama?workflowType=machine_learning",
    "git@github.com:org/repo.git",
    "mlflow-artifacts:/3/abc/artifacts/checkpoint",
    "models:/tiny-llama@production",
    "top_k=40 monkey=1 keystone=2",
    "the basic arithmetic test",
    "the first token differs at position 3",
    "risk-adjusted score 0.91",
]


@pytest.mark.parametrize(("text", "secret"), SHOULD_REDACT)
def test_redaction_removes_credentials(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and REDACTED in out, out
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize("text", MUST_KEEP)
def test_redaction_keeps_everything_else(text: str) -> None:
    assert redact(text) == text


def test_redaction_table_is_big_enough_and_params_keep_run_keys() -> None:
    assert len(SHOULD_REDACT) + len(MUST_KEEP) >= 30
    params = {"quantgate.run_key": "fp8-abc", "quantgate.baseline_key": "k1", "passed": "true",
              "db.password": "x", "HF_TOKEN": "y", "quantgate.verdict_reason": "PASS: all pass"}
    assert redact_params(params) == {"quantgate.run_key": "fp8-abc", "quantgate.baseline_key": "k1", "passed": "true",
                                     "db.password": REDACTED, "HF_TOKEN": REDACTED, "quantgate.verdict_reason": "PASS: all pass"}
    assert redact_uri(f"http://user:{SECRET}@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_uri(f"postgresql://u:{SECRET}@db/x?password={SECRET}") == f"postgresql://db/x?password={REDACTED}"
    assert redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


# ---- shared helpers ----------------------------------------------------------------------------


def _ckpt(root: Path, label: str) -> Path:
    d = root / label
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "weights.txt").write_text(f"weights of {label}\n")
    return d


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _versions(uri: str, name: str) -> list[Any]:
    return list(_mlflow_client(uri).search_model_versions(f"name='{name}'"))


@pytest.fixture(autouse=True)
def _no_stray_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # a stray default store (./mlflow.db) would land here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    assert not (tmp_path / "mlflow.db").exists(), "MLflow's default ./mlflow.db was created"


def test_run_key_guard_is_not_erased_by_redaction(tmp_path: Path) -> None:
    """Registering one run key twice (a resume) gives one version; the guard tag is intact."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    spec, promo = TrackingSpec(uri=uri, experiment="guard"), PromotionSpec(registered_model="guarded")
    key = "fp8-0123456789-abcdef01"
    regs = []
    for attempt in range(2):
        with RunTracker(spec, f"attempt{attempt}") as run:
            path = run.log_checkpoint(_ckpt(tmp_path, f"c{attempt}"))
            regs.append(register_checkpoint(run, path, promo, passed=True, decision="PASS",
                                            tags={TAG_RUN_KEY: key, "quantgate.verdict_reason": "PASS: all pass"}))
    assert regs[0].version == regs[1].version == "1"
    (mv,) = _versions(uri, "guarded")
    assert mv.tags[TAG_RUN_KEY] == key and mv.tags["quantgate.verdict_reason"] == "PASS: all pass"
    assert registered_version_for("guarded", key, "production", tracking_uri=uri)["promoted"] is True


# ---- 4. outage: bounded, one line --------------------------------------------------------------


def test_unreachable_store_fails_fast_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as info:
        check_store(uri, "x")
    direct_s = time.monotonic() - t0
    msg = str(info.value)
    assert SECRET not in msg and f"127.0.0.1:{port}" in msg and "\n" not in msg
    assert "connection refused" in msg and "MLFLOW_TRACKING_URI" in msg
    assert direct_s < 15, direct_s
    # A server that accepts connections but never answers is bounded by check_store's own
    # clock, not by MLflow's read timeout x retries.
    import socket

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(16)
        t0 = time.monotonic()
        with pytest.raises(TrackingError, match="no answer within 3 s"):
            check_store(f"http://127.0.0.1:{mute.getsockname()[1]}", "x", timeout=3)
        assert time.monotonic() - t0 < 6


# ---- the tiny-model workspace for end-to-end runs ----------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from tests.test_pipeline import LOOSE_GATE

    ws = tmp_path_factory.mktemp("faults_ws")
    recipe = {
        "name": "fp8", "quantization": {"format": "fp8"},
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 12, "golden": {"max_new_tokens": 6}},
        "gate": LOOSE_GATE,
        "promotion": {"registered_model": "tiny-llama"},
        "tracking": {"uri": f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}", "experiment": "qg-faults"},
        "output_dir": str(ws / "runs"),
    }
    (ws / "fp8.yaml").write_text(yaml.safe_dump(recipe))
    return ws


def _qg(ws: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=ws, capture_output=True, text=True,
                          env=_env(**env), timeout=600)


def test_unreachable_store_stops_quantgate_run_before_any_work(workspace: Path) -> None:
    uri = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = _qg(workspace, "run", "fp8.yaml", "--json", "--set", "calibration.seed=901", MLFLOW_TRACKING_URI=uri)
    seconds = time.monotonic() - t0
    print(f"unreachable store: quantgate run exited {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert seconds < 15, seconds
    assert SECRET not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "127.0.0.1" in proc.stderr
    assert "calibrate" not in proc.stderr  # refused before any model work


def test_interrupted_run_is_closed_failed_in_its_own_store(workspace: Path) -> None:
    """SIGKILL inside a stage leaves the MLflow run RUNNING; the resume closes it FAILED with a
    reason, in the recipe's store (no ./mlflow.db in the working directory)."""
    args = ("run", "fp8.yaml", "--json", "--set", "calibration.seed=902")
    killed = _qg(workspace, *args, QUANTGATE_KILL_IN="evaluate")
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = next(p for p in (workspace / "runs").glob("fp8-*") if "seed: 902" in (p / "recipe.yaml").read_text())
    old_run = json.loads((run_dir / "manifest.json").read_text())["mlflow_run_id"]
    uri = f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}"
    assert _mlflow_client(uri).get_run(old_run).info.status == "RUNNING"
    resumed = _qg(workspace, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_run = json.loads(resumed.stdout)["mlflow_run_id"]
    old = _mlflow_client(uri).get_run(old_run)
    assert old.info.status == "FAILED"
    assert "interrupted" in old.data.tags["quantgate.failure"] and new_run in old.data.tags["quantgate.failure"]
    assert not (workspace / "mlflow.db").exists()


# ---- a real mlflow server ----------------------------------------------------------------------


class Server:
    def __init__(self, backend: str, root: Path, port: int) -> None:
        self.backend, self.root, self.port = backend, root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        self.proc = start_ui(self.backend, port=self.port, log_path=self.root / "server.log",
                             artifacts_destination=self.root / "artifacts")
        wait_healthy(self.url, timeout=90, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_ui(self.proc)
            self.proc = None


@pytest.mark.server
def test_credentials_appear_nowhere(workspace: Path, tmp_path: Path) -> None:
    root = tmp_path / "srv"
    server = Server(f"sqlite:///{root / 'mlflow.db'}", root, free_port()).start()
    uri = f"http://qguser:{SECRET}@127.0.0.1:{server.port}"
    try:
        outs = [_qg(workspace, "run", "fp8.yaml", *extra, "--set", "calibration.seed=903", MLFLOW_TRACKING_URI=uri)
                for extra in ((), ("--json",))]
        show = _qg(workspace, "show", "fp8.yaml", MLFLOW_TRACKING_URI=uri)
        for proc in (*outs, show):
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert SECRET not in proc.stdout and SECRET not in proc.stderr
            assert "View run" not in proc.stdout + proc.stderr
        assert f"uri: http://127.0.0.1:{server.port}" in show.stdout
        run_dir = Path(json.loads(outs[1].stdout)["run_dir"])
        assert f"http://127.0.0.1:{server.port}" in (run_dir / "recipe.yaml").read_text()
        # Everything on disk: run directory (run.log included), the server's database and artifacts.
        for tree in (run_dir, root):
            for f in (p for p in tree.rglob("*") if p.is_file()):
                assert SECRET.encode() not in f.read_bytes(), f
        # And what MLflow serves: params, tags, every artifact's text.
        client = _mlflow_client(server.url)
        run = client.get_run(json.loads(outs[1].stdout)["mlflow_run_id"])
        assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
        assert run.data.tags["quantgate.verdict_reason"].startswith("PASS: all")  # not 'PASS: ***'
        dl = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
        texts = [p.read_bytes() for p in dl.rglob("*") if p.is_file()]
        assert texts and not any(SECRET.encode() in t for t in texts)
    finally:
        server.stop()


@pytest.mark.server
def test_server_killed_mid_run_fails_fast_then_resumes_once(workspace: Path, tmp_path: Path) -> None:
    root = tmp_path / "srv"
    port = free_port()
    server = Server(f"sqlite:///{root / 'mlflow.db'}", root, port).start()
    args = ["run", "fp8.yaml", "--json", "--set", "calibration.seed=904", "--set", "promotion.registered_model=outage"]
    proc = subprocess.Popen([sys.executable, "-m", "quantgate.cli", *args], cwd=workspace, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(MLFLOW_TRACKING_URI=server.url))
    err_lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if "calibrate: start" in line:
                break
        server.stop()  # the tracking server dies while the model is being calibrated
        killed_at = time.monotonic()
        out, rest = proc.communicate(timeout=120)
        exit_s = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    stderr = "".join(err_lines) + rest
    print(f"server killed mid-run: exit {proc.returncode} {exit_s:.1f} s after the kill")
    assert proc.returncode == 3, stderr[-3000:]
    assert exit_s <= 60, exit_s
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "tracking store" in last and f"127.0.0.1:{port}" in last, last
    outcome = json.loads(out)
    run_dir = Path(outcome["run_dir"])
    assert outcome["exit_code"] == 3 and (run_dir / "outcome.json").is_file()
    assert (run_dir / "verdict.json").is_file() or (run_dir / "checkpoint").is_dir()  # results kept locally

    server = Server(f"sqlite:///{root / 'mlflow.db'}", root, port).start()  # back, same store
    try:
        again = _qg(workspace, *args, MLFLOW_TRACKING_URI=server.url)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "resume: export already complete" in again.stderr and "calibrate: start" not in again.stderr
        client = _mlflow_client(server.url)
        versions = client.search_model_versions("name='outage'")
        assert [str(v.version) for v in versions] == ["1"]
        assert str(client.get_model_version_by_alias("outage", "production").version) == "1"
        exp = client.get_experiment_by_name("qg-faults")
        runs = client.search_runs([exp.experiment_id], "tags.`quantgate.recipe` = 'fp8'")
        mine = [r for r in runs if r.info.run_id in (outcome["mlflow_run_id"], json.loads(again.stdout)["mlflow_run_id"])]
        assert sorted(r.info.status for r in mine) == ["FAILED", "FINISHED"]  # logged once; the dead run closed
    finally:
        server.stop()


# ---- 6. concurrency: sqlite and a PostgreSQL-backed server --------------------------------------

WORKER = r"""
import json, sys, time
from pathlib import Path
from quantgate.recipe import PromotionSpec, TrackingSpec
from quantgate.tracking import RunTracker, register_checkpoint
uri, exp, model, key, passed, go, ckpt = sys.argv[1:8]
while not Path(go).exists():
    time.sleep(0.005)
with RunTracker(TrackingSpec(uri=uri, experiment=exp), key) as run:
    path = run.log_checkpoint(ckpt)
    if model == "-":
        print(json.dumps({"run": run.run_id}))
        raise SystemExit(0)
    reg = register_checkpoint(run, path, PromotionSpec(registered_model=model), passed=passed == "1",
                              decision="PASS" if passed == "1" else "REGRESSION",
                              tags={"quantgate.run_key": key})
print(json.dumps({"run": run.run_id, "version": reg.version}))
"""


def _race(tmp_path: Path, uri: str, jobs: list[tuple[str, str, str, str]]) -> list[dict[str, Any]]:
    """Start one process per (experiment, model, run key, passed) and release them together."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, exp, model, key, passed, str(go),
                               str(_ckpt(tmp_path / "ck", f"{key}-{i}"))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for i, (exp, model, key, passed) in enumerate(jobs)]
    time.sleep(3.0)  # let every interpreter import quantgate and MLflow before the start signal
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check_concurrency(tmp_path: Path, uri: str) -> dict[str, Any]:
    # (a) several processes start on the same (fresh) store and experiment at once.
    runs = _race(tmp_path, uri, [("fresh", "-", f"a{i}", "1") for i in range(3)])
    assert len({r["run"] for r in runs}) == 3
    # (b) two processes register the same run key at once: one version survives, both return it.
    same = _race(tmp_path, uri, [("reg", "same-key", "fp8-key-0001", "1")] * 2)
    (kept,) = _versions(uri, "same-key")
    assert {r["version"] for r in same} == {str(kept.version)}
    # (c) four recipes (two PASS, two REGRESSION) promote into one model at once.
    jobs = [("reg", "shared", f"{name}-key", passed) for name, passed in
            (("fp8", "1"), ("int8_sq", "0"), ("int4_awq", "1"), ("nvfp4", "0"))]
    res = _race(tmp_path, uri, jobs)
    versions = {str(v.version): v for v in _versions(uri, "shared")}
    assert sorted(versions) == sorted(r["version"] for r in res) and len(versions) == 4  # none lost
    prod = str(_mlflow_client(uri).get_model_version_by_alias("shared", "production").version)
    assert versions[prod].tags["quantgate.passed"] == "true"
    return {"versions": len(versions), "production": prod}


def test_concurrency_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    print("sqlite:", _check_concurrency(tmp_path, uri))


def _pg_bin() -> Path | None:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True):
        return cand.parent
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port (as user postgres when run as root)."""
    import shutil
    import tempfile

    pytest.importorskip("psycopg2", reason="psycopg2-binary not installed")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    as_root = os.geteuid() == 0
    data = Path(tempfile.mkdtemp(prefix="qg-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "pg.log"), "-w", "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # MLflow 3.17 defaults to psycopg 3
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.server
def test_concurrency_on_a_postgresql_backed_server(postgres: str, tmp_path: Path) -> None:
    server = Server(postgres, tmp_path / "srv", free_port()).start()
    try:
        print("postgresql server:", _check_concurrency(tmp_path, server.url))
    finally:
        server.stop()


# ---- 11. quantgate ui: signals stop the whole tree ---------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.server
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_whole_process_tree(tmp_path: Path, sig: signal.Signals) -> None:
    import socket

    port = free_port()
    # SIGINT ignored at start: what a shell does to a background job without a terminal.
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate.cli", "ui", "--uri", f"sqlite:///{tmp_path / 'ui.db'}", "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # mlflow's own start-up chatter comes first
            seen.append(line)
            if "MLflow UI:" in line:
                break
        assert "MLflow UI:" in seen[-1], seen
        tree = _descendants(proc.pid)
        assert tree, "no server process"  # mlflow's CLI and its uvicorn worker(s)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(map(_alive, tree)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if _alive(p)], "server processes survived"
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
            sock.bind(("127.0.0.1", port))  # nothing listens on the port any more
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            os.kill(p, signal.SIGKILL)
