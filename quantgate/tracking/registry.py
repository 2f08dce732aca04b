"""The Model Registry: register a run's checkpoint, move aliases, never register one run twice,
and close runs that an interrupted attempt left RUNNING.

The "never twice" guard is the model version tag `quantgate.run_key` (the run directory's key).
It is written outside redaction (redaction never sees it, whatever its rules), and registration
re-checks after creating: when two processes register the same run key at once, the lowest
version wins and the other process deletes its own duplicate and adopts the winner.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import RecipeError
from quantgate.tracking.common import (
    CANDIDATE_ALIAS,
    TAG_DECISION,
    TAG_FAILURE,
    TAG_MODEL_VERSION,
    TAG_PASSED,
    TAG_REGISTERED_MODEL,
    TAG_RUN_KEY,
    TAG_VERDICT_HISTORY,
    TrackingError,
    _error_code,
    _mlflow_client,
    _truncate,
)
from quantgate.tracking.redaction import redact_params
from quantgate.tracking.runs import RunTracker, _is_tracking_failure
from quantgate.tracking.uri import _current_uri, tracking_failure

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from quantgate.recipe import PromotionSpec, TrackingSpec

log = logging.getLogger("quantgate.tracking")

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


_RUN_KEY_RE = re.compile(r"^[\w.:-]{1,250}$")


def _versions_with_run_key(client: MlflowClient, name: str, run_key: str) -> list[Any]:
    """Model versions of `name` whose guard tag is `run_key`, lowest version first."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(err):
            return []
        raise
    found = [mv for mv in versions if (mv.tags or {}).get(TAG_RUN_KEY) == run_key]
    return sorted(found, key=lambda mv: int(mv.version))


def registered_version_for(
    name: str,
    run_key: str,
    alias: str,
    *,
    tracking_uri: str | TrackingSpec | None = None,
    client: MlflowClient | None = None,
) -> dict[str, Any] | None:
    """The version an earlier (or concurrent) attempt of run `run_key` registered, as the dict
    the run directory's manifest keeps; None when the run was never registered."""
    client = client or _mlflow_client(_current_uri(tracking_uri))
    found = _versions_with_run_key(client, name, run_key)
    if not found:
        return None
    mv = found[0]
    # search_model_versions leaves `aliases` empty on some stores; the registered model has them.
    aliases = sorted(a for a, v in (client.get_registered_model(name).aliases or {}).items() if str(v) == str(mv.version))
    return {"name": name, "version": str(mv.version), "source": mv.source, "aliases_set": aliases,
            "promoted": alias in aliases, "previous_alias_version": None}


def close_interrupted_run(tracking_uri: str, old_run_id: str, new_run_id: str) -> bool:
    """End an MLflow run that a killed attempt left RUNNING as FAILED, with tag quantgate.failure
    saying so; in the run's own store (`tracking_uri`, never MLflow's default ./mlflow.db).
    Returns True when it closed the run; False when it was already ended or is not in this store."""
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(tracking_uri)
    try:
        run = client.get_run(old_run_id)
        if run.info.status != "RUNNING":
            return False
        client.set_tag(old_run_id, TAG_FAILURE, f"interrupted: the process ended without closing this run; resumed as run {new_run_id}")
        client.set_terminated(old_run_id, status="FAILED")
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in _error_code(err):
            log.warning("earlier MLflow run %s is not in this store (tracking URI changed?); left as it is", old_run_id)
            return False
        raise tracking_failure(tracking_uri, f"closing interrupted run {old_run_id}", err) from err
    log.info("closed interrupted MLflow run %s as FAILED (resumed as %s)", old_run_id, new_run_id)
    return True


def register_checkpoint(
    tracker_or_run_id: RunTracker | str,
    checkpoint_artifact_path: str,
    promotion: PromotionSpec,
    *,
    passed: bool,
    decision: str,
    tags: Mapping[str, Any],
    tracking_uri: str | TrackingSpec | None = None,
    run_key: str | None = None,
) -> Registration | None:
    """Register the run's checkpoint folder as a new model version and move aliases.

    Always: creates the registered model if absent, creates version N with source
    `<run artifact_uri>/<checkpoint_artifact_path>`, tags it with the verdict and `tags` (lineage),
    points alias `candidate` at it. Only when `passed`: moves `promotion.alias` to it; otherwise
    the alias stays where it was. Returns None when promotion is disabled in the recipe.
    `run_key` (default: `tags["quantgate.run_key"]`) makes it idempotent: a run key that is
    already registered is not registered again (its version is returned, promoted if `passed`).
    With a run id instead of a tracker, `tracking_uri` (URI or TrackingSpec) names the store;
    default: MLFLOW_TRACKING_URI, else quantgate's sqlite:///mlruns/mlflow.db.
    """
    if not promotion.enabled:
        return None
    check_alias(promotion.alias)
    decision_txt = _decision_text(decision)
    if passed and decision_txt != "PASS":
        raise ValueError(f"passed=True with decision {decision_txt!r}: only PASS may promote")
    run_key = run_key or (str(tags[TAG_RUN_KEY]) if tags.get(TAG_RUN_KEY) else None)
    if run_key is not None and not _RUN_KEY_RE.match(run_key):
        raise ValueError(f"run key {run_key!r}: use letters, digits and . _ : - only")
    if isinstance(tracker_or_run_id, RunTracker):
        if tracker_or_run_id.broken is not None:
            raise TrackingError(str(tracker_or_run_id.broken))
        client, run_id, uri = tracker_or_run_id.client, tracker_or_run_id.run_id, tracker_or_run_id.uri or ""
    else:
        uri = _current_uri(tracking_uri)
        client, run_id = _mlflow_client(uri), tracker_or_run_id
    try:
        return _register(client, run_id, checkpoint_artifact_path, promotion, passed, decision_txt, tags, run_key)
    except (TrackingError, ValueError):
        raise
    except Exception as err:
        if not _is_tracking_failure(err):
            raise
        raise tracking_failure(uri, f"registering {promotion.registered_model!r}", err) from err


