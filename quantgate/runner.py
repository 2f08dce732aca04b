"""The runner: executes a plan (quantgate/plan.py) in a run directory and tells the sinks.

It owns what every run needs and no stage should: the run directory and its lock, the manifest
and resume, the clock, the log file and fault injection. Stages exchange artifacts; a persistent
stage's artifact is written to the run directory and read back on resume when its key (a hash of
its identity and its inputs' keys) is unchanged. Sinks (quantgate/sinks/) record the run: files,
MLflow, the Model Registry. A run directory whose stages and sinks are all complete is reported
from disk: nothing runs, nothing is uploaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantgate import formats
from quantgate.errors import ExitCode, QuantgateError, StageError
from quantgate.recipe import Recipe
from quantgate.rundir import Manifest, atomic_write_json, atomic_write_text, pid_lock
from quantgate.stages import MISSING, RunContext, Stage

log = logging.getLogger("quantgate")

# Worst first: a matrix run exits with its worst recipe's code.
SEVERITY = [ExitCode.ERROR, ExitCode.BAD_INPUT, ExitCode.REGRESSION, ExitCode.ANOMALOUS, ExitCode.INCONCLUSIVE, ExitCode.PASS]


def worst(codes: list[int]) -> int:
    # Nothing judged is not a pass (a gate fails closed).
    return min(codes, key=lambda c: SEVERITY.index(ExitCode(c))) if codes else int(ExitCode.ERROR)


@dataclass
class RecipeOutcome:
    recipe: str
    source: str
    format: str
    decision: str
    exit_code: int
    reason: str = ""
    run_dir: str = ""
    mlflow_run_id: str | None = None
    registered_version: str | None = None
    promoted: bool = False
    checkpoint_bytes: int | None = None
    baseline_cache: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    peak_gpu_bytes: dict[str, int] = field(default_factory=dict)
    one_time_costs: dict[str, float] = field(default_factory=dict)
    engine_memory_bytes: dict[str, int] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)
    log_file: str = ""
    reused: bool = False  # reported from a complete run directory; nothing ran

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeOutcome:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- clock, faults, logs, lock --------------------------------------------------------------------


def _cuda_in_use() -> Any:
    """torch.cuda when torch is already imported and a GPU is present (never imports torch)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def fault_point(stage: str) -> None:
    """Fault injection for the fault tests: QUANTGATE_KILL_IN=<stage> SIGKILLs this process inside
    that stage (after its start is logged), as an OOM killer or a preempted node would;
    QUANTGATE_FAIL_IN=<stage> raises an unexpected exception there, as a library bug would.
    QUANTGATE_KILL_ONCE=<file> makes the kill fire once across processes (the first to create the
    file dies; a retry, e.g. by Ray, gets through). QUANTGATE_PAUSE_IN=<stage> waits inside that
    stage until the file QUANTGATE_PAUSE_UNTIL exists (at most 5 minutes), so a test can hold a
    stage open while a second process races for the same work."""
    if os.environ.get("QUANTGATE_PAUSE_IN") == stage:
        _pause(os.environ.get("QUANTGATE_PAUSE_UNTIL", ""))
    if os.environ.get("QUANTGATE_FAIL_IN") == stage:
        raise RuntimeError(f"injected failure in stage {stage} (QUANTGATE_FAIL_IN)\nsecond line of the message")
    if os.environ.get("QUANTGATE_KILL_IN") == stage and _first_kill(os.environ.get("QUANTGATE_KILL_ONCE")):
        import signal

        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(release: str) -> None:
    deadline = time.monotonic() + 300
    while release and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)


