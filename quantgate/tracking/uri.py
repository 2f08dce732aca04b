"""Tracking URI policy and the store: where runs go, creating a store safely, checking it answers.

Store policy (MLflow 3.17):
- The default store is sqlite. A relative `sqlite:///mlruns/mlflow.db` is resolved against the
  working directory to an absolute URI (the same store then works from `quantgate ui` and from
  child processes started elsewhere) and its folder is created.
- A plain path or `file:` URI (MLflow's legacy file store) is refused with a RecipeError that names
  the sqlite URI to use instead, because MLflow 3.17 refuses the file store unless
  MLFLOW_ALLOW_FILE_STORE=true; with that variable set it is passed through (made absolute).
- For a local sqlite store, each experiment's artifacts are pinned next to the database:
  `<db folder>/artifacts/<experiment>`. For an http(s) server the server decides
  (`mlflow-artifacts:/` when it proxies artifacts).
- A new database store is created under a file lock (MLflow creates its schema on first use, and
  two processes doing that at once crash with `table ... already exists`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import RecipeError
from quantgate.tracking.common import (
    TrackingError,
    _error_code,
    _mlflow_client,
    _one_line,
    configure_mlflow_env,
)
from quantgate.tracking.redaction import redact, redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from quantgate.recipe import TrackingSpec

log = logging.getLogger("quantgate.tracking")

def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _split_query(rest: str) -> tuple[str, str]:
    path, sep, query = rest.partition("?")
    return path, (sep + query)


def normalize_tracking_uri(uri: str, *, source: str = "recipe", key: str = "tracking.uri") -> str:
    """Make `uri` usable from any working directory (no environment lookup).

    sqlite: relative paths become absolute and the database folder is created. http(s) and other
    database URIs pass unchanged. Plain paths and `file:` URIs are refused (see module docstring).
    """
    uri = uri.strip()
    if not uri:
        raise RecipeError(source, key, "empty tracking URI; use e.g. sqlite:///mlruns/mlflow.db")
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise RecipeError(source, key, f"{redact(uri)!r}: expected sqlite:///<path to .db file>")
        path_txt, query = _split_query(uri[len("sqlite:///"):])
        if path_txt in ("", ":memory:"):
            raise RecipeError(source, key, "an in-memory sqlite store keeps nothing; give a .db file path")
        # sqlite:////abs -> path_txt '/abs'; sqlite:///rel -> 'rel' (relative to the cwd).
        path = Path(path_txt).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        path = path.resolve()
        if path.is_dir():
            raise RecipeError(source, key, f"{path.name!r} is a folder; point the sqlite URI at a .db file inside it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecipeError(source, key, f"cannot create the store folder {path.parent.name!r}: {err.strerror}") from None
        return f"sqlite:///{path.as_posix()}{query}"  # an absolute path: sqlite:////abs/x.db
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if scheme == "file" or not scheme or len(scheme) == 1:  # len 1: a Windows drive letter
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path)) if scheme == "file" else Path(uri).expanduser()
        if _truthy(os.environ.get("MLFLOW_ALLOW_FILE_STORE")):
            return (path if path.is_absolute() else Path.cwd() / path).resolve().as_uri()
        suggestion = (path / "mlflow.db") if path.suffix != ".db" else path
        raise RecipeError(
            source,
            key,
            f"{redact(uri)!r} is an MLflow file store, which MLflow 3.17 refuses; use "
            f"'sqlite:///{suggestion.as_posix()}' (or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store)",
        )
    return uri


def resolve_tracking_uri(spec: TrackingSpec | str, *, source: str = "recipe") -> str:
    """The tracking URI to use: MLFLOW_TRACKING_URI if set, else the recipe's, made absolute."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return normalize_tracking_uri(env, source="MLFLOW_TRACKING_URI", key="")
    uri = spec if isinstance(spec, str) else spec.uri
    return normalize_tracking_uri(uri, source=source)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an (already normalized) sqlite URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path_txt, _ = _split_query(uri[len("sqlite:///"):])
    return Path(path_txt)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def default_artifact_root(uri: str) -> str | None:
    """Where a local sqlite store keeps artifacts (`<db folder>/artifacts`); None: let MLflow/server decide."""
    db = sqlite_path(uri)
    return str(db.parent / "artifacts") if db is not None else None


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "experiment"


def experiment_artifact_location(uri: str, experiment: str) -> str | None:
    """Pinned artifact location of a new experiment: `<db folder>/artifacts/<experiment>`."""
    root = default_artifact_root(uri)
    return str(Path(root) / _safe_dir_name(experiment)) if root is not None else None


