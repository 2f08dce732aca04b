"""The MLflow edge of quantgate: tracking URIs, runs, redaction, the Model Registry and the UI.

Everything that touches MLflow lives here, and MLflow itself is imported lazily inside functions,
so `import quantgate.tracking` stays cheap for the CLI.

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
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import QuantgateError, RecipeError

if TYPE_CHECKING:
    from types import TracebackType

    from mlflow import MlflowClient

    from quantgate.recipe import PromotionSpec, TrackingSpec

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); kept here so they apply before a request is sent.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

CANDIDATE_ALIAS = "candidate"
TAG_FAILURE = "quantgate.failure"
TAG_MISSING_METRICS = "quantgate.missing_metrics"
TAG_DECISION = "quantgate.decision"
TAG_PASSED = "quantgate.passed"
TAG_REGISTERED_MODEL = "quantgate.registered_model"
TAG_MODEL_VERSION = "quantgate.model_version"
TAG_PARENT_RUN = "mlflow.parentRunId"  # what MLflow's own nested runs set; the UI nests on it

REDACTED = "***"
# MLflow 3.17's UI opens in its "GenAI" layout; this query selects the "Model training" one.
UI_QUERY = "?workflowType=machine_learning"


class TrackingError(QuantgateError):
    """MLflow could not do what was asked (store unreachable, server did not start, ...)."""


# ---- tracking URI ----------------------------------------------------------------------------


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


# ---- redaction -------------------------------------------------------------------------------

_SENSITIVE_WORDS = frozenset(
    {
        "token", "password", "passwd", "pwd", "pass", "secret", "key", "apikey", "credential",
        "credentials", "auth", "authorization", "sig", "signature", "passphrase", "cookie",
    }
)
_SENSITIVE_SUFFIXES = ("token", "password", "secret", "apikey", "accesskey", "secretkey", "credential")

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@?#]+)@")
_PAIR = re.compile(r"(?P<name>\b[A-Za-z_][\w.-]*)=(?P<val>[^&\s;,'\"#]+)")
_JSON_PAIR = re.compile(r'(?P<name>"[^"\n]{1,80}")(?P<sep>\s*:\s*)"(?P<val>[^"\n]*)"')
_YAML_PAIR = re.compile(r"(?m)^(?P<lead>[ \t]*(?:-[ \t]+)?)(?P<name>[A-Za-z_][\w.-]*)(?P<sep>[ \t]*:[ \t]+)(?P<val>[^\s#][^#\n]*?)[ \t]*$")
_BEARER = re.compile(r"(?i)\b(?P<kind>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_KNOWN_TOKENS = re.compile(r"\b(?P<prefix>hf_|ghp_|gho_|github_pat_|sk-|xox[abp]-)[A-Za-z0-9_-]{16,}")
_KEEP_VALUES = frozenset({"null", "~", "''", '""', "none", "None", REDACTED, f"'{REDACTED}'"})


def is_sensitive_name(name: str) -> bool:
    """True for names of secrets: hf_token, api-key, apiKey, DB_PASSWORD ... but not max_new_tokens.

    Matching is per word (split at separators and camelCase), so ordinary parameters that merely
    contain 'token' or 'key' as part of a longer word keep their values.
    """
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    words = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    if any(w in _SENSITIVE_WORDS or w.endswith(_SENSITIVE_SUFFIXES) for w in words):
        return True
    squashed = "".join(words)
    return squashed.endswith(_SENSITIVE_SUFFIXES) or squashed in _SENSITIVE_WORDS


def redact(value: str) -> str:
    """Strip credentials from a string: URI user:pass@, secret query/`k=v` pairs, bearer and
    well-known API tokens, and secret-named JSON/YAML entries. Idempotent."""
    if not value:
        return value
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", value)
    out = _PAIR.sub(lambda m: f"{m['name']}={REDACTED}" if is_sensitive_name(m["name"]) else m[0], out)
    out = _JSON_PAIR.sub(
        lambda m: f'{m["name"]}{m["sep"]}"{REDACTED}"'
        if is_sensitive_name(m["name"].strip('"')) and m["val"] not in ("", REDACTED)
        else m[0],
        out,
    )
    out = _YAML_PAIR.sub(
        lambda m: f"{m['lead']}{m['name']}{m['sep']}'{REDACTED}'"
        if is_sensitive_name(m["name"]) and m["val"] not in _KEEP_VALUES
        else m[0],
        out,
    )
    out = _BEARER.sub(lambda m: f"{m['kind']} {REDACTED}", out)
    return _KNOWN_TOKENS.sub(lambda m: f"{m['prefix']}{REDACTED}", out)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Every value as redacted text; values of secret-named keys become '***'."""
    return {
        str(k): REDACTED if is_sensitive_name(str(k)) else redact(_to_text(v)) for k, v in params.items()
    }


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 500) -> str:
    return _truncate(" ".join(text.split()), limit)