def _first_kill(marker: str | None) -> bool:
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class StageClock:
    """Logs each stage's start, end and elapsed seconds; keeps timings and peak GPU memory."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.timings: dict[str, float] = {}
        self.peak_gpu_bytes: dict[str, int] = {}
        self.one_time_costs: dict[str, float] = {}  # engine load / warm-up per side (seconds; decode_* counts)
        self.memory: dict[str, int] = {}  # engine resident / load-peak / checkpoint bytes per side

    def note(self, side: str, costs: dict[str, float], memory: dict[str, int]) -> None:
        self.one_time_costs.update({f"{side}.{k}": round(float(v), 3) for k, v in costs.items()})
        self.memory.update({f"{side}.{k}": int(v) for k, v in memory.items() if isinstance(v, (int, float))})
        if costs:
            log.info("[%s] %s engine one-time costs: %s", self.prefix, side,
                     ", ".join(f"{k} {v:.1f} s" if k.endswith("_s") else f"{k} {v:g}" for k, v in costs.items()))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("[%s] %s: start", self.prefix, name)
        t0 = time.perf_counter()
        cuda = _cuda_in_use()
        if cuda:
            cuda.reset_peak_memory_stats()
        try:
            fault_point(name)
            yield
        except BaseException:
            log.info("[%s] %s: failed after %.1f s", self.prefix, name, time.perf_counter() - t0)
            raise
        dt = time.perf_counter() - t0
        self.timings[name] = round(self.timings.get(name, 0.0) + dt, 3)
        peak = ""
        cuda = cuda or _cuda_in_use()
        if cuda:
            self.peak_gpu_bytes[name] = max(self.peak_gpu_bytes.get(name, 0), int(cuda.max_memory_allocated()))
            peak = f", peak GPU memory {self.peak_gpu_bytes[name] / 2**30:.2f} GiB"
        log.info("[%s] %s: done in %.1f s%s", self.prefix, name, dt, peak)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """Everything logged during the run also goes to the run directory's run.log (with tracebacks)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One process per run directory. A second run of the same directory waits for the first
    (then finds its work done) instead of writing the same files at the same time."""
    with pid_lock(run_dir / ".lock",
                  lambda pid: log.warning("waiting: run directory %s is in use by another quantgate process (pid %s)", run_dir, pid)):
        yield


def run_dir_for(recipe: Recipe) -> Path:
    """Keyed by what changes the artifact and its evaluation only (not tracking, gate, promotion)."""
    return Path(recipe.output_dir) / f"{recipe.name}-{recipe.artifact_hash()[:10]}"


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---- executing a plan -------------------------------------------------------------------------------


class Run:
    """One recipe's run in its run directory: the plan, the artifacts so far, the outcome."""

    def __init__(self, recipe: Recipe, source: str, stages: list[Stage], run_dir: Path, baseline_memo: dict[str, Any]) -> None:
        self.recipe, self.source, self.stages, self.run_dir = recipe, source, stages, run_dir
        self.clock = StageClock(recipe.name)
        self.ctx = RunContext(recipe, run_dir, self.clock, baseline_memo)
        self.manifest = Manifest(run_dir)
        self.values: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.producers = {s.produces: s for s in stages}
        fmt = formats.get_format(recipe.quantization.format)
        self.outcome = RecipeOutcome(recipe.name, source, fmt.name, "ERROR", int(ExitCode.ERROR), run_dir=str(run_dir), log_file=str(run_dir / "run.log"))

    # keys: a stage's key hashes its identity with its inputs' keys, so a change anywhere upstream
    # re-runs everything downstream, and a change of gate thresholds only re-runs the gate.
    def key(self, stage: Stage) -> str:
        if stage.name not in self.keys:
            upstream = [self.key(self.producers[n]) for n in stage.needs]
            own = stage.value_key(self.get(stage.produces)) if stage.always else None
            self.keys[stage.name] = _key(type(stage).__name__, stage.identity(self.recipe), upstream, own)
        return self.keys[stage.name]

    def reusable(self, stage: Stage) -> bool:
        entry = self.manifest.data["stages"].get(stage.name)
        return bool(stage.persistent and entry and entry.get("key") == self.key(stage))

    def get(self, name: str) -> Any:
        """The artifact `name`: already in memory, read back from the run directory, or made now."""
        if name in self.values:
            return self.values[name]
        stage = self.producers[name]
        if not stage.always and self.reusable(stage):
            value = stage.load(self.ctx)
            if value is not MISSING:
                log.info("resume: %s already complete", stage.name)
                self.reused.append(stage.name)
                self.values[name] = value
                return value
        inputs = {n: self.get(n) for n in stage.needs}
        with self.clock.stage(stage.name):
            value = stage.run(self.ctx, **inputs)
        details = stage.save(self.ctx, value)
        self.values[name] = value
        self.ran.append(stage.name)
        if not stage.always:
            self.manifest.data["stages"][stage.name] = {**details, "key": self.key(stage)}
            self.manifest.set("stages", self.manifest.data["stages"])
        return value

    def skippable(self, stage: Stage) -> bool:
        """An in-memory stage (calibration) whose consumers are all complete need not run."""
        if stage.persistent or stage.always:
            return False
        consumers = [s for s in self.stages if stage.produces in s.needs]
        return bool(consumers) and all(self.reusable(s) or self.skippable(s) for s in consumers)

    def prefetch(self) -> None:
        """Let each stage that will run start its background one-time work (Stage.prefetch)."""
        for stage in self.stages:
            if not self.skippable(stage) and not self.reusable(stage):
                stage.prefetch(self.ctx)

    def release_unneeded(self, done: int) -> None:
        """Drop in-memory artifacts (the calibrated model) that no later stage needs."""
        later = {n for s in self.stages[done + 1 :] for n in s.needs}
        for s in self.stages[: done + 1]:
            if not s.persistent and not s.always and s.produces in self.values and s.produces not in later:
                del self.values[s.produces]
                from quantgate.stages.baseline import release_memory

                release_memory()

    def complete(self, sinks: list[Any]) -> RecipeOutcome | None:
        """The stored outcome when every stage and every sink is done with today's keys."""
        path = self.run_dir / "outcome.json"
        if not path.is_file() or not all(s.always or not s.persistent or self.reusable(s) for s in self.stages):
            return None
        result_key = self.result_key()
        if not all(self.manifest.data.get("sinks", {}).get(s.name) == s.key(self, result_key) for s in sinks):
            return None
        stored = RecipeOutcome.from_dict(json.loads(path.read_text()))
        return None if stored.exit_code == ExitCode.ERROR else stored

    def result_key(self) -> str:
        return _key([self.key(s) for s in self.stages])

    def mark_sink(self, sink: Any) -> None:
        sinks = self.manifest.data.setdefault("sinks", {})
        sinks[sink.name] = sink.key(self, self.result_key())
        self.manifest.set("sinks", sinks)

    def sink_done(self, sink: Any) -> bool:
        return self.manifest.data.get("sinks", {}).get(sink.name) == sink.key(self, self.result_key())


