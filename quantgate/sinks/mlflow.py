"""The MLflow record of a run: params (the flattened recipe), tags (versions, keys, verdict),
metrics under the same keys for every recipe (so MLflow's compare view lines recipes up), the
result files, the HTML report and the checkpoint, and a Markdown description."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

from quantgate.sinks import Sink, settings_key

if TYPE_CHECKING:
    from pathlib import Path

    from quantgate.recipe import Recipe
    from quantgate.runner import RecipeOutcome, Run

log = logging.getLogger("quantgate")

RESULT_FILES = ("verdict.json", "verdict.txt", "junit.xml", "summary.md", "baseline_results.json", "candidate_results.json",
                "items.jsonl", "golden.json", "golden_diff.md", "golden_diff.html", "calibration.json", "fidelity.json", "report.html")


def uri_fingerprint(recipe: Recipe) -> str:
    """The store a record went to, as a hash (the URI may hold credentials: never on disk)."""
    from quantgate.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(recipe.tracking)
    return hashlib.sha256(f"{uri}\n{recipe.tracking.experiment}".encode()).hexdigest()[:16]


def results_metrics(side: str, results: Any) -> dict[str, float]:
    out = {}
    for task, tr in results.tasks.items():
        for metric, value in tr.metrics.items():
            out[f"{side}.{task}.{metric}"] = value
        out[f"{side}.{task}.items"] = len(tr.items)
        if tr.seconds:
            out[f"{side}.{task}.tokens_per_second"] = tr.tokens_per_second
    return out


def check_metrics(verdict: Any) -> dict[str, float]:
    out = {}
    for c in verdict.checks:
        safe = c.name.replace("/", ".").replace(" ", "_")
        for attr in ("delta", "ci_high", "p_value", "mdd"):
            v = getattr(c, attr, None)
            if isinstance(v, (int, float)):
                out[f"gate.{safe}.{attr}"] = float(v)
        out[f"gate.{safe}.passed"] = 1.0 if c.status == "pass" else 0.0
    return out


def description_markdown(run: Run) -> str:
    """What a reviewer reads first on the run and model-version pages."""
    o = run.outcome
    verdict = run.get("verdict") if "verdict" in run.values else None
    lines = [f"**{o.decision}** (exit {o.exit_code}): {o.reason}", ""]
    if verdict is not None:
        # The failing gated checks; on a pass, the quality checks (not the comparability ones).
        deciding = [c for c in verdict.checks if c.gated and c.status != "pass"] or [
            c for c in verdict.checks if c.gated and c.kind in ("metric", "golden")] or [c for c in verdict.checks if c.gated][:3]
        if deciding:
            lines += ["| check | worsening | upper bound | limit | status |", "|---|---|---|---|---|"]
            from quantgate.report import ci_text, limit_text

            for c in deciding[:8]:
                delta = "-" if c.delta is None else f"{c.delta:+.4g}"
                lines.append(f"| {c.name} | {delta} | {ci_text(c)} | {limit_text(c.limit)} | {c.status} |")
            lines.append("")
            first = deciding[0]
            closing = f"Deciding check: `{first.name}` ({first.status})." if first.status != "pass" else "Every gated check passed."
            lines.append(closing)
            lines.append("")
    size = f"{o.checkpoint_bytes / 1e6:.1f} MB" if o.checkpoint_bytes else "-"
    lines.append(f"Recipe `{run.recipe.name}`, format `{o.format}`, checkpoint {size}, baseline cache {o.baseline_cache or '-'}.")
    link = report_link(run)
    report = f"[results/report.html]({link})" if link else "artifact `results/report.html`"
    lines.append(f"Full report: {report}; verdict table: artifact `results/verdict.txt`.")
    return "\n".join(lines)


def log_dataset_inputs(tracker: Any, results: Any) -> None:
    """Each standard task's data (package, version, file hashes) as an MLflow dataset input, so the
    run page says what the gate was judged on."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from quantgate.evaluation.standard_tasks import mlflow_inputs

    inputs = []
    for task in results.tasks.values():
        if not task.provenance:
            continue
        info = mlflow_inputs(task.provenance)
        source = CodeDatasetSource({"source": info["source"], "documents": str(info["documents"])})
        dataset = MetaDataset(source, name=info["name"] or task.task, digest=info["digest"])
        tags = [InputTag("mlflow.data.context", "evaluation"), InputTag("quantgate.deviations", "; ".join(task.deviations)[:5000] or "none")]
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    if inputs:
        tracker.client.log_inputs(tracker.run_id, datasets=inputs)


