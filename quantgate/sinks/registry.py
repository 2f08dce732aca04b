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

log = logging.getLogger("quantgate")


class RegistrySink(Sink):
    name = "registry"

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
        passed = verdict.decision.value == "PASS"
        run_key = run.manifest.data["run_key"]
        calibrated = run.manifest.data["stages"].get("calibrate")
        # Idempotent by run key: an attempt killed after registering is found, not registered again.
        reg = register_checkpoint(
            run.manifest.data["mlflow_run_id"], "checkpoint", recipe.promotion, passed=passed, decision=verdict.decision.value,
            tracking_uri=uri, run_key=run_key,
            tags={
                "quantgate.verdict": verdict.decision.value, "quantgate.recipe": recipe.name,
                "quantgate.format": run.outcome.format, "quantgate.recipe_hash": recipe.content_hash(),
                "quantgate.calibration_sha256": (calibrated or {}).get("sha256", "none"),
                "quantgate.baseline_key": run.get("baseline").key, "quantgate.run_key": run_key,
            },
        )
        from quantgate.sinks.mlflow import description_markdown

        try:
            _mlflow_client(uri).update_model_version(reg.name, reg.version, description=description_markdown(run))
        except Exception as err:  # a description is for people; the version and aliases are what count
            log.warning("could not set the model version's description: %s", str(err).splitlines()[0])
        return asdict(reg)

    def reuse(self, run: Run) -> None:
        info = run.manifest.data.get("stages", {}).get("promote") or {}
        run.outcome.registered_version = info.get("version")
        run.outcome.promoted = bool(info.get("promoted"))