def run_recipe(recipe: Recipe, source: str, *, fresh: bool = False, baseline_memo: dict[str, Any] | None = None, parent: Any = None) -> RecipeOutcome:
    from quantgate.plan import plan
    from quantgate.sinks import default_sinks

    run_dir = run_dir_for(recipe)
    with run_dir_lock(run_dir):
        if fresh:
            for p in run_dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        run = Run(recipe, source, plan(recipe), run_dir, baseline_memo if baseline_memo is not None else {})
        if "run_key" not in run.manifest.data:
            run.manifest.set("run_key", f"{run_dir.name}-{uuid.uuid4().hex[:8]}")
        sinks = default_sinks(recipe, parent)
        with log_file(run_dir / "run.log"):
            return _execute(run, sinks)


def _execute(run: Run, sinks: list[Any]) -> RecipeOutcome:
    outcome = run.outcome
    try:
        stored = run.complete(sinks)
        if stored is not None:
            log.info("[%s] run directory %s is complete (%s): reporting the stored outcome; nothing re-run, nothing uploaded", run.recipe.name, run.run_dir, stored.decision)
            stored.reused = True
            return stored
        from quantgate.sinks import public_recipe_yaml

        atomic_write_text(run.run_dir / "recipe.yaml", public_recipe_yaml(run.recipe))
        for sink in sinks:
            sink.run_start(run)
        run.prefetch()
        for i, stage in enumerate(run.stages):
            if run.skippable(stage):
                continue
            value = run.get(stage.produces)
            for sink in sinks:
                sink.stage_done(run, stage, value)
            run.release_unneeded(i)
        _fill_outcome(run)
        for sink in sinks:
            if not run.sink_done(sink):
                sink.run_done(run)
                run.mark_sink(sink)
            else:
                sink.reuse(run)
    except Exception as err:
        _fail(run, outcome, err)
        for sink in sinks:
            try:
                sink.run_failed(run)
            except Exception as sink_err:  # never mask the first error
                log.warning("[%s] %s sink could not record the failure: %s", run.recipe.name, sink.name, str(sink_err).splitlines()[0] if str(sink_err) else type(sink_err).__name__)
    outcome.timings, outcome.peak_gpu_bytes = run.clock.timings, run.clock.peak_gpu_bytes
    outcome.one_time_costs, outcome.engine_memory_bytes = run.clock.one_time_costs, run.clock.memory
    atomic_write_json(run.run_dir / "outcome.json", outcome.to_dict())
    return outcome


