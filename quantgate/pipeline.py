"""The run, as its list of stages.

    preflight -> baseline (export + evaluate, cached) -> calibrate -> export -> evaluate
              -> golden diff -> gate -> track -> promote

Each stage writes its output to the run directory atomically and marks it in the manifest; a run
started again with the same arguments resumes after the last complete stage. Side effects
(MLflow, files, GPUs) stay here and in tracking/engines; the gate is a pure function.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantgate import cache, formats
from quantgate.artifacts import CalibrationInfo, Checkpoint
from quantgate.errors import ExitCode, QuantgateError, StageError
from quantgate.models import cache_root, dir_content_hash, load_model, resolve_model_dir
from quantgate.recipe import Recipe, flatten, recipe_to_yaml
from quantgate.rundir import Manifest, atomic_write_json, atomic_write_text

log = logging.getLogger("quantgate")

# Worst first: a matrix run exits with its worst recipe's code.
SEVERITY = [ExitCode.ERROR, ExitCode.BAD_INPUT, ExitCode.REGRESSION, ExitCode.ANOMALOUS, ExitCode.INCONCLUSIVE, ExitCode.PASS]


def worst(codes: list[int]) -> int:
    return min(codes, key=lambda c: SEVERITY.index(ExitCode(c))) if codes else int(ExitCode.PASS)


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
    checks: list[dict[str, Any]] = field(default_factory=list)
    deltas: dict[str, float] = field(default_factory=dict)
    log_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StageClock:
    """Logs each stage's start, end and elapsed seconds; keeps the timings."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.timings: dict[str, float] = {}
        self.peak_gpu_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("[%s] %s: start", self.prefix, name)
        t0 = time.perf_counter()
        cuda = _cuda_in_use()
        if cuda:
            cuda.reset_peak_memory_stats()
        try:
            _fault_point(name)
            yield
        except BaseException:
            log.info("[%s] %s: failed after %.1f s", self.prefix, name, time.perf_counter() - t0)
            raise
        dt = time.perf_counter() - t0
        self.timings[name] = round(self.timings.get(name, 0.0) + dt, 3)
        peak = ""
        if cuda or _cuda_in_use():
            cuda = cuda or _cuda_in_use()
            self.peak_gpu_bytes[name] = max(self.peak_gpu_bytes.get(name, 0), int(cuda.max_memory_allocated()))
            peak = f", peak GPU memory {self.peak_gpu_bytes[name] / 2**30:.2f} GiB"
        log.info("[%s] %s: done in %.1f s%s", self.prefix, name, dt, peak)