def sanitize_key(key: str) -> str:
    """A name MLflow accepts for a param/metric/tag: allowed characters, no '..', '//' or leading '/'."""
    cleaned = re.sub(r"[^/\w.\- :]", "_", str(key))
    parts = [p for p in cleaned.split("/") if p not in ("", ".", "..")]
    return _truncate("/".join(parts), MAX_KEY_LENGTH) or "_"


# ---- versions --------------------------------------------------------------------------------

_VERSIONED = ("quantgate", "nvidia-modelopt", "transformers", "lm-eval", "torch", "mlflow", "tensorrt-llm")


def _dist_version(name: str) -> str:
    from importlib import metadata

    for candidate in (name, name.replace("-", "_")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(candidate)
    if name == "quantgate":  # running from a source checkout that is not pip-installed
        from quantgate import __version__

        return __version__
    return "not installed"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def version_tags(cwd: str | Path | None = None) -> dict[str, str]:
    """Run tags with the versions of the stack (no heavy imports) and the git commit of `cwd`."""
    tags = {f"quantgate.version.{name}": _dist_version(name) for name in _VERSIONED}
    here = Path(cwd) if cwd is not None else Path.cwd()
    sha = _git(["rev-parse", "HEAD"], here)
    if sha:
        tags["quantgate.git.sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # shown as "Git commit" on the MLflow run page
        status = _git(["status", "--porcelain", "--untracked-files=no"], here)
        if status is not None:
            tags["quantgate.git.dirty"] = "true" if status else "false"
    return tags


# ---- experiments and runs --------------------------------------------------------------------


def _mlflow_client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(err: BaseException) -> str:
    return str(getattr(err, "error_code", ""))


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """Id of experiment `name`, created (artifacts pinned for local sqlite) or restored if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = experiment_artifact_location(uri, name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if "ALREADY_EXISTS" not in _error_code(err):  # another process created it first
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
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
        self._client = _mlflow_client(self.uri)
        try:
            self._experiment_id = ensure_experiment(self._client, self.experiment_name, self.uri)
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"MLflow store {redact(self.uri)}: {_one_line(str(err), 300)}") from err
        tags: dict[str, Any] = {
            "mlflow.user": _user(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "quantgate",
        }
        if self._parent_run_id:
            tags[TAG_PARENT_RUN] = self._parent_run_id
        tags.update(self._tags)
        run = self._client.create_run(
            self._experiment_id, run_name=self.run_name, tags=self._clean_tags(tags)
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
        client.set_tag(run_id, TAG_FAILURE, _truncate(_one_line(redact(reason)), MAX_TAG_VALUE_LENGTH))
        self.end("FAILED")

    def end(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status (FINISHED, FAILED, KILLED). Idempotent."""
        if self._ended:
            return
        client, run_id = self._active()
        client.set_terminated(run_id, status=status)
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
            client.log_batch(run_id, params=batch, synchronous=True)
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
            client.log_batch(run_id, metrics=good[i : i + METRICS_PER_BATCH], synchronous=True)
        logged = {m.key for m in good}
        before = set(self._missing)
        self._missing = (self._missing | set(missing)) - logged
        if self._missing != before:
            value = ",".join(sorted(self._missing))
            client.set_tag(run_id, TAG_MISSING_METRICS, _truncate(value, MAX_TAG_VALUE_LENGTH))
        return missing

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values redacted; secret-named keys get '***')."""
        from mlflow.entities import RunTag

        client, run_id = self._active()
        items = [RunTag(k, v) for k, v in self._clean_tags(tags).items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH], synchronous=True)

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
            client.log_artifact(run_id, str(upload), artifact_path)
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
            client.log_artifacts(run_id, str(root), artifact_path)
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
        client.log_text(run_id, redact(text), artifact_file)

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


_TEXT_SUFFIXES = frozenset(
    [".txt", ".log", ".json", ".jsonl", ".yaml", ".yml", ".md", ".csv", ".tsv", ".html", ".htm"]
    + [".ini", ".cfg", ".toml", ".xml", ".env", ".sh", ".py"]
)
_REDACT_MAX_BYTES = 50 * 1024 * 1024


@contextlib.contextmanager
def _redacted_copy(src: Path, enabled: bool) -> Iterator[Path]:
    """`src`, or a redacted copy with the same file name when redaction changes its text."""
    if not enabled or src.suffix.lower() not in _TEXT_SUFFIXES or src.stat().st_size > _REDACT_MAX_BYTES:
        yield src
        return
    try:
        text = src.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        yield src
        return
    clean = redact(text)
    if clean == text:
        yield src
        return
    log.info("redacted credentials in %s before logging it", src.name)
    with tempfile.TemporaryDirectory(prefix="qg_redact_") as tmp:
        copy = Path(tmp) / src.name
        copy.write_text(clean, encoding="utf-8")
        yield copy


# ---- Model Registry --------------------------------------------------------------------------


@dataclass
class Registration:
    """What register_checkpoint did. `version` and `previous_alias_version` are strings."""

    name: str
    version: str
    source: str
    aliases_set: list[str] = field(default_factory=list)
    promoted: bool = False
    previous_alias_version: str | None = None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


_ALIAS_RE = re.compile(r"^[\w-]+$")


def check_alias(alias: str, source: str = "recipe") -> None:
    """MLflow's alias rules (letters, digits, _ and -; not 'latest', not v<number>) plus ours."""
    key = "promotion.alias"
    if not _ALIAS_RE.match(alias) or len(alias) > 255:
        raise RecipeError(source, key, f"{alias!r}: use letters, digits, '_' and '-' only")
    if alias.lower() == "latest" or re.match(r"^[vV]\d+$", alias):
        raise RecipeError(source, key, f"{alias!r} is reserved by MLflow; pick e.g. 'production'")
    if alias == CANDIDATE_ALIAS:
        raise RecipeError(source, key, f"{alias!r} is set on every registered candidate; pick e.g. 'production'")


def alias_version(
    name: str,
    alias: str,
    *,
    tracking_uri: str | TrackingSpec | None = None,
    client: MlflowClient | None = None,
) -> str | None:
    """Version (as a string) that `alias` points to, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    client = client or _mlflow_client(_current_uri(tracking_uri))
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(err) or "INVALID_PARAMETER_VALUE" in _error_code(err):
            return None
        raise
    return str(mv.version)  # an int on sqlite, a str elsewhere


def _current_uri(tracking_uri: str | TrackingSpec | None) -> str:
    """An explicit URI or spec, else quantgate's default store (never MLflow's ./mlflow.db)."""
    if isinstance(tracking_uri, str):
        return normalize_tracking_uri(tracking_uri, source="tracking URI", key="")
    if tracking_uri is None:
        from quantgate.recipe import TrackingSpec

        tracking_uri = TrackingSpec()
    return resolve_tracking_uri(tracking_uri)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))(?P<path>/.*)?$")


def download_artifacts(artifact_uri: str, dst_path: str | Path, *, tracking_uri: str) -> Path:
    """Download `models:/name@alias[/path]`, `models:/name/3[/path]`, `runs:/<id>/path` or a plain
    artifact URI from the store at `tracking_uri`; nothing global is read or changed.

    models:/ and runs:/ are resolved here because MLflow 3.17 resolves `models:/` against the
    global registry URI even when `mlflow.artifacts.download_artifacts(registry_uri=...)` is given.
    """
    from mlflow.artifacts import download_artifacts as _download

    Path(dst_path).mkdir(parents=True, exist_ok=True)
    client = _mlflow_client(tracking_uri)
    if artifact_uri.startswith("runs:/"):
        run_id, _, path = artifact_uri[len("runs:/"):].partition("/")
        return Path(client.download_artifacts(run_id, path, str(dst_path)))
    match = _MODELS_URI.match(artifact_uri)
    if match:
        name = match["name"]
        version = match["version"] or str(client.get_model_version_by_alias(name, match["alias"]).version)
        artifact_uri = client.get_model_version_download_uri(name, version).rstrip("/") + (match["path"] or "")
    elif artifact_uri.startswith("models:"):
        raise ValueError(f"{artifact_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    got = _download(artifact_uri=artifact_uri, dst_path=str(dst_path), tracking_uri=tracking_uri)
    return Path(got)


def _decision_text(decision: Any) -> str:
    return str(getattr(decision, "value", decision)).upper()


def register_checkpoint(
    tracker_or_run_id: RunTracker | str,
    checkpoint_artifact_path: str,
    promotion: PromotionSpec,
    *,
    passed: bool,
    decision: str,
    tags: Mapping[str, Any],
    tracking_uri: str | TrackingSpec | None = None,
) -> Registration | None:
    """Register the run's checkpoint folder as a new model version and move aliases.

    Always: creates the registered model if absent, creates version N with source
    `<run artifact_uri>/<checkpoint_artifact_path>`, tags it with the verdict and `tags` (lineage),
    points alias `candidate` at it. Only when `passed`: moves `promotion.alias` to it; otherwise
    the alias stays where it was. Returns None when promotion is disabled in the recipe.
    With a run id instead of a tracker, `tracking_uri` (URI or TrackingSpec) names the store;
    default: MLFLOW_TRACKING_URI, else quantgate's sqlite:///mlruns/mlflow.db.
    """
    from mlflow.exceptions import MlflowException

    if not promotion.enabled:
        return None
    check_alias(promotion.alias)
    decision_txt = _decision_text(decision)
    if passed and decision_txt != "PASS":
        raise ValueError(f"passed=True with decision {decision_txt!r}: only PASS may promote")
    if isinstance(tracker_or_run_id, RunTracker):
        client, run_id = tracker_or_run_id.client, tracker_or_run_id.run_id
    else:
        client, run_id = _mlflow_client(_current_uri(tracking_uri)), tracker_or_run_id
    name = promotion.registered_model
    rel = checkpoint_artifact_path.strip("/")
    if not client.list_artifacts(run_id, rel):
        raise TrackingError(f"run {run_id} has no artifacts under {rel!r}; log the checkpoint before registering it")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{rel}"

    try:
        client.create_registered_model(name, description="Quantized checkpoints judged by quantgate.")
    except MlflowException as err:
        if "ALREADY_EXISTS" not in _error_code(err):
            raise
    previous = alias_version(name, promotion.alias, client=client)
    version_tags_ = {TAG_DECISION: decision_txt, TAG_PASSED: "true" if passed else "false", **tags}
    clean = {k: _truncate(v, 5000) for k, v in redact_params(version_tags_).items()}
    mv = client.create_model_version(
        name, source=source, run_id=run_id, tags=clean, description=f"quantgate {decision_txt}"
    )
    version = str(mv.version)
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)
    aliases = [CANDIDATE_ALIAS]
    if passed:
        client.set_registered_model_alias(name, promotion.alias, version)
        client.set_model_version_tag(name, version, "quantgate.promoted_to", promotion.alias)
        aliases.append(promotion.alias)
    client.set_tag(run_id, TAG_REGISTERED_MODEL, name)
    client.set_tag(run_id, TAG_MODEL_VERSION, version)
    return Registration(
        name=name,
        version=version,
        source=source,
        aliases_set=aliases,
        promoted=passed,
        previous_alias_version=previous,
    )


# ---- UI / server -----------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
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
        raise TrackingError(f"{redact(uri)} is already a tracking server; open it in a browser")
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


__all__ = [
    "CANDIDATE_ALIAS",
    "Registration",
    "RunTracker",
    "TrackingError",
    "alias_version",
    "default_artifact_root",
    "download_artifacts",
    "experiment_artifact_location",
    "failure_reason",
    "free_port",
    "is_sensitive_name",
    "model_url",
    "normalize_tracking_uri",
    "redact",
    "redact_params",
    "register_checkpoint",
    "resolve_tracking_uri",
    "run_url",
    "serve_ui",
    "server_command",
    "start_ui",
    "stop_ui",
    "version_tags",
    "wait_healthy",
]