def _fill_outcome(run: Run) -> None:
    o = run.outcome
    verdict, baseline, ckpt = run.get("verdict"), run.get("baseline"), run.get("checkpoint")
    o.decision, o.exit_code, o.reason = verdict.decision.value, int(verdict.exit_code), verdict.reason
    o.checks = [c.model_dump(mode="json") for c in verdict.checks]
    o.deltas = {c.name: c.delta for c in verdict.checks if c.delta is not None}
    o.checkpoint_bytes = ckpt.size_bytes
    o.baseline_cache = f"{'hit' if baseline.cache_hit else 'miss'} {baseline.key}"
    o.timings, o.peak_gpu_bytes = run.clock.timings, run.clock.peak_gpu_bytes
    o.one_time_costs, o.engine_memory_bytes = run.clock.one_time_costs, run.clock.memory
    from quantgate.report import verdict_table

    log.info("gate verdict for %s:\n%s", run.recipe.name, verdict_table(verdict))


def _fail(run: Run, outcome: RecipeOutcome, err: Exception) -> None:
    """One line for the user (the outcome's reason); the traceback goes to run.log only."""
    if isinstance(err, QuantgateError):
        outcome.reason, outcome.exit_code = str(err), int(err.exit_code)
        with _traceback_to_file_only():
            log.error("%s", err, exc_info=not isinstance(err, StageError) or err.__cause__ is not None)
    else:
        first = str(err).splitlines()[0] if str(err) else ""
        outcome.reason, outcome.exit_code = f"{type(err).__name__}: {first}", int(ExitCode.ERROR)
        with _traceback_to_file_only():
            log.exception("run failed")
    outcome.decision = "BAD_INPUT" if outcome.exit_code == ExitCode.BAD_INPUT else "ERROR"


@contextlib.contextmanager
def _traceback_to_file_only() -> Iterator[None]:
    """Console handlers show the error's first line only; file handlers keep the traceback."""
    filters = []
    for h in logging.getLogger().handlers:
        if not isinstance(h, logging.FileHandler):
            f = _OneLine()
            h.addFilter(f)
            filters.append((h, f))
    try:
        yield
    finally:
        for h, f in filters:
            h.removeFilter(f)


class _OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return True


# ---- many recipes ------------------------------------------------------------------------------


def run_recipes(recipes: list[tuple[Recipe, str]], *, fresh: bool = False, executor: str = "local") -> list[RecipeOutcome]:
    """Run recipes against one baseline on an executor (quantgate/executors: `local` in this
    process, `ray` one task per recipe). More than one: a parent MLflow run, a child per recipe
    (the local executor opens the parent only when a child has something to record); the matrix
    report and the parent's summary are written here, in the driver."""
    from quantgate.executors import Job, get_executor
    from quantgate.sinks.mlflow import MatrixParent

    runner = get_executor(executor)
    jobs = [Job(recipe, source, fresh) for recipe, source in recipes]
    parent = MatrixParent(recipes[0][0], [r.name for r, _ in recipes]) if len(recipes) > 1 else None
    try:
        outcomes = runner.run(jobs, parent=parent)
    finally:
        runner.close()
    if parent is None:
        return outcomes
    parent.discard_if_empty(outcomes)  # an eagerly opened parent (ray) whose children all were complete
    report = _matrix_report(Path(recipes[0][0].output_dir), outcomes)
    if report is not None:
        log.info("matrix report: %s", report)
    parent.close(outcomes, matrix_table(outcomes), report)
    return outcomes


def matrix_dir_for(output_dir: Path, outcomes: list[RecipeOutcome]) -> Path:
    """One folder per set of recipes and run directories: the same matrix rewrites its report,
    another matrix (other recipes, or a recipe whose artifact changed) gets its own."""
    return output_dir / f"matrix-{_key([(o.recipe, Path(o.run_dir).name) for o in outcomes])[:10]}"


def _matrix_report(output_dir: Path, outcomes: list[RecipeOutcome]) -> Path | None:
    """The matrix's HTML report (a diagnostic: a report that cannot be drawn never fails the run)."""
    run_dirs = [Path(o.run_dir) for o in outcomes if o.run_dir and Path(o.run_dir).is_dir()]
    if not run_dirs:
        return None
    try:
        from quantgate.reports.html import write_matrix_report

        return write_matrix_report(run_dirs, matrix_dir_for(output_dir, outcomes))
    except Exception as err:
        log.warning("matrix HTML report not written: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def matrix_table(outcomes: list[RecipeOutcome]) -> str:
    keys = sorted({k for o in outcomes for k in o.deltas})
    head = ["recipe", "format", "ckpt MB", *keys, "verdict"]
    rows = [[o.recipe, o.format, f"{(o.checkpoint_bytes or 0) / 1e6:.1f}", *[f"{o.deltas[k]:+.4g}" if k in o.deltas else "-" for k in keys], o.decision] for o in outcomes]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt_row = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False))  # noqa: E731
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths]), *map(fmt_row, rows)])
