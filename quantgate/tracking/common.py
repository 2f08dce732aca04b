"""Names shared by the tracking modules: MLflow's limits, quantgate's tag names, TrackingError,
and the one place an MlflowClient is built (bounded HTTP, no URL printing, store created safely)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from quantgate.errors import QuantgateError

if TYPE_CHECKING:
    from mlflow import MlflowClient

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
TAG_RUN_KEY = "quantgate.run_key"
TAG_VERDICT_HISTORY = "quantgate.verdict_history"  # earlier verdicts of a re-judged model version
TAG_PARENT_RUN = "mlflow.parentRunId"  # what MLflow's own nested runs set; the UI nests on it

REDACTED = "***"
# MLflow 3.17's UI opens in its "GenAI" layout; this query selects the "Model training" one.
UI_QUERY = "?workflowType=machine_learning"

# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) turn an unreachable server
# into a 4-minute hang. quantgate's process uses these unless the user set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # MLflow prints "View run ... at: <tracking URI>" on stdout when a run ends; that URI may
    # carry user:password, and stdout belongs to quantgate's table / --json object.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingError(QuantgateError):
    """MLflow could not do what was asked (store unreachable, server did not start, ...)."""


class _NoRetryChatter(logging.Filter):
    """Drops urllib3's "Retrying (...) after connection broken" warnings: a lost store is reported
    once, as a TrackingError, not as one warning per retry."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying (")


_RETRY_FILTER = _NoRetryChatter()


def configure_mlflow_env() -> None:
    """Bounded HTTP retries/timeouts and no URL printing for this process (user values win)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    pool_log = logging.getLogger("urllib3.connectionpool")
    if _RETRY_FILTER not in pool_log.filters:
        pool_log.addFilter(_RETRY_FILTER)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str, limit: int = 500) -> str:
    return _truncate(" ".join(text.split()), limit)


def _error_code(err: BaseException) -> str:
    return str(getattr(err, "error_code", ""))


def _mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient for `uri` (tracking and registry); a fresh sqlite store is created under
    a file lock first, so two processes starting on a new store do not race on its schema."""
    from mlflow import MlflowClient

    from quantgate.tracking.uri import ensure_store

    configure_mlflow_env()
    ensure_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
