"""The MLflow UI, as a person sees it, for runs and models logged by quantgate.

The UI is a JavaScript single-page app, so this drives Debian's headless chromium over the
DevTools protocol (aiohttp's websocket client; aiohttp ships with mlflow) and waits for the
expected text to render instead of sleeping. Screenshots land in the temp folder
(quantgate_ui_run.png, quantgate_ui_model.png).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quantgate.recipe import PromotionSpec, TrackingSpec
from quantgate.tracking import (
    RunTracker,
    free_port,
    model_url,
    register_checkpoint,
    run_url,
    serve_ui,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1400,1800",  # tall enough that the run page's metrics table is on screen
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
aiohttp = pytest.importorskip("aiohttp")


@dataclass
class Logged:
    url: str
    experiment_id: str
    run_id: str
    model: str


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    """Two candidates logged straight to sqlite (what `quantgate run` does), then served."""
    root = tmp_path_factory.mktemp("mlui")
    uri = f"sqlite:///{(root / 'mlruns' / 'mlflow.db').as_posix()}"
    spec = TrackingSpec(uri=uri, experiment="quantgate-ui")
    promotion = PromotionSpec(registered_model="qg-ui-model")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store above, whatever the shell says
        passing = _log_candidate(spec, promotion, root, "int4_awq", True, 0.8125)
        _log_candidate(spec, promotion, root, "nvfp4", False, 0.5625)
    assert passing is not None
    run_id, experiment_id = passing
    with serve_ui(uri, port=free_port(), log_path=root / "server.log", timeout=90) as url:
        yield Logged(url=url, experiment_id=experiment_id, run_id=run_id, model=promotion.registered_model)


def _log_candidate(
    spec: TrackingSpec, promotion: PromotionSpec, root: Path, label: str, passed: bool, acc: float
) -> tuple[str, str] | None:
    """Log one candidate run and register it; returns (run id, experiment id) of a passing one."""
    ckpt = root / label
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    decision = "PASS" if passed else "REGRESSION"
    with RunTracker(spec, label) as run:
        run.log_params({"quantization.format": label})
        run.log_metrics({"qg_cloze/acc": acc, "wikitext/word_perplexity": 17.25})
        run.set_tags({"quantgate.decision": decision})
        register_checkpoint(
            run, run.log_checkpoint(ckpt), promotion, passed=passed, decision=decision,
            tags={"quantgate.recipe": label},
        )
    return (run.run_id, run.experiment_id) if passed else None


class Page:
    """The smallest DevTools-protocol client that can navigate, read text and take screenshots."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._next = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:  # skip events until our answer comes
            msg = await asyncio.wait_for(self._ws.receive_json(), timeout=30)
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def text(self) -> str:
        got = await self.call(
            "Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True
        )
        # The UI puts no-break spaces in labels such as '@ production'.
        return str(got.get("result", {}).get("value", "")).replace("\xa0", " ")

    async def open(self, url: str, expected: list[str], timeout: float = 60.0) -> str:
        """Navigate and wait until every expected string is on the page; returns the page text."""
        await self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = await self.text()
            if all(e in text for e in expected):
                return text
            await asyncio.sleep(0.25)
        missing = [e for e in expected if e not in text]
        raise AssertionError(f"{url}: {missing} never appeared; page text starts: {text[:500]!r}")

    async def run(self, script: str, expected: list[str], timeout: float = 30.0) -> str:
        """Run a script in the page (a click, a scroll), then wait for the expected strings."""
        got = await self.call("Runtime.evaluate", expression=script, returnByValue=True)
        if "exceptionDetails" in got:
            raise AssertionError(f"script failed in the page: {got['exceptionDetails'].get('exception', {}).get('description', got)}")
        value = got.get("result", {}).get("value")
        if isinstance(value, dict) and "wheel" in value:  # the script asks for a mouse-wheel turn at (x, y)
            x, y, dy = value["wheel"]
            await self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=dy)
            # A grid that follows another catches up on the next wheel event: nudge it by a pixel.
            await asyncio.sleep(0.3)
            await self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=1)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = await self.text()
            if all(e in text for e in expected):
                return text
            await asyncio.sleep(0.25)
        raise AssertionError(f"after the script, {[e for e in expected if e not in text]} never appeared")

    async def screenshot(self, path: Path) -> None:
        await asyncio.sleep(0.5)  # let the last layout settle before capturing
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.contextmanager
def chromium(tmp_path: Path) -> Iterator[str]:
    """Headless chromium with a fresh profile; yields the DevTools HTTP endpoint; always stopped."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its helpers share the group, so one killpg stops them all
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


async def _visit(devtools: str, steps: list[tuple[str, list[str], Path | None]]) -> list[str]:
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.get(f"{devtools}/json/list") as resp:
            targets = await resp.json()
        target = next(t for t in targets if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            texts = []
            for url, expected, shot in steps:
                # "js:<script>" acts on the page already open (a click, a scroll) instead of navigating.
                texts.append(await (page.run(url[3:], expected) if url.startswith("js:") else page.open(url, expected)))
                if shot is not None:
                    await page.screenshot(shot)
            return texts


def test_run_page_shows_metrics_and_artifacts(logged: Logged, tmp_path: Path) -> None:
    shot = Path(tempfile.gettempdir()) / "quantgate_ui_run.png"
    page = run_url(logged.url, logged.experiment_id, logged.run_id)
    with chromium(tmp_path) as devtools:
        run_text, artifacts_text = asyncio.run(
            _visit(
                devtools,
                [
                    (page, ["int4_awq", "qg_cloze/acc", "0.8125", "wikitext/word_perplexity", "17.25"], shot),
                    (page.replace("?", "/artifacts?"), ["checkpoint"], None),
                ],
            )
        )
    assert "Finished" in run_text and "quantgate.decision" in run_text
    assert "qg-ui-model" in run_text  # the run links to the version it registered
    assert shot.stat().st_size > 10_000


def test_model_page_shows_aliases(logged: Logged, tmp_path: Path) -> None:
    shot = Path(tempfile.gettempdir()) / "quantgate_ui_model.png"
    with chromium(tmp_path) as devtools:
        (text,) = asyncio.run(
            _visit(
                devtools,
                [(model_url(logged.url, logged.model), ["Version 2", "Version 1", "@ production"], shot)],
            )
        )
    # Newest first: version 2 (failed) has only 'candidate'; 'production' stayed on version 1.
    v2, v1 = text.index("Version 2"), text.index("Version 1")
    assert v2 < text.index("@ candidate") < v1 < text.index("@ production")
    assert "REGRESSION" in text and "PASS" in text


# ---- a real matrix run, reviewed in the UI ----------------------------------------------------------


@dataclass
class Matrix:
    url: str
    experiment_id: str
    children: dict[str, Any]  # recipe -> MLflow run (info, data)
    parent: Any
    outcomes: dict[str, dict[str, Any]]
    output_dir: Path
    model: str
    client: Any


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Matrix]:
    """`quantgate run fp8.yaml int8_sq.yaml` on the tiny model into sqlite, then served."""
    import yaml

    from quantgate.tracking import _mlflow_client
    from tests.test_pipeline import LOOSE_GATE, quantgate

    ws = tmp_path_factory.mktemp("ui_matrix")
    uri = f"sqlite:///{(ws / 'mlruns' / 'mlflow.db').as_posix()}"
    base = {
        "model": {"source": str(tiny_model_dir)},
        "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64, "batch_size": 4},
        "engine": {"device": "cpu", "max_batch_size": 8, "max_input_len": 512, "max_seq_len": 640},
        "evaluation": {"limit": 10, "golden": {"max_new_tokens": 6}},
        "gate": LOOSE_GATE,
        "promotion": {"registered_model": "tiny-ui-matrix"},
        "tracking": {"uri": uri, "experiment": "qg-ui-matrix"},
        "output_dir": str(ws / "runs"),
    }
    (ws / "_base.yaml").write_text(yaml.safe_dump(base))
    for name in ("fp8", "int8_sq"):
        (ws / f"{name}.yaml").write_text(yaml.safe_dump({"extends": "_base.yaml", "name": name, "quantization": {"format": name}}))
    proc = quantgate(ws, "run", "fp8.yaml", "int8_sq.yaml", "--json")
    assert proc.returncode in (0, 1, 3), proc.stderr[-3000:]  # a verdict, whichever it is
    outcomes = {o["recipe"]: o for o in json.loads(proc.stdout)["recipes"]}
    assert set(outcomes) == {"fp8", "int8_sq"} and all(o["mlflow_run_id"] for o in outcomes.values()), outcomes
    client = _mlflow_client(uri)
    children = {name: client.get_run(o["mlflow_run_id"]) for name, o in outcomes.items()}
    parent_ids = {r.data.tags.get("mlflow.parentRunId") for r in children.values()}
    assert len(parent_ids) == 1 and None not in parent_ids, parent_ids
    parent = client.get_run(parent_ids.pop())
    with serve_ui(uri, port=free_port(), log_path=ws / "server.log", timeout=90) as url:
        yield Matrix(url=url, experiment_id=children["fp8"].info.experiment_id, children=children, parent=parent,
                     outcomes=outcomes, output_dir=ws / "runs", model="tiny-ui-matrix", client=client)


UI_QUERY = "?workflowType=machine_learning"  # as run_url/model_url: the classic ML view, not GenAI


# The run-name cell's expander of a parent run (MLflow nests a matrix's recipe runs under it).
EXPAND_PARENT = "document.querySelector('button[data-component-id*=runnamecellrenderer]').click()"
# The compare view's metrics table is two virtual grids (names, values; rows sorted by key, only
# those on screen rendered) that scroll together when a person turns the mouse wheel over the
# values: bring the table on screen and say where to turn the wheel, and how far, to show row %d
# (the metric) two rows below the top.
SHOW_ROW = """(() => {
  const a = document.querySelector("a[title='Plot chart']");
  let table = a;
  while (table.querySelectorAll('.ReactVirtualized__Grid').length < 2) table = table.parentElement;
  table.scrollIntoView({block: 'center'});
  const values = [...table.querySelectorAll('.ReactVirtualized__Grid')].find(g => getComputedStyle(g).overflowY === 'auto');
  const box = values.getBoundingClientRect();
  return {wheel: [box.left + box.width / 2, box.top + box.height / 2, Math.max(0, %d - 2) * parseFloat(a.parentElement.style.height)]};
})()"""
REPORT_LINK = "document.querySelector(\"a[href*='artifactPath/results/report.html']\").getAttribute('href')"


def _ui_number(value: float) -> str:
    """A metric as MLflow's UI prints it (Utils.formatMetric in MLflow 3.17's JavaScript)."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    rounded = math.floor(value * 10**digits + 0.5) / 10**digits  # JavaScript's Math.round
    return str(int(rounded)) if rounded == int(rounded) else repr(rounded)