def _cuda_in_use() -> Any:
    """torch.cuda when torch is already imported and a GPU is present (never imports torch)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def _fault_point(stage: str) -> None:
    """Fault injection for the resume tests: QUANTGATE_KILL_IN=<stage> SIGKILLs this process
    inside that stage (after its start is logged), as an OOM killer or a preempted node would."""
    import os

    if os.environ.get("QUANTGATE_KILL_IN") == stage:
        import signal

        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# ---- devices ------------------------------------------------------------------------------------


def calibration_device(recipe: Recipe) -> str:
    import torch

    if recipe.engine.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


# ---- model identity -----------------------------------------------------------------------------


def model_content_hash(model_dir: Path) -> str:
    """Content hash of the resolved model dir, memoized by (path, sizes, mtimes)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    stamp = json.dumps([(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = cache_root() / "hashes" / (cache.cache_key({"dir": str(model_dir.resolve()), "stamp": stamp}) + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = dir_content_hash(model_dir)
    atomic_write_text(memo, digest)
    return digest


# ---- baseline -----------------------------------------------------------------------------------


@dataclass
class Baseline:
    checkpoint: Checkpoint
    results: Any  # EvalResults
    key: str
    cache_hit: bool


def baseline_checkpoint(recipe: Recipe, model_dir: Path, model_hash: str, clock: StageClock) -> Checkpoint:
    """The 16-bit baseline export (plain HF checkpoint), shared by every recipe on this model."""
    from quantgate.export import export_checkpoint

    out = cache_root() / "baseline_checkpoints" / f"{model_hash[:16]}-{recipe.model.dtype}"
    meta = out.parent / f"{out.name}.json"
    if meta.is_file() and (out / "config.json").is_file():
        return Checkpoint.load(meta)
    with clock.stage("baseline_export"):
        model, tok = load_model(model_dir, recipe.model, dtype=torch_dtype(recipe.model.dtype), device="cpu")
        ckpt = export_checkpoint(model, tok, formats.get_format("fp16"), recipe.model.dtype, out)
        del model
        release_memory()
        ckpt.save(meta)
    return ckpt


def baseline_key_parts(recipe: Recipe, model_hash: str, ckpt: Checkpoint) -> dict[str, Any]:
    from importlib import metadata

    from quantgate import __version__
    from quantgate.engines.torch_engine import compute_dtype_for, resolve_device
    from quantgate.evaluation.suites import suite_fingerprint

    device = resolve_device(recipe.engine.device) if recipe.engine.backend == "torch" else "cuda"
    versions = {}
    for pkg in ("lm_eval", "transformers", "torch", "nvidia-modelopt"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return {
        "model_source": recipe.model.source,
        "model_content": model_hash,
        "dtype": recipe.model.dtype,
        "checkpoint_tokenizer": dir_content_hash_subset(ckpt.dir),
        "suite": suite_fingerprint(recipe.evaluation),
        "evaluation": recipe.evaluation.model_dump(mode="json"),
        "backend": recipe.engine.backend,
        "engine": recipe.engine.model_dump(mode="json", exclude={"device"}),
        "device_type": device,
        "compute_dtype": str(compute_dtype_for(device, recipe.model.dtype)),
        "versions": {**versions, "quantgate": __version__},
    }


def dir_content_hash_subset(path: Path) -> str:
    """Hash of the tokenizer and chat-template files of a checkpoint."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def evaluate_checkpoint(ckpt: Checkpoint, recipe: Recipe, side: str, golden_reference: Any = None) -> Any:
    from quantgate.engines import load_engine
    from quantgate.evaluation.run import evaluate_side

    try:
        with load_engine(ckpt, recipe.engine) as engine:
            return evaluate_side(engine, recipe.evaluation, side=side, golden_reference=golden_reference)
    finally:
        release_memory()


def release_memory() -> None:
    """Drop a finished model before the next one loads (a matrix run holds one at a time)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def ensure_baseline(recipe: Recipe, model_dir: Path, clock: StageClock, memo: dict[str, Baseline]) -> Baseline:
    from quantgate.evaluation.results import EvalResults

    with clock.stage("model_hash"):
        model_hash = model_content_hash(model_dir)
    ckpt = baseline_checkpoint(recipe, model_dir, model_hash, clock)
    parts = baseline_key_parts(recipe, model_hash, ckpt)
    key = cache.cache_key(parts)
    if key in memo:
        log.info("baseline: cache hit %s (this process)", key)
        return Baseline(ckpt, memo[key].results, key, True)
    text = cache.load_entry(key)
    if text is not None:
        log.info("baseline: cache hit %s", key)
        # No baseline evaluation will catch over-long prompts before calibration: check now.
        with clock.stage("prompt_lengths"):
            check_prompt_lengths_early(recipe, model_dir, cache.baseline_root() / key / "longest_prompt.txt")
        base = Baseline(ckpt, EvalResults.model_validate_json(text), key, True)
    else:
        log.info("baseline: cache miss %s; evaluating the %s baseline", key, recipe.model.dtype)
        with clock.stage("baseline_evaluate"):
            results = evaluate_checkpoint(ckpt, recipe, "baseline")
        if not results.errors:  # never cache a failed evaluation
            cache.store_entry(key, results.model_dump_json(), parts)
        base = Baseline(ckpt, results, key, False)
    memo[key] = base
    return base


# ---- candidate ----------------------------------------------------------------------------------


def quantize_and_export(recipe: Recipe, model_dir: Path, run_dir: Path, manifest: Manifest, clock: StageClock) -> tuple[CalibrationInfo, Checkpoint]:
    """calibrate + export. The calibrated model lives only in memory, so a run killed between the
    two redoes calibration (it never exports from a partial state)."""
    from quantgate.calibrate import calibrate
    from quantgate.export import export_checkpoint

    fmt = formats.get_format(recipe.quantization.format)
    if manifest.done("export") and (run_dir / "checkpoint" / "config.json").is_file():
        log.info("resume: calibrate and export already complete")
        return CalibrationInfo.load(run_dir / "calibration.json"), Checkpoint.load(run_dir / "checkpoint.json")
    device = calibration_device(recipe)
    # CPU: calibrate in float32 (fast, exact fake-quant) and cast to 16-bit at export.
    dtype = torch_dtype(recipe.model.dtype) if device == "cuda" else torch_dtype("float32")
    with clock.stage("load_model"):
        model, tok = load_model(model_dir, recipe.model, dtype=dtype, device=device)
    with clock.stage("calibrate"):
        calib = calibrate(model, tok, recipe, fmt, device)
    calib.save(run_dir / "calibration.json")
    manifest.mark("calibrate", file="calibration.json", seconds=calib.seconds)
    if needs_legacy_trtllm_checkpoint(recipe, fmt):
        from quantgate.engines.trtllm_legacy import export_legacy_checkpoint, legacy_paths

        # Before the unified export, which mutates the model.
        with clock.stage("export_legacy"):
            export_legacy_checkpoint(model, decoder_type(model), recipe.model.dtype,
                                     legacy_paths(run_dir / "checkpoint").checkpoint_dir, recipe.engine.tensor_parallel_size)
    with clock.stage("export"):
        ckpt = export_checkpoint(model, tok, fmt, recipe.model.dtype, run_dir / "checkpoint")
    del model
    release_memory()
    ckpt.save(run_dir / "checkpoint.json")
    manifest.mark("export", file="checkpoint.json", bytes=ckpt.size_bytes)
    return calib, ckpt


def check_prompt_lengths_early(recipe: Recipe, model_dir: Path, memo: Path) -> None:
    """Preflight's prompt-length check, before any calibration: the suite's longest request vs
    engine.max_input_len (the evaluation stage checks again, per request). The length is memoized
    beside the baseline cache entry, whose key covers the tokenizer, suite and limits."""
    from quantgate.preflight import preflight

    if memo.is_file():
        longest = int(memo.read_text())
    else:
        from transformers import AutoTokenizer

        from quantgate.evaluation.suites import longest_prompt_tokens

        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
        longest = longest_prompt_tokens(tok, recipe.evaluation)
        atomic_write_text(memo, str(longest))
    preflight(recipe, longest_prompt_tokens=longest)
    log.info("[%s] longest evaluation prompt: %d tokens (engine.max_input_len %d)", recipe.name, longest, recipe.engine.max_input_len)


def needs_legacy_trtllm_checkpoint(recipe: Recipe, fmt: formats.FormatSpec) -> bool:
    """INT8 SmoothQuant (or trtllm_path=legacy) on TensorRT-LLM runs from a trtllm-build engine."""
    if recipe.engine.backend != "tensorrt-llm":
        return False
    from quantgate.engines.tensorrt_llm import resolve_trtllm_path

    return resolve_trtllm_path(recipe.engine.trtllm_path, fmt) == "legacy"


# ModelOpt's decoder_type names for export_tensorrt_llm_checkpoint, by HF model_type.
DECODER_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen3": "qwen", "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3", "mixtral": "llama"}


def decoder_type(model: Any) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DECODER_TYPES:
        raise StageError("export", f"no legacy TensorRT-LLM decoder type known for model_type {model_type!r}; use a PyTorch-backend format (fp8, int4_awq)")
    return DECODER_TYPES[model_type]


# ---- one recipe ---------------------------------------------------------------------------------


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / f"{recipe.name}-{recipe.content_hash()[:10]}"


def run_recipe(
    recipe: Recipe,
    source: str,
    *,
    fresh: bool = False,
    baseline_memo: dict[str, Baseline] | None = None,
    parent_run_id: str | None = None,
) -> RecipeOutcome:
    from quantgate.evaluation.golden import compare_golden, golden_diff_html, golden_diff_markdown
    from quantgate.evaluation.results import EvalResults
    from quantgate.gate import judge
    from quantgate.report import junit_xml, summary_markdown, verdict_table
    from quantgate.tracking import version_tags

    fmt = formats.get_format(recipe.quantization.format)
    run_dir = run_dir_for(recipe)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    if "run_key" not in manifest.data:
        import uuid

        manifest.set("run_key", f"{run_dir.name}-{uuid.uuid4().hex[:8]}")
    log_file = attach_log_file(run_dir / "run.log")
    clock = StageClock(recipe.name)
    outcome = RecipeOutcome(recipe.name, source, fmt.name, "ERROR", int(ExitCode.ERROR), run_dir=str(run_dir), log_file=str(log_file))
    atomic_write_text(run_dir / "recipe.yaml", recipe_to_yaml(recipe))

    tags = {"quantgate.recipe": recipe.name, "quantgate.format": fmt.name, "quantgate.recipe_hash": recipe.content_hash(), **(version_tags() if recipe.tracking.enabled else {})}
    previous = manifest.data.get("mlflow_run_id")
    with open_tracker(recipe, f"{recipe.name}", parent_run_id=parent_run_id, tags=tags) as tracker:
        if previous and tracker.run_id and previous != tracker.run_id:
            tracker.set_tags({"quantgate.resumed_from": previous})
            mark_interrupted(recipe, previous, tracker.run_id)
        manifest.set("mlflow_run_id", tracker.run_id)
        outcome.mlflow_run_id = tracker.run_id
        tracker.log_params(flatten(recipe.to_dict()))
        tracker.log_artifact(run_dir / "recipe.yaml")
        try:
            with clock.stage("model"):
                model_dir = resolve_model_dir(recipe.model)
            base = ensure_baseline(recipe, model_dir, clock, baseline_memo if baseline_memo is not None else {})
            outcome.baseline_cache = f"{'hit' if base.cache_hit else 'miss'} {base.key}"
            tracker.set_tags({"quantgate.baseline_cache": outcome.baseline_cache, "quantgate.baseline_key": base.key})
            base.results.save(run_dir / "baseline_results.json")

            if fmt.quantized:
                calib, ckpt = quantize_and_export(recipe, model_dir, run_dir, manifest, clock)
                tracker.set_tags({"quantgate.calibration_sha256": calib.content_sha256})
                tracker.log_metrics({"calibration.seconds": calib.seconds, "calibration.tokens": calib.tokens})
            else:
                calib, ckpt = None, base.checkpoint
            outcome.checkpoint_bytes = ckpt.size_bytes
            tracker.log_metrics({"checkpoint.bytes": ckpt.size_bytes, "checkpoint.ratio_to_baseline": ckpt.size_bytes / max(base.checkpoint.size_bytes, 1)})

            cand_path = run_dir / "candidate_results.json"
            if manifest.done("evaluate") and cand_path.is_file():
                candidate = EvalResults.load(cand_path)
            elif not fmt.quantized:
                candidate = base.results.model_copy(update={"side": "candidate"})
            else:
                with clock.stage("evaluate"):
                    candidate = evaluate_checkpoint(ckpt, recipe, "candidate", golden_reference=base.results.golden)
            candidate.save(cand_path)
            manifest.mark("evaluate", file=cand_path.name)
            write_item_jsonl(run_dir / "items.jsonl", base.results, candidate)

            with clock.stage("golden"):
                golden = compare_golden(base.results.golden, candidate.golden) if base.results.golden and candidate.golden else None
                if golden is not None:
                    atomic_write_text(run_dir / "golden.json", golden.model_dump_json(indent=2))
                    atomic_write_text(run_dir / "golden_diff.md", golden_diff_markdown(golden))
                    atomic_write_text(run_dir / "golden_diff.html", golden_diff_html(golden))
            manifest.mark("golden", file="golden.json")

            with clock.stage("gate"):
                verdict = judge(base.results, candidate, golden, recipe.gate)
            atomic_write_json(run_dir / "verdict.json", verdict.to_dict())
            atomic_write_text(run_dir / "verdict.txt", verdict_table(verdict))
            atomic_write_text(run_dir / "junit.xml", junit_xml(verdict, recipe.name))
            atomic_write_text(run_dir / "summary.md", summary_markdown(verdict, f"quantgate: {recipe.name} ({fmt.name})"))
            manifest.mark("gate", file="verdict.json", decision=verdict.decision.value)
            outcome.decision, outcome.exit_code = verdict.decision.value, int(verdict.exit_code)
            outcome.reason = verdict.reason
            outcome.checks = [c.model_dump(mode="json") for c in verdict.checks]
            outcome.deltas = {c.name: c.delta for c in verdict.checks if c.delta is not None}
            log.info("gate verdict for %s:\n%s", recipe.name, verdict_table(verdict))

            with clock.stage("track"):
                tracker.log_metrics(results_metrics("baseline", base.results))
                tracker.log_metrics(results_metrics("candidate", candidate))
                if golden is not None:
                    tracker.log_metrics({f"golden.{k}": getattr(golden, k) for k in ("exact_match_rate", "mean_prefix_agreement", "mean_token_agreement", "mean_kl", "top1_agreement")})
                tracker.log_metrics(check_metrics(verdict))
                tracker.set_tags({"quantgate.verdict": verdict.decision.value, "quantgate.verdict_reason": verdict.reason[:5000]})
                for name in ("verdict.json", "verdict.txt", "junit.xml", "summary.md", "baseline_results.json", "candidate_results.json", "items.jsonl", "golden.json", "golden_diff.md", "golden_diff.html", "calibration.json"):
                    if (run_dir / name).is_file():
                        tracker.log_artifact(run_dir / name, "results")
                tracker.log_checkpoint(ckpt.dir, "checkpoint")

            if recipe.promotion.enabled and not recipe.tracking.enabled:
                log.warning("tracking.enabled is false: the checkpoint is not registered or promoted")
            elif recipe.promotion.enabled:
                outcome_reg = promote(recipe, manifest, run_dir, tracker, verdict, fmt, calib, base, clock)
                outcome.registered_version = outcome_reg.get("version")
                outcome.promoted = bool(outcome_reg.get("promoted"))
            outcome.timings, outcome.peak_gpu_bytes = clock.timings, clock.peak_gpu_bytes
            tracker.log_metrics({f"time.{k}": v for k, v in clock.timings.items()})
            tracker.log_metrics({f"peak_gpu_bytes.{k}": v for k, v in clock.peak_gpu_bytes.items()})
            atomic_write_json(run_dir / "outcome.json", outcome.to_dict())
            tracker.log_artifact(run_dir / "outcome.json", "results")
            tracker.log_artifact(run_dir / "run.log", "results")
        except Exception as err:
            # One line for the user; the traceback goes to the run's log file.
            outcome.timings = clock.timings
            if isinstance(err, QuantgateError):
                outcome.reason, outcome.exit_code = str(err), int(err.exit_code)
                log.error("%s", err, exc_info=not isinstance(err, StageError) or err.__cause__ is not None)
            else:
                first = str(err).splitlines()[0] if str(err) else ""
                outcome.reason, outcome.exit_code = f"{type(err).__name__}: {first}", int(ExitCode.ERROR)
                log.exception("run failed")
            outcome.decision = "BAD_INPUT" if outcome.exit_code == ExitCode.BAD_INPUT else "ERROR"
            tracker.fail(outcome.reason)
            atomic_write_json(run_dir / "outcome.json", outcome.to_dict())
        finally:
            detach_log_file(log_file)
    return outcome


class OfflineTracker:
    """Stands in for RunTracker when tracking.enabled is false: records nothing, promotes nothing."""

    run_id = None

    def __enter__(self) -> OfflineTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def open_tracker(recipe: Recipe, run_name: str, **kwargs: Any) -> Any:
    if not recipe.tracking.enabled:
        return OfflineTracker()
    from quantgate.tracking import RunTracker

    return RunTracker(recipe.tracking, run_name=run_name, **kwargs)


def promote(recipe: Recipe, manifest: Manifest, run_dir: Path, tracker: Any, verdict: Any, fmt: Any, calib: Any, base: Baseline, clock: StageClock) -> dict[str, Any]:
    """Register the checkpoint; move the alias only on PASS. Never twice for one run directory."""
    from quantgate.tracking import register_checkpoint

    if manifest.done("promote"):
        log.info("resume: promotion already done (%s)", manifest.get("promote"))
        return manifest.get("promote")
    run_key = manifest.data["run_key"]
    existing = registered_version_for(recipe, run_key)
    if existing is not None:
        # Killed after registering but before the manifest said so: never register twice.
        log.info("resume: run %s is already registered as version %s", run_key, existing["version"])
        if verdict.decision.value == "PASS" and not existing["promoted"]:
            tracker.client.set_registered_model_alias(existing["name"], recipe.promotion.alias, existing["version"])
            existing["promoted"] = True
        manifest.mark("promote", **existing)
        return existing
    with clock.stage("promote"):
        reg = register_checkpoint(
            tracker, "checkpoint", recipe.promotion,
            passed=verdict.decision.value == "PASS", decision=verdict.decision.value,
            tags={
                "quantgate.verdict": verdict.decision.value, "quantgate.recipe": recipe.name,
                "quantgate.format": fmt.name, "quantgate.recipe_hash": recipe.content_hash(),
                "quantgate.calibration_sha256": calib.content_sha256 if calib else "none",
                "quantgate.baseline_key": base.key, "quantgate.run_key": run_key,
            },
        )
    info = asdict(reg)  # Registration.version is already a string
    atomic_write_json(run_dir / "registration.json", info)
    manifest.mark("promote", **info)
    return info


def registered_version_for(recipe: Recipe, run_key: str) -> dict[str, Any] | None:
    """The model version an earlier attempt of this run directory registered, if any."""
    # wiring (issue 10): the guard lives in quantgate.tracking.registry (tag written outside redaction)
    from quantgate.tracking import registered_version_for as _registered

    return _registered(recipe.promotion.registered_model, run_key, recipe.promotion.alias, tracking_uri=recipe.tracking)


def mark_interrupted(recipe: Recipe, old_run_id: str, new_run_id: str) -> None:
    """A run killed with SIGKILL leaves its MLflow run RUNNING: close it as FAILED."""
    # wiring (issue 10): in the run's own store (was MlflowClient() -> a stray ./mlflow.db)
    from quantgate.tracking import close_interrupted_run, resolve_tracking_uri

    close_interrupted_run(resolve_tracking_uri(recipe.tracking), old_run_id, new_run_id)


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


def write_item_jsonl(path: Path, baseline: Any, candidate: Any) -> None:
    """Per-item results of both sides, one JSON line per (task, item)."""
    lines = []
    for task, bt in baseline.tasks.items():
        ct = candidate.tasks.get(task)
        cand_items = {i.doc_id: i for i in ct.items} if ct else {}
        for item in bt.items:
            c = cand_items.get(item.doc_id)
            lines.append(json.dumps({"task": task, "doc_id": item.doc_id, "prompt_hash": item.prompt_hash,
                                     "baseline": item.model_dump(exclude={"doc_id", "prompt_hash"}, exclude_none=True),
                                     "candidate": c.model_dump(exclude={"doc_id", "prompt_hash"}, exclude_none=True) if c else None}))
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---- logging ------------------------------------------------------------------------------------


def attach_log_file(path: Path) -> Path:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name(f"quantgate-file:{path}")
    logging.getLogger().addHandler(handler)
    return path


def detach_log_file(path: Path) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == f"quantgate-file:{path}":
            root.removeHandler(h)
            h.close()


# ---- many recipes ----------------------------------------------------------------------------------


def run_recipes(recipes: list[tuple[Recipe, str]], *, fresh: bool = False) -> list[RecipeOutcome]:
    """Run recipes against one baseline. More than one: a parent MLflow run, a child per recipe."""
    memo: dict[str, Baseline] = {}
    if len(recipes) == 1:
        recipe, source = recipes[0]
        return [run_recipe(recipe, source, fresh=fresh, baseline_memo=memo)]
    outcomes: list[RecipeOutcome] = []
    first = recipes[0][0]
    tags = {"quantgate.matrix": "true"}
    if first.tracking.enabled:
        from quantgate.tracking import version_tags

        tags.update(version_tags())
    with open_tracker(first, "matrix: " + ", ".join(r.name for r, _ in recipes), tags=tags) as parent:
        for recipe, source in recipes:
            outcomes.append(run_recipe(recipe, source, fresh=fresh, baseline_memo=memo, parent_run_id=parent.run_id))
        parent.set_tags({"quantgate.verdicts": ", ".join(f"{o.recipe}={o.decision}" for o in outcomes)})
        parent.log_metrics({f"{o.recipe}.exit_code": o.exit_code for o in outcomes})
        table = matrix_table(outcomes)
        parent.log_text(table, "matrix.txt")
    return outcomes


def matrix_table(outcomes: list[RecipeOutcome]) -> str:
    keys = sorted({k for o in outcomes for k in o.deltas})
    head = ["recipe", "format", "ckpt MB", *keys, "verdict"]
    rows = [[o.recipe, o.format, f"{(o.checkpoint_bytes or 0) / 1e6:.1f}", *[f"{o.deltas[k]:+.4g}" if k in o.deltas else "-" for k in keys], o.decision] for o in outcomes]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    fmt_row = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False))  # noqa: E731
    return "\n".join([fmt_row(head), fmt_row(["-" * w for w in widths]), *map(fmt_row, rows)])
