"""The MLflow edge of quantgate, one module per concern:

- `uri`: tracking URI policy, creating a store safely, `check_store` (reachable and writable, bounded in time);
- `redaction`: credentials out of everything that leaves the process (`redact`, `redact_uri`);
- `versions`: package-version and git tags of a run;
- `runs`: `RunTracker`, one MLflow run (fails fast once the store is lost);
- `registry`: the Model Registry (register, aliases, the never-twice guard, closing interrupted runs);
- `ui`: the `mlflow server` process group behind `quantgate ui`.

MLflow itself is imported lazily inside functions, so `import quantgate.tracking` stays cheap.
"""

from __future__ import annotations

from quantgate.tracking.common import (
    CANDIDATE_ALIAS,
    MAX_KEY_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    METRICS_PER_BATCH,
    PARAMS_PER_BATCH,
    REDACTED,
    TAG_DECISION,
    TAG_FAILURE,
    TAG_MISSING_METRICS,
    TAG_MODEL_VERSION,
    TAG_PARENT_RUN,
    TAG_PASSED,
    TAG_REGISTERED_MODEL,
    TAG_RUN_KEY,
    UI_QUERY,
    TrackingError,
    _error_code,
    _mlflow_client,
    _one_line,
    _truncate,
    configure_mlflow_env,
)
from quantgate.tracking.redaction import (
    _redacted_copy,
    is_sensitive_name,
    redact,
    redact_params,
    redact_uri,
    sanitize_key,
)
from quantgate.tracking.registry import (
    Registration,
    alias_version,
    check_alias,
    close_interrupted_run,
    download_artifacts,
    register_checkpoint,
    registered_version_for,
)
from quantgate.tracking.runs import RunTracker, failure_reason
from quantgate.tracking.ui import (
    free_port,
    model_url,
    run_ui,
    run_url,
    serve_ui,
    server_command,
    start_ui,
    stop_ui,
    wait_healthy,
)
from quantgate.tracking.uri import (
    _current_uri,
    check_store,
    default_artifact_root,
    ensure_experiment,
    ensure_store,
    experiment_artifact_location,
    is_remote,
    normalize_tracking_uri,
    resolve_tracking_uri,
    sqlite_path,
)
from quantgate.tracking.versions import version_tags

__all__ = [
    "CANDIDATE_ALIAS",
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "METRICS_PER_BATCH",
    "PARAMS_PER_BATCH",
    "REDACTED",
    "TAG_DECISION",
    "TAG_FAILURE",
    "TAG_MISSING_METRICS",
    "TAG_MODEL_VERSION",
    "TAG_PARENT_RUN",
    "TAG_PASSED",
    "TAG_REGISTERED_MODEL",
    "TAG_RUN_KEY",
    "UI_QUERY",
    "Registration",
    "RunTracker",
    "TrackingError",
    "_current_uri",
    "_error_code",
    "_mlflow_client",
    "_one_line",
    "_redacted_copy",
    "_truncate",
    "alias_version",
    "check_alias",
    "check_store",
    "close_interrupted_run",
    "configure_mlflow_env",
    "default_artifact_root",
    "download_artifacts",
    "ensure_experiment",
    "ensure_store",
    "experiment_artifact_location",
    "failure_reason",
    "free_port",
    "is_remote",
    "is_sensitive_name",
    "model_url",
    "normalize_tracking_uri",
    "redact",
    "redact_params",
    "redact_uri",
    "register_checkpoint",
    "registered_version_for",
    "resolve_tracking_uri",
    "run_ui",
    "run_url",
    "sanitize_key",
    "serve_ui",
    "server_command",
    "sqlite_path",
    "start_ui",
    "stop_ui",
    "version_tags",
    "wait_healthy",
]
