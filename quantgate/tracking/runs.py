"""One MLflow run: RunTracker (params, metrics, tags, artifacts; FAILED with a reason on errors).

Every MLflow call goes through `_call`: a failure becomes a one-line TrackingError (redacted, no
URL with credentials), and once the store could not be reached the tracker is *broken*: every
later call fails at once instead of waiting out MLflow's retries again, and `fail`/`end` become
no-ops so the caller can still write its results locally. The next attempt closes the
abandoned run (see registry.close_interrupted_run).
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from quantgate.tracking.common import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    TAG_FAILURE,
    TAG_MISSING_METRICS,
    TAG_PARENT_RUN,
    TrackingError,
    _mlflow_client,
    _one_line,
    _truncate,
)
from quantgate.tracking.redaction import _redacted_copy, redact, redact_params, sanitize_key
from quantgate.tracking.uri import (
    check_store,
    describe_failure,
    resolve_tracking_uri,
    tracking_failure,
)

if TYPE_CHECKING:
    from types import TracebackType

    from mlflow import MlflowClient

    from quantgate.recipe import TrackingSpec

log = logging.getLogger("quantgate.tracking")
T = TypeVar("T")

# Failures that mean "the store is gone", after which retrying each later call only adds waiting.
_UNREACHABLE = ("connection refused", "timed out", "unknown host", "no route to host")


def is_unreachable(err: BaseException) -> bool:
    text = str(err)
    return describe_failure(err) in _UNREACHABLE or "Max retries exceeded" in text or "ConnectionError" in type(err).__name__


def _is_tracking_failure(err: BaseException) -> bool:
    """Errors raised by MLflow or the HTTP/database stack under it (not quantgate's own bugs)."""
    mod = type(err).__module__.split(".", 1)[0]
    return mod in {"mlflow", "requests", "urllib3", "sqlalchemy", "sqlite3", "psycopg2", "alembic"} or isinstance(
        err, (ConnectionError, TimeoutError)
    )


class RunTracker:
    """One MLflow run as a context manager.

    ```
    with RunTracker(recipe.tracking, "int4_awq", tags={...}) as run:
        run.log_params(flatten(recipe.to_dict()))
        run.log_metrics({"qg_cloze/acc": 0.61})
    ```
    Leaving the block normally (or via SystemExit(0)) ends the run FINISHED; any exception,
    KeyboardInterrupt or non-zero SystemExit ends it FAILED with tag `quantgate.failure` = one line.
    `parent_run_id` or `nested_under` (a RunTracker) make it a child run (tag mlflow.parentRunId).
    Uses MlflowClient with explicit run ids (no fluent active-run stack), so parent and child
    trackers can be open at the same time.
    """

    def __init__(
        self,
        spec: TrackingSpec | str,
        run_name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested_under: RunTracker | None = None,
        experiment: str | None = None,
    ) -> None:
        if parent_run_id and nested_under is not None and nested_under.run_id != parent_run_id:
            raise ValueError("give parent_run_id or nested_under, not two different parents")
        self.spec = spec
        self.run_name = run_name
        self._nested_under = nested_under
        self._parent_run_id = parent_run_id or (nested_under.run_id if nested_under else None)
        self._tags = dict(tags or {})
        if experiment is None:
            experiment = nested_under.experiment_name if nested_under else (
                "quantgate" if isinstance(spec, str) else spec.experiment
            )
        self.experiment_name: str = experiment
        self.uri: str | None = nested_under.uri if nested_under else None
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._artifact_uri: str | None = None
        self._ended = False
        self._status: str | None = None
        self._params: dict[str, str] = {}
        self._missing: set[str] = set()
        self._broken: TrackingError | None = None

    # -- lifecycle --
    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def start(self) -> RunTracker:
        if self._run_id is not None:
            raise RuntimeError("this RunTracker was already started")
        if self.uri is None:
            self.uri = resolve_tracking_uri(self.spec)
        # No mlflow.set_tracking_uri(): in MLflow 3.17 it also writes MLFLOW_TRACKING_URI into
        # os.environ, which would then override the next recipe's tracking.uri in this process.
        # Bounded in time: an unreachable store fails here, in seconds, with one line.
        self._experiment_id = check_store(self.uri, self.experiment_name)
        self._client = _mlflow_client(self.uri)
        tags: dict[str, Any] = {
            "mlflow.user": _user(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "quantgate",
        }
        if self._parent_run_id:
            tags[TAG_PARENT_RUN] = self._parent_run_id
        tags.update(self._tags)
        client, experiment_id = self._client, self._experiment_id
        run = self._call(
            "creating a run",
            lambda: client.create_run(experiment_id, run_name=self.run_name, tags=self._clean_tags(tags)),
        )
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._ended or self._run_id is None:
            return False
        if exc is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.end("FINISHED")
            return False
        try:
            self.fail(failure_reason(exc))
        except Exception as err:  # never hide the original exception behind a tracking error
            log.warning("could not mark MLflow run %s FAILED: %s", self._run_id, _one_line(str(err), 300))
        return False

    def fail(self, reason: str) -> None:
        """End the run FAILED now, with tag `quantgate.failure` = `reason` (one line, redacted)."""
        client, run_id = self._active()
        if self._broken is not None:  # the store is gone: the next attempt closes this run
            self._ended, self._status = True, "FAILED"
            return
        text = _truncate(_one_line(redact(reason)), MAX_TAG_VALUE_LENGTH)
        self._call("recording the failure", lambda: client.set_tag(run_id, TAG_FAILURE, text))
        self.end("FAILED")

    def end(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status (FINISHED, FAILED, KILLED). Idempotent."""
        if self._ended:
            return
        client, run_id = self._active()
        if self._broken is None:
            self._call("ending the run", lambda: client.set_terminated(run_id, status=status))
        self._ended = True
        self._status = status

    # -- properties --
    @property
    def run_id(self) -> str:
        return self._active()[1]

    @property
    def artifact_uri(self) -> str:
        self._active()
        assert self._artifact_uri is not None
        return self._artifact_uri

    @property
    def experiment_id(self) -> str:
        self._active()
        assert self._experiment_id is not None
        return self._experiment_id

    @property
    def client(self) -> MlflowClient:
        return self._active()[0]

    @property
    def status(self) -> str | None:
        """None while running, else the status the run was ended with."""
        return self._status

    def child(self, run_name: str, *, tags: Mapping[str, Any] | None = None) -> RunTracker:
        """A RunTracker for a child run of this one (same store and experiment)."""
        return RunTracker(self.spec, run_name, tags=tags, nested_under=self)

    def _active(self) -> tuple[MlflowClient, str]:
        if self._client is None or self._run_id is None:
            raise RuntimeError("the run has not started; use `with RunTracker(...) as run:`")
        return self._client, self._run_id

    @property
    def broken(self) -> TrackingError | None:
        """The error that made the store unreachable during this run, else None."""
        return self._broken

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one MLflow call: fail at once if the store was lost, else turn MLflow's failure
        into a one-line TrackingError (and remember it when the store is unreachable)."""
        if self._broken is not None:
            raise TrackingError(str(self._broken))
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as err:
            if not _is_tracking_failure(err):
                raise
            failure = tracking_failure(self.uri or "", what, err)
            if is_unreachable(err):
                self._broken = failure
            raise failure from err

    # -- logging --
    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {
            sanitize_key(k): _truncate(v, MAX_TAG_VALUE_LENGTH) for k, v in redact_params(tags).items()
        }

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log params (redacted, cut to MLflow's 6000 chars) in batches of 100.

        MLflow params are write-once: logging a key again with the same value is a no-op, with a
        different value a TrackingError.
        """
        from mlflow.entities import Param

        client, run_id = self._active()
        todo: dict[str, str] = {}
        for key, value in redact_params(flat).items():
            k, v = sanitize_key(key), _truncate(value, MAX_PARAM_VALUE_LENGTH)
            if k in self._params or k in todo:
                old = self._params.get(k, todo.get(k))
                if old != v:
                    raise TrackingError(f"param {k!r} was already logged as {old!r}; MLflow params cannot change")
                continue
            todo[k] = v
        items = list(todo.items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            batch = [Param(k, v) for k, v in items[i : i + PARAMS_PER_BATCH]]
            self._call("logging params", lambda b=batch: client.log_batch(run_id, params=b, synchronous=True))
            self._params.update(items[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None) -> list[str]:
        """Log finite-or-infinite numbers; NaN, None and non-numbers are skipped and their names
        kept in tag `quantgate.missing_metrics` (comma-separated). Returns the names skipped now."""
        from mlflow.entities import Metric

        client, run_id = self._active()
        now = int(time.time() * 1000)
        good: list[Metric] = []
        missing: list[str] = []
        for key, value in metrics.items():
            k = sanitize_key(key)
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                number = math.nan
            if math.isnan(number):
                missing.append(k)
                continue
            good.append(Metric(k, number, now, step or 0))
        for i in range(0, len(good), METRICS_PER_BATCH):
            chunk = good[i : i + METRICS_PER_BATCH]
            self._call("logging metrics", lambda c=chunk: client.log_batch(run_id, metrics=c, synchronous=True))
        logged = {m.key for m in good}
        before = set(self._missing)
        self._missing = (self._missing | set(missing)) - logged
        if self._missing != before:
            value = ",".join(sorted(self._missing))
            self._call("setting a tag", lambda: client.set_tag(run_id, TAG_MISSING_METRICS, _truncate(value, MAX_TAG_VALUE_LENGTH)))
        return missing

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values redacted; secret-named keys get '***')."""
        from mlflow.entities import RunTag

        client, run_id = self._active()
        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            chunk = items[i : i + PARAMS_PER_BATCH]
            self._call("setting tags", lambda c=chunk: client.log_batch(run_id, tags=c, synchronous=True))

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *, redact_text: bool = True) -> str:
        """Upload one file; text files are redacted first (a redacted copy is uploaded, the local
        file is left alone). Returns the artifact's path inside the run."""
        client, run_id = self._active()
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"artifact to log is not a file: {src}")
        with _redacted_copy(src, redact_text) as upload:
            self._call(f"uploading {src.name}", lambda: client.log_artifact(run_id, str(upload), artifact_path))
        return f"{artifact_path.strip('/')}/{src.name}" if artifact_path else src.name

    def log_artifacts(
        self, local_dir: str | Path, artifact_path: str | None = None, *, redact_text: bool = True
    ) -> None:
        """Upload a directory tree (text files redacted unless `redact_text=False`)."""
        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"artifact folder to log is not a folder: {root}")
        client, run_id = self._active()
        if not redact_text:
            self._call(f"uploading {root.name}/", lambda: client.log_artifacts(run_id, str(root), artifact_path))
            return
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            rel_parent = file.parent.relative_to(root).as_posix()
            parts = [p for p in (artifact_path, rel_parent) if p and p != "."]
            self.log_artifact(file, "/".join(parts) or None, redact_text=True)

    def log_checkpoint(self, local_dir: str | Path, artifact_path: str = "checkpoint") -> str:
        """Upload an exported checkpoint byte-for-byte (never redacted: a registered model must be
        exactly what was evaluated). Returns `artifact_path`, ready for register_checkpoint."""
        self.log_artifacts(local_dir, artifact_path, redact_text=False)
        return artifact_path

    def log_text(self, text: str, artifact_file: str) -> None:
        client, run_id = self._active()
        self._call(f"uploading {artifact_file}", lambda: client.log_text(run_id, redact(text), artifact_file))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Write `data` as JSON (or YAML for .yaml/.yml) text, redacted."""
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2, sort_keys=False, default=str)
        self.log_text(text, artifact_file)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return "unknown"


def failure_reason(exc: BaseException) -> str:
    """One line naming what ended a run: 'KeyboardInterrupt: interrupted', 'StageError: calibrate: ...'."""
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted"
    if isinstance(exc, SystemExit):
        return f"SystemExit: exit code {exc.code}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return _one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