def _current_uri(tracking_uri: str | TrackingSpec | None) -> str:
    """An explicit URI or spec, else quantgate's default store (never MLflow's ./mlflow.db)."""
    if isinstance(tracking_uri, str):
        return normalize_tracking_uri(tracking_uri, source="tracking URI", key="")
    if tracking_uri is None:
        from quantgate.recipe import TrackingSpec

        tracking_uri = TrackingSpec()
    return resolve_tracking_uri(tracking_uri)


# ---- creating a store --------------------------------------------------------------------------

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_ready: set[str] = set()
_ready_lock = threading.Lock()


def _store_lock_path(uri: str) -> Path | None:
    """The lock file guarding first-time creation of a database store; None: not a database."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DB_SCHEMES:
        return None
    db = sqlite_path(uri)
    if db is not None:  # beside the database: also serialises processes of other users/hosts on NFS
        return db.with_name(db.name + ".init.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"quantgate-store-{digest}.lock"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_store(uri: str) -> None:
    """Create a database store's schema once, under a file lock (no-op for servers, and after
    the first call per process)."""
    if uri in _ready:
        return
    lock = _store_lock_path(uri)
    if lock is None:
        return
    from mlflow import MlflowClient

    with _ready_lock, _file_lock(lock):
        if uri in _ready:
            return
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # The first call of each kind builds MLflow's SqlAlchemy store, which creates the tables.
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
        _ready.add(uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Id of experiment `name`, created (artifacts pinned for local sqlite) or restored if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = experiment_artifact_location(uri, name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            # Another process created it first (ALREADY_EXISTS, or a unique-key error from a server).
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            log.debug("experiment %r was created concurrently (%s)", name, _error_code(err))
    if not is_remote(uri) and str(exp.artifact_location).startswith("mlflow-artifacts:"):
        # Created through a tracking server that proxies artifacts: only that server can store
        # them, so fail now rather than after the evaluation when the first artifact is logged.
        raise TrackingError(
            f"experiment {name!r} keeps its artifacts behind a tracking server "
            f"({exp.artifact_location}); set MLFLOW_TRACKING_URI to that server's http:// URL "
            "or use another experiment name"
        )
    if exp.lifecycle_stage == "deleted":
        # A deleted experiment still owns its name; runs cannot start in it until it is restored.
        log.warning("MLflow experiment %r was deleted; restoring it", name)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# ---- is it there? ------------------------------------------------------------------------------

CHECK_TIMEOUT_S = 12.0

_CAUSES = (
    ("Connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("Name or service not known", "unknown host"),
    ("Temporary failure in name resolution", "unknown host"),
    ("No route to host", "no route to host"),
    ("401", "HTTP 401 (credentials rejected)"),
    ("403", "HTTP 403 (permission denied)"),
    ("readonly database", "the database is read-only"),
    ("unable to open database", "cannot open the database file"),
)


def describe_failure(err: BaseException) -> str:
    """A short, redacted reason for an MLflow/HTTP failure (never a URL with credentials)."""
    text = str(err)
    for needle, short in _CAUSES:
        if needle in text:
            return short
    return redact(_one_line(f"{type(err).__name__}: {text}", 200))


def tracking_failure(uri: str, what: str, err: BaseException | str) -> TrackingError:
    """The one-line TrackingError for `what` failing against `uri`: which store, what, how to fix."""
    reason = err if isinstance(err, str) else describe_failure(err)
    fix = (
        "start the server or point MLFLOW_TRACKING_URI / tracking.uri at a reachable one"
        if is_remote(uri)
        else "check the path and its permissions, or set MLFLOW_TRACKING_URI / tracking.uri"
    )
    return TrackingError(f"tracking store {redact_uri(uri)}: {what} failed ({reason}); {fix}")


def check_store(uri: str, experiment: str = "quantgate", *, timeout: float = CHECK_TIMEOUT_S) -> str:
    """Check within `timeout` seconds that the store answers and is writable (gets or creates
    `experiment`); returns its id, or raises a one-line TrackingError. Call before any real work.

    The MLflow calls run in a daemon thread: a black-holed host (no answer, no refusal) cannot
    hold the caller longer than `timeout`, whatever MLflow's own retry policy is.
    """
    configure_mlflow_env()
    box: dict[str, Any] = {}

    def probe() -> None:
        try:
            box["id"] = ensure_experiment(_mlflow_client(uri), experiment, uri)
        except BaseException as err:  # handed to the caller's thread
            box["err"] = err

    worker = threading.Thread(target=probe, name="quantgate-check-store", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise tracking_failure(uri, f"reaching experiment {experiment!r}", f"no answer within {timeout:.0f} s")
    err = box.get("err")
    if isinstance(err, TrackingError):
        raise err
    if err is not None:
        raise tracking_failure(uri, f"opening experiment {experiment!r}", err) from None
    return str(box["id"])