@pytest.mark.server
def test_matrix_report_written_and_logged_to_parent(matrix: Matrix) -> None:
    from quantgate.runner import RecipeOutcome, matrix_dir_for

    outcomes = [RecipeOutcome.from_dict(matrix.outcomes[n]) for n in ("fp8", "int8_sq")]
    folder = matrix_dir_for(matrix.output_dir, outcomes)
    html = folder / "matrix_report.html"
    assert html.is_file() and (folder / "matrix_scatter.png").stat().st_size > 10_000
    text = html.read_text()
    assert 'data-recipe="fp8"' in text and 'data-recipe="int8_sq"' in text and "<svg" in text
    logged = {f.path for f in matrix.client.list_artifacts(matrix.parent.info.run_id, "results")}
    assert {"results/matrix_report.html", "results/matrix_scatter.png"} <= logged, logged
    tags = matrix.parent.data.tags
    decisions = {o["decision"] for o in matrix.outcomes.values()}
    assert tags["mlflow.runName"].startswith("matrix: fp8, int8_sq [") and any(d in tags["mlflow.runName"] for d in decisions)
    assert "| fp8 |" in tags["mlflow.note.content"] and "| int8_sq |" in tags["mlflow.note.content"]


@pytest.mark.server
def test_compare_view_runs_table_and_version_page(matrix: Matrix, tmp_path: Path) -> None:
    metric = "gate.qg_ppl.word_perplexity.delta"  # a gated check's worsening, one value per recipe
    fp8, sq = matrix.children["fp8"], matrix.children["int8_sq"]
    values = [_ui_number(r.data.metrics[metric]) for r in (fp8, sq)]
    row = sorted(set(fp8.data.metrics) | set(sq.data.metrics)).index(metric)
    names = [r.data.tags["mlflow.runName"] for r in (fp8, sq)]
    for run, name in zip((fp8, sq), ("fp8", "int8_sq"), strict=True):
        assert run.data.tags["mlflow.runName"] == f"{name} [{matrix.outcomes[name]['decision']}]"
    # The route the experiment page's "Compare" button opens (MLflow's getCompareRunPageRoute).
    ids = json.dumps([fp8.info.run_id, sq.info.run_id]).replace(" ", "")
    compare = f"{matrix.url}/#/compare-runs?runs={ids}&experiments={json.dumps([matrix.experiment_id])}"
    table = f"{matrix.url}/#/experiments/{matrix.experiment_id}/runs{UI_QUERY}"
    assert matrix.client.get_model_version(matrix.model, "1").run_id == fp8.info.run_id  # registered first
    decision = matrix.outcomes["fp8"]["decision"]
    version_page = f"{matrix.url}/#/models/{matrix.model}/versions/1{UI_QUERY}"
    reason_start = matrix.outcomes["fp8"]["reason"][:40]
    closing = "Deciding check" if decision != "PASS" else "Every gated check passed"
    compare_shot = Path(tempfile.gettempdir()) / "quantgate_ui_compare.png"
    version_shot = Path(tempfile.gettempdir()) / "quantgate_ui_version.png"
    runs_shot = Path(tempfile.gettempdir()) / "quantgate_ui_runs.png"
    with chromium(tmp_path) as devtools:
        _, compare_text, _, table_text, _, _ = asyncio.run(
            _visit(
                devtools,
                [
                    (compare, [*names, "Metrics"], None),
                    ("js:" + SHOW_ROW % row, [metric, *values], compare_shot),
                    (table, ["matrix: fp8, int8_sq ["], None),
                    ("js:" + EXPAND_PARENT, names, runs_shot),
                    (version_page, [f"{decision} (exit", reason_start, closing, "results/report.html"], version_shot),
                    # The description links to the run's report in the artifact viewer (throws if absent).
                    ("js:" + REPORT_LINK, [], None),
                ],
            )
        )
    assert table_text.index("matrix: fp8, int8_sq [") < min(table_text.index(n) for n in names)  # nested under it
    print(f"\ncompare view: {compare_shot}\nruns table: {runs_shot}\nversion page: {version_shot}")
    assert compare_shot.stat().st_size > 10_000 and version_shot.stat().st_size > 10_000
