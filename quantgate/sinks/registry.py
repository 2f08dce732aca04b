"""Promotion: register the run's checkpoint as a model version; `candidate` always points at it,
the recipe's alias (default `production`) only on PASS. Exactly once per run directory."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from quantgate.rundir import atomic_write_json
from quantgate.sinks import Sink, settings_key

if TYPE_CHECKING:
    from quantgate.runner import Run
    from quantgate.sinks.mlflow import MlflowSink

log = logging.getLogger("quantgate")


def registered_version_for(client: Any, name: str, alias: str, run_key: str) -> dict[str, Any] | None:
    """The model version an earlier attempt of this run directory registered, if any."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except Exception:  # no such registered model yet
        return None
    for mv in versions:
        if mv.tags.get("quantgate.run_key") == run_key:
            aliases = list(getattr(mv, "aliases", []) or [])
            return {"name": name, "version": str(mv.version), "source": mv.source, "aliases_set": aliases,
                    "promoted": alias in aliases, "previous_alias_version": None}
    return None


class RegistrySink(Sink):
    name = "registry"

    def __init__(self, tracking: MlflowSink) -> None:
        self.tracking = tracking

    def key(self, run: Run, result_key: str) -> str:
        from quantgate.sinks.mlflow import uri_fingerprint

        return settings_key(result_key, uri_fingerprint(run.recipe), run.recipe.promotion.model_dump(mode="json"))

    def run_done(self, run: Run) -> None:
        with run.clock.stage("promote"):
            info = self._promote(run)
        atomic_write_json(run.run_dir / "registration.json", info)
        run.manifest.data.setdefault("stages", {})["promote"] = info
        run.manifest.set("stages", run.manifest.data["stages"])
        self.reuse(run)

    def _promote(self, run: Run) -> dict[str, Any]:
        from quantgate.tracking import _mlflow_client, register_checkpoint, resolve_tracking_uri

        recipe, verdict = run.recipe, run.get("verdict")
        uri = resolve_tracking_uri(recipe.tracking)
        client = _mlflow_client(uri)
        passed = verdict.decision.value == "PASS"
        run_key = run.manifest.data["run_key"]
        existing = registered_version_for(client, recipe.promotion.registered_model, recipe.promotion.alias, run_key)
        if existing is not None:
            # Registered by an earlier attempt killed before it said so: never register twice.
            log.info("resume: run %s is already registered as version %s", run_key, existing["version"])
            if passed and not existing["promoted"]:
                client.set_registered_model_alias(existing["name"], recipe.promotion.alias, existing["version"])
                existing["promoted"] = True
            return existing
        calibrated = run.manifest.data["stages"].get("calibrate")
        reg = register_checkpoint(
            run.manifest.data["mlflow_run_id"], "checkpoint", recipe.promotion, passed=passed, decision=verdict.decision.value,
            tracking_uri=uri,
            tags={
                "quantgate.verdict": verdict.decision.value, "quantgate.recipe": recipe.name,
                "quantgate.format": run.outcome.format, "quantgate.recipe_hash": recipe.content_hash(),
                "quantgate.calibration_sha256": (calibrated or {}).get("sha256", "none"),
                "quantgate.baseline_key": run.get("baseline").key, "quantgate.run_key": run_key,
            },
        )
        from quantgate.sinks.mlflow import description_markdown

        try:
            client.update_model_version(reg.name, reg.version, description=description_markdown(run))
        except Exception as err:  # a description is for people; the version and aliases are what count
            log.warning("could not set the model version's description: %s", str(err).splitlines()[0])
        return asdict(reg)

    def reuse(self, run: Run) -> None:
        info = run.manifest.data.get("stages", {}).get("promote") or {}
        run.outcome.registered_version = info.get("version")
        run.outcome.promoted = bool(info.get("promoted"))
