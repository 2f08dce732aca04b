"""quantgate.tracking against a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quantgate.recipe import PromotionSpec, TrackingSpec
from quantgate.tracking import (
    RunTracker,
    TrackingError,
    download_artifacts,
    free_port,
    register_checkpoint,
    serve_ui,
    start_ui,
    stop_ui,
    wait_healthy,
)

pytestmark = pytest.mark.server


@dataclass
class Server:
    url: str
    uri: str  # the sqlite store behind it
    root: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlserver")
    uri = f"sqlite:///{(root / 'mlflow.db').as_posix()}"
    with serve_ui(
        uri, port=free_port(), log_path=root / "server.log", artifacts_destination=root / "proxied", timeout=90
    ) as url:
        yield Server(url=url, uri=uri, root=root)
    # serve_ui stopped the whole process group; the port is free again.


@pytest.fixture(autouse=True)
def _bounded_http(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # a stray default store (./mlflow.db) would land here
    # MLflow's HTTP client retries with backoff for minutes by default; fail fast in tests.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _get(url: str, endpoint: str, **query: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        body = resp.read()
    return json.loads(body) if resp.headers.get_content_type() == "application/json" else body


def _checkpoint(tmp_path: Path, label: str) -> Path:
    ckpt = tmp_path / label
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "weights.txt").write_text(f"weights of {label}\n")
    return ckpt


def test_log_register_promote_through_server(server: Server, tmp_path: Path) -> None:
    spec = TrackingSpec(uri=server.url, experiment="served")
    promotion = PromotionSpec(registered_model="qg-served")
    runs = {}
    for label, passed in (("good", True), ("bad", False)):
        with RunTracker(spec, label, tags={"quantgate.recipe": label}) as run:
            assert run.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
            run.log_params({"quantization.format": "int4_awq", "model.source": "https://u:pw@hub/x"})
            run.log_metrics({"qg_cloze/acc": 0.75 if passed else 0.5, "ppl": None})
            path = run.log_checkpoint(_checkpoint(tmp_path, label))
            reg = register_checkpoint(
                run, path, promotion, passed=passed, decision="PASS" if passed else "REGRESSION",
                tags={"quantgate.recipe": label},
            )
            assert reg is not None and reg.promoted is passed
            runs[label] = run.run_id

    # Read back through the REST API, as another client would.
    alias = _get(server.url, "/api/2.0/mlflow/registered-models/alias", name="qg-served", alias="production")
    assert alias["model_version"]["version"] == "1"
    assert alias["model_version"]["run_id"] == runs["good"]
    model = _get(server.url, "/api/2.0/mlflow/registered-models/get", name="qg-served")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"production": "1", "candidate": "2"}
    got = _get(server.url, "/api/2.0/mlflow/runs/get", run_id=runs["bad"])["run"]
    assert got["info"]["status"] == "FINISHED"
    assert {m["key"]: m["value"] for m in got["data"]["metrics"]} == {"qg_cloze/acc": 0.5}
    params = {p["key"]: p["value"] for p in got["data"]["params"]}
    assert params["model.source"] == "https://***@hub/x"
    tags = {t["key"]: t["value"] for t in got["data"]["tags"]}
    assert tags["quantgate.missing_metrics"] == "ppl" and tags["quantgate.model_version"] == "2"

    # Artifacts went through the server into --artifacts-destination.
    stored = sorted(p.name for p in (server.root / "proxied").rglob("weights.txt"))
    assert stored == ["weights.txt", "weights.txt"]
    prod = download_artifacts("models:/qg-served@production", tmp_path / "dl", tracking_uri=server.url)
    assert (prod / "weights.txt").read_text() == "weights of good\n"


def test_server_serves_runs_logged_straight_to_sqlite(server: Server, tmp_path: Path) -> None:
    """A run logged to the sqlite file (pinned local artifact_location) is browsable via the server."""
    spec = TrackingSpec(uri=server.uri, experiment="direct")
    with RunTracker(spec, "direct-run") as run:
        run.log_metrics({"acc": 0.5})
        path = run.log_checkpoint(_checkpoint(tmp_path, "direct"))
        reg = register_checkpoint(
            run, path, PromotionSpec(registered_model="qg-direct"), passed=True, decision="PASS", tags={}
        )
    assert run.artifact_uri.startswith(str(server.root / "artifacts" / "direct"))
    listing = _get(server.url, "/ajax-api/2.0/mlflow/artifacts/list", run_id=run.run_id, path="checkpoint")
    assert sorted(f["path"] for f in listing["files"]) == ["checkpoint/config.json", "checkpoint/weights.txt"]
    body = _get(server.url, "/get-artifact", path="checkpoint/weights.txt", run_uuid=run.run_id)
    assert body == b"weights of direct\n"
    assert reg is not None
    body = _get(server.url, "/model-versions/get-artifact", path="weights.txt", name="qg-direct", version=reg.version)
    assert body == b"weights of direct\n"


def test_start_ui_refuses_busy_port_and_reports_early_exit(server: Server, tmp_path: Path) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(TrackingError, match="in use"):
        start_ui(server.uri, port=port)
    with pytest.raises(TrackingError, match="already a tracking server"):
        start_ui(server.url)
    # A store the server cannot open: it exits, and wait_healthy says so instead of waiting.
    bad = tmp_path / "not-a-db.db"
    bad.write_text("this is not sqlite")
    proc = start_ui(f"sqlite:///{bad.as_posix()}", port=free_port(), log_path=tmp_path / "bad.log")
    try:
        with pytest.raises(TrackingError, match="exited with code"):
            wait_healthy(f"http://127.0.0.1:{free_port()}", timeout=60, proc=proc)
    finally:
        stop_ui(proc)