def report_link(run: Run) -> str | None:
    """A link to the run's report in the MLflow UI, relative to the UI's own address (a hash route,
    so it works on the run and the model-version page, behind any host or prefix)."""
    run_id = run.outcome.mlflow_run_id
    if not run_id:
        return None
    try:
        from quantgate.tracking import _mlflow_client, resolve_tracking_uri

        experiment_id = _mlflow_client(resolve_tracking_uri(run.recipe.tracking)).get_run(run_id).info.experiment_id
    except Exception:  # the run page alone still leads there (Artifacts tab)
        return f"#/runs/{run_id}"
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifactPath/results/report.html"


class MatrixParent:
    """The parent MLflow run of a matrix, opened only when a child has something to record."""

    def __init__(self, recipe: Recipe, names: list[str]) -> None:
        self.recipe, self.names = recipe, names
        self.tracker: Any = None

    def run_id(self) -> str | None:
        if not self.recipe.tracking.enabled:
            return None
        if self.tracker is None:
            from quantgate.tracking import RunTracker, version_tags

            self.tracker = RunTracker(self.recipe.tracking, "matrix: " + ", ".join(self.names), tags={"quantgate.matrix": "true", **version_tags()}).start()
        return self.tracker.run_id

    def discard_if_empty(self, outcomes: list[RecipeOutcome]) -> None:
        """Every recipe was complete on disk: nothing was recorded, so a parent opened before the
        children ran (a cluster executor needs its id up front) is deleted, as the local
        executor, which opens it lazily, never makes one."""
        if self.tracker is None or not all(o.reused for o in outcomes):
            return
        try:
            self.tracker.client.delete_run(self.tracker.run_id)
        except Exception as err:
            log.warning("could not delete the empty matrix parent run: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        self.tracker = None

    def close(self, outcomes: list[RecipeOutcome], table: str, report: Path | None = None) -> None:
        """Summarise the children on the parent: verdicts in its name, tags and description, the
        matrix table, and the matrix HTML report with its images under results/."""
        if self.tracker is None:  # nothing ran: every child was complete on disk, nothing to add
            return
        try:
            from quantgate.runner import worst

            worst_code = worst([o.exit_code for o in outcomes])
            decision = next((o.decision for o in outcomes if o.exit_code == worst_code), "ERROR")
            verdicts = ", ".join(f"{o.recipe}={o.decision}" for o in outcomes)
            self.tracker.set_tags({
                "quantgate.verdicts": verdicts, "quantgate.verdict": decision,
                "mlflow.runName": f"matrix: {', '.join(self.names)} [{decision}]",
                "mlflow.note.content": matrix_markdown(outcomes, table, report is not None),
            })
            self.tracker.log_metrics({f"{o.recipe}.exit_code": o.exit_code for o in outcomes})
            self.tracker.log_text(table, "matrix.txt")
            if report is not None:
                from quantgate.reports.html import matrix_images

                self.tracker.log_artifact(report, "results")
                for image in matrix_images(report.parent):
                    self.tracker.log_artifact(image, "results")
            self.tracker.end("FINISHED")
        except Exception as err:  # the children hold the record; the parent is a summary
            log.warning("could not close the matrix's MLflow run: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)


def matrix_markdown(outcomes: list[RecipeOutcome], table: str, with_report: bool) -> str:
    """The parent run's description: each recipe's verdict, then the matrix table."""
    lines = ["| recipe | format | verdict | reason |", "|---|---|---|---|"]
    for o in outcomes:
        reason = (o.reason[:157] + "...") if len(o.reason) > 160 else o.reason
        lines.append(f"| {o.recipe} | {o.format} | **{o.decision}** | {reason.replace('|', '/')} |")
    lines += ["", "```", table, "```"]
    if with_report:
        lines.append("Size-vs-quality report: artifact `results/matrix_report.html` (plot: `results/matrix_scatter.png`).")
    return "\n".join(lines)


class MlflowSink(Sink):
    name = "mlflow"

    def __init__(self, parent: MatrixParent | None = None) -> None:
        self.parent = parent
        self.tracker: Any = None

    def key(self, run: Run, result_key: str) -> str:
        return settings_key(result_key, uri_fingerprint(run.recipe))

    def run_start(self, run: Run) -> None:
        # Opened before any stage: an unreachable store fails the run before calibration.
        if run.sink_done(self):
            return
        from quantgate.recipe import flatten
        from quantgate.tracking import RunTracker, close_interrupted_run, version_tags

        recipe = run.recipe
        tags = {"quantgate.recipe": recipe.name, "quantgate.format": run.outcome.format,
                "quantgate.recipe_hash": recipe.content_hash(), "quantgate.artifact_hash": recipe.artifact_hash(), **version_tags()}
        parent_id = self.parent.run_id() if self.parent else None
        self.tracker = RunTracker(recipe.tracking, recipe.name, parent_run_id=parent_id, tags=tags).start()
        previous = run.manifest.data.get("mlflow_run_id")
        if previous and previous != self.tracker.run_id:
            self.tracker.set_tags({"quantgate.resumed_from": previous})
            close_interrupted_run(self.tracker.uri, previous, self.tracker.run_id)
        run.manifest.set("mlflow_run_id", self.tracker.run_id)
        run.outcome.mlflow_run_id = self.tracker.run_id
        import yaml

        from quantgate.sinks import public_recipe_yaml

        self.tracker.log_params(flatten(yaml.safe_load(public_recipe_yaml(recipe))))
        self.tracker.log_artifact(run.run_dir / "recipe.yaml")

    def run_done(self, run: Run) -> None:
        if self.tracker is None:  # run_start found nothing to do, but the result changed since
            self.run_start(run)
        with run.clock.stage("track"):
            self._record(run)

    def _record(self, run: Run) -> None:
        t = self.tracker
        base, cand, verdict, ckpt = run.get("baseline"), run.get("candidate"), run.get("verdict"), run.get("checkpoint")
        # Everything is written here, after the last stage: a store lost mid-run costs only this
        # step (exit 3); every result stays in the run directory and the next run logs it once.
        t.set_tags({"quantgate.baseline_cache": f"{'hit' if base.cache_hit else 'miss'} {base.key}", "quantgate.baseline_key": base.key})
        calibration = run.manifest.data["stages"].get("calibrate")
        if calibration:
            t.set_tags({"quantgate.calibration_sha256": calibration.get("sha256", "")})
            t.log_metrics({"calibration.seconds": calibration.get("seconds", 0.0)})
        t.log_metrics({"checkpoint.bytes": ckpt.size_bytes, "checkpoint.ratio_to_baseline": ckpt.size_bytes / max(base.checkpoint.size_bytes, 1)})
        t.log_metrics(results_metrics("baseline", base.results))
        t.log_metrics(results_metrics("candidate", cand))
        golden = run.get("golden")
        if golden is not None:
            t.log_metrics({f"golden.{k}": getattr(golden, k) for k in ("exact_match_rate", "mean_prefix_agreement", "mean_token_agreement", "mean_kl", "top1_agreement")})
        fidelity = run.get("fidelity") if "fidelity" in run.producers else None
        if fidelity is not None:
            t.log_metrics({f"export_fidelity.{k}": float(x) for k, x in fidelity.model_dump().items()})
        t.log_metrics(check_metrics(verdict))
        log_dataset_inputs(t, cand)
        t.log_metrics({f"time.{k}": s for k, s in run.clock.timings.items()})
        t.log_metrics({f"peak_gpu_bytes.{k}": b for k, b in run.clock.peak_gpu_bytes.items()})
        t.log_metrics({f"one_time.{k}": s for k, s in run.clock.one_time_costs.items()})
        t.log_metrics({f"engine_memory_bytes.{k}": b for k, b in run.clock.memory.items()})
        t.set_tags({
            "quantgate.verdict": verdict.decision.value, "quantgate.verdict_reason": verdict.reason[:5000],
            "quantgate.candidate_is_baseline": str(not formats_quantized(run.recipe)).lower(),
            # The runs table shows run names: put the verdict where a reviewer looks.
            "mlflow.runName": f"{run.recipe.name} [{verdict.decision.value}]",
            "mlflow.note.content": description_markdown(run),
        })
        for name in RESULT_FILES:
            if (run.run_dir / name).is_file():
                t.log_artifact(run.run_dir / name, "results")
        for image in sorted(run.run_dir.glob("report_*.png")):
            t.log_artifact(image, "results")
        if formats_quantized(run.recipe):
            t.log_checkpoint(ckpt.dir, "checkpoint")
        else:  # the baseline export lives in the shared cache: upload it as this run's checkpoint
            t.log_checkpoint(base.checkpoint.dir, "checkpoint")
        t.log_artifact(run.run_dir / "outcome.json", "results")
        t.log_artifact(run.run_dir / "run.log", "results")
        run.manifest.set("mlflow_artifact_uri", t.artifact_uri)
        t.end("FINISHED")

    def reuse(self, run: Run) -> None:
        run.outcome.mlflow_run_id = run.manifest.data.get("mlflow_run_id")

    def run_failed(self, run: Run) -> None:
        if self.tracker is not None and self.tracker.status is None:
            self.tracker.fail(run.outcome.reason)



def formats_quantized(recipe: Recipe) -> bool:
    from quantgate import formats

    return formats.get_format(recipe.quantization.format).quantized