def _retag_verdict(client: MlflowClient, name: str, version: str, tags: Mapping[str, str], decision_txt: str,
                   passed: bool, *, is_alias: bool, alias: str) -> None:
    """The same artifacts judged again (other gate settings, newer gate code) got another verdict:
    the version's tags say the latest one, and the history keeps the earlier ones, so a version an
    alias points at never reads REGRESSION while it is promoted, nor PASS after it failed."""
    import datetime as dt

    prior = tags.get(TAG_DECISION)
    if prior == decision_txt:
        return
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    history = tags.get(TAG_VERDICT_HISTORY, "")
    entry = f"{prior or '?'} -> {decision_txt} at {when}"
    client.set_model_version_tag(name, version, TAG_DECISION, decision_txt)
    client.set_model_version_tag(name, version, TAG_PASSED, "true" if passed else "false")
    client.set_model_version_tag(name, version, TAG_VERDICT_HISTORY, _truncate(f"{history}; {entry}" if history else entry, 5000))
    if is_alias and not passed:
        log.warning("%s version %s is still @%s but was judged %s now (was %s); the alias was not moved: "
                    "move it deliberately (`mlflow` or the UI) if this verdict stands", name, version, alias, decision_txt, prior)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Point `alias` at `version`. Two processes moving one alias at once can collide on the store's
    unique key (MLflow's server does read-then-insert; seen on PostgreSQL): try again, last wins."""
    import time

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except Exception as err:
            text = str(err)
            if attempt == attempts - 1 or not any(s in text for s in ("UniqueViolation", "unique constraint", "UNIQUE constraint", "IntegrityError")):
                raise
            time.sleep(0.2 * (attempt + 1))


def _register(
    client: MlflowClient,
    run_id: str,
    checkpoint_artifact_path: str,
    promotion: PromotionSpec,
    passed: bool,
    decision_txt: str,
    tags: Mapping[str, Any],
    run_key: str | None,
) -> Registration:
    from mlflow.exceptions import MlflowException

    name = promotion.registered_model
    rel = checkpoint_artifact_path.strip("/")
    if not client.list_artifacts(run_id, rel):
        raise TrackingError(f"run {run_id} has no artifacts under {rel!r}; log the checkpoint before registering it")
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{rel}"

    try:
        client.create_registered_model(name, description="Quantized checkpoints judged by quantgate.")
    except MlflowException as err:
        # ALREADY_EXISTS, or (a concurrent create through a server) a unique-key error: fine if it exists now.
        if "ALREADY_EXISTS" not in _error_code(err):
            client.get_registered_model(name)
    previous = alias_version(name, promotion.alias, client=client)
    existing = _versions_with_run_key(client, name, run_key) if run_key else []
    if existing:
        version = str(existing[0].version)
        source = existing[0].source
        log.info("run %s is already registered as %s version %s; not registering again", run_key, name, version)
        _retag_verdict(client, name, version, existing[0].tags or {}, decision_txt, passed, is_alias=previous == version,
                       alias=promotion.alias)
    else:
        version_tags_ = {TAG_DECISION: decision_txt, TAG_PASSED: "true" if passed else "false", **tags}
        clean = {k: _truncate(v, 5000) for k, v in redact_params(version_tags_).items()}
        if run_key:
            clean[TAG_RUN_KEY] = run_key  # the guard: written raw, after redaction
        mv = client.create_model_version(
            name, source=source, run_id=run_id, tags=clean, description=f"quantgate {decision_txt}"
        )
        version = str(mv.version)
        if run_key:
            # Check-after-create: versions only grow, so every process sees the lowest one and
            # all but its creator step back.
            winner = str(_versions_with_run_key(client, name, run_key)[0].version)
            if winner != version:
                log.warning("run %s was registered concurrently as version %s; deleting duplicate version %s",
                            run_key, winner, version)
                client.delete_model_version(name, version)
                version = winner
    _set_alias(client, name, CANDIDATE_ALIAS, version)
    aliases = [CANDIDATE_ALIAS]
    if passed:
        _set_alias(client, name, promotion.alias, version)
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
