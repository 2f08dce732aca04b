"""The MLflow UI: an `mlflow server` process group on a local store, started, checked and stopped.

`quantgate ui` runs `run_ui`: the server runs in its own session (process group), and SIGTERM,
SIGINT (also when started without a terminal, where SIGINT arrives ignored) and SIGHUP stop the
whole group: mlflow's CLI process and its uvicorn/gunicorn workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantgate.tracking.common import UI_QUERY, TrackingError
from quantgate.tracking.redaction import redact_uri
from quantgate.tracking.uri import default_artifact_root, is_remote, normalize_tracking_uri


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: connections of a server stopped a moment ago (TIME_WAIT) do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def server_command(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    artifacts_destination: str | Path | None = None,
    workers: int = 1,
) -> list[str]:
    """The `mlflow server` command line for a backend store `uri` (sqlite or another database)."""
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]
    # Runs logged straight to sqlite keep their pinned local artifact_location (the server reads
    # those paths directly). Experiments created through the server get `mlflow-artifacts:/`
    # (proxied: works for remote clients too), stored under the same folder as the pinned ones.
    destination = artifacts_destination if artifacts_destination is not None else default_artifact_root(uri)
    if destination is not None:
        cmd += ["--serve-artifacts", "--artifacts-destination", str(destination)]
    return cmd


def start_ui(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    log_path: str | Path | None = None,
    artifacts_destination: str | Path | None = None,
    workers: int = 1,
) -> subprocess.Popen[bytes]:
    """Start `mlflow server` on a local store in its own process group; stop it with stop_ui.

    Output goes to `log_path` (or this terminal). MLflow 3.17's GenAI job runner (half a dozen
    huey worker processes) is switched off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION is set.
    """
    if is_remote(uri):
        raise TrackingError(f"{redact_uri(uri)} is already a tracking server; open it in a browser")
    uri = normalize_tracking_uri(uri, source="tracking URI", key="")
    if not _port_free(host, port):
        raise TrackingError(f"port {port} on {host} is in use; pick another with --port")
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Anything in the server that falls back to "the tracking URI" must find this store, not
    # MLflow's default ./mlflow.db in whatever folder `quantgate ui` was started from.
    env["MLFLOW_TRACKING_URI"] = uri
    env["MLFLOW_REGISTRY_URI"] = uri
    cmd = server_command(uri, host, port, artifacts_destination=artifacts_destination, workers=workers)
    out: Any = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed below after fork
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
        )
    finally:
        if out is not None:
            out.close()
    proc.log_path = Path(log_path) if log_path is not None else None  # type: ignore[attr-defined]
    return proc


def _log_tail(proc: subprocess.Popen[bytes] | None, lines: int = 8) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not Path(path).is_file():
        return ""
    tail = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return ("; log: " + " | ".join(t.strip() for t in tail)) if tail else ""


def wait_healthy(
    url: str,
    timeout: float = 60.0,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.25,
) -> None:
    """Poll `<url>/health` until it answers 200; raise TrackingError on timeout or if `proc` exits."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never via a proxy
    health = url.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with code {proc.returncode} before it was healthy{_log_tail(proc)}")
        try:
            with opener.open(health, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise TrackingError(f"{health} not healthy after {timeout:.0f} s ({last}){_log_tail(proc)}")
        time.sleep(interval)


def stop_ui(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a server from start_ui: SIGTERM to its process group (uvicorn workers included),
    SIGKILL after `timeout`."""
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid

    def group_alive() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def serve_ui(
    uri: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    log_path: str | Path | None = None,
    artifacts_destination: str | Path | None = None,
    timeout: float = 90.0,
) -> Iterator[str]:
    """Run an MLflow server for the block; yields its base URL; always stops it."""
    proc = start_ui(uri, host, port, log_path=log_path, artifacts_destination=artifacts_destination)
    try:
        url = f"http://{host}:{port}"
        wait_healthy(url, timeout, proc=proc)
        yield url
    finally:
        stop_ui(proc)


def run_url(base_url: str, experiment_id: str, run_id: str) -> str:
    """Page of a run in the MLflow UI (a single-page app on hash routes)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{UI_QUERY}"


def model_url(base_url: str, name: str) -> str:
    """Page of a registered model (versions, tags, aliases) in the MLflow UI."""
    return f"{base_url.rstrip('/')}/#/models/{urllib.parse.quote(name, safe='')}{UI_QUERY}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (for tests and `quantgate ui --port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])



_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Stop(Exception):
    """Raised in the main thread by the signal handler of run_ui."""


def run_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, *, timeout: float = 90.0, out: Any = None) -> int:
    """Start the UI server on `uri`, print its address, and block until the server exits or this
    process gets SIGTERM/SIGINT/SIGHUP; then stop the server's whole process group. Returns 0.

    Handlers are installed explicitly: a process started in the background by a shell inherits
    SIGINT as *ignored*, so Python's default Ctrl-C handling would never fire.
    """
    out = out or sys.stdout
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        raise _Stop

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_ui(uri, host=host, port=port)
        url = f"http://{host}:{port}"
        wait_healthy(url, timeout=timeout, proc=proc)
        print(f"MLflow UI: {url}/#/experiments{UI_QUERY}  (store: {redact_uri(uri)}; Ctrl-C to stop)", file=out, flush=True)
        proc.wait()
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        # Block further stop signals while stopping: a second SIGTERM must not cut the cleanup short.
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if proc is not None:
                stop_ui(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
