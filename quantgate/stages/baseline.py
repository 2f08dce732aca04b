"""Stage `baseline`: the 16-bit export of the model, evaluated through the recipe's engine.

Both sides of the gate go through the same export -> engine -> evaluate path. The baseline's
results are content-addressed (quantgate/cache.py): a matrix or a later run with the same key
reuses them instead of evaluating again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from quantgate import cache, formats
from quantgate.artifacts import Artifact, Checkpoint
from quantgate.evaluation.results import EvalResults
from quantgate.rundir import atomic_write_text
from quantgate.stages import MISSING, RunContext, Stage
from quantgate.stages.model import ModelRef

log = logging.getLogger("quantgate")


class BaselineRecord(Artifact):
    """What the run directory keeps of the baseline besides its results."""

    checkpoint: Checkpoint
    key: str
    cache_hit: bool


@dataclass
class Baseline:
    checkpoint: Checkpoint
    results: EvalResults
    key: str
    cache_hit: bool


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def release_memory() -> None:
    """Drop a finished model before the next one loads (a matrix run holds one at a time)."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_checkpoint(ckpt: Checkpoint, recipe: Any, side: str, golden_reference: Any = None, clock: Any = None) -> EvalResults:
    """Load the checkpoint in the recipe's engine and evaluate it. The engine's one-time costs
    (load, warm-up, CUDA graph captures and counts) and memory (resident, load peak, checkpoint
    tensors) are noted on the clock per side, apart from the evaluation's own time."""
    from quantgate.engines import load_engine
    from quantgate.evaluation.run import evaluate_side

    try:
        with load_engine(ckpt, recipe.engine) as engine:
            try:
                return evaluate_side(engine, recipe.evaluation, side=side, golden_reference=golden_reference)
            finally:  # after the evaluation: the costs include how generation decoded (torch_prefix.py)
                if clock is not None:
                    clock.note(side, engine.one_time_costs(), engine.memory_stats())
    finally:
        release_memory()


def tokenizer_files_hash(path: Path) -> str:
    """Hash of the tokenizer and chat-template files of a checkpoint."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def baseline_checkpoint(recipe: Any, model: ModelRef, clock: Any) -> Checkpoint:
    """The 16-bit baseline export (plain HF checkpoint), shared by every recipe on this model."""
    from quantgate.export import export_checkpoint
    from quantgate.models import cache_root, load_model

    out = cache_root() / "baseline_checkpoints" / f"{model.content_hash[:16]}-{recipe.model.dtype}"
    meta = out.parent / f"{out.name}.json"
    if meta.is_file() and (out / "config.json").is_file():
        return Checkpoint.load(meta)
    # Another process (a Ray worker of the same matrix) may be writing this export now: wait for
    # it rather than replacing the folder under its feet.
    with cache.fill_lock(f"baseline-export-{out.name}"):
        if meta.is_file() and (out / "config.json").is_file():
            return Checkpoint.load(meta)
        with clock.stage("baseline_export"):
            hf_model, tok = load_model(model.dir, recipe.model, dtype=torch_dtype(recipe.model.dtype), device="cpu")
            ckpt = export_checkpoint(hf_model, tok, formats.get_format("fp16"), recipe.model.dtype, out)
            del hf_model
            release_memory()
            ckpt.save(meta)
    return ckpt


def baseline_key_parts(recipe: Any, model: ModelRef, ckpt: Checkpoint) -> dict[str, Any]:
    """Everything that changes the baseline's results. The backend contributes its own identity
    (device, compute dtype, its version and scoring method), so a stale baseline is never judged
    against a candidate evaluated another way."""
    from importlib import metadata

    from quantgate import __version__
    from quantgate.engines import backend_identity
    from quantgate.evaluation.golden import GOLDEN_BATCHING
    from quantgate.evaluation.suites import suite_fingerprint

    versions = {}
    for pkg in ("lm_eval", "transformers", "torch", "nvidia-modelopt"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "absent"
    return {
        "model_source": recipe.model.source,
        "model_content": model.content_hash,
        "dtype": recipe.model.dtype,
        "checkpoint_tokenizer": tokenizer_files_hash(ckpt.dir),
        "suite": suite_fingerprint(recipe.evaluation),
        "evaluation": recipe.evaluation.model_dump(mode="json"),
        "backend": recipe.engine.backend,
        "engine": recipe.engine.model_dump(mode="json", exclude={"device"}),
        "backend_identity": backend_identity(recipe),
        "golden_batching": GOLDEN_BATCHING,
        "versions": {**versions, "quantgate": __version__},
    }


def check_prompt_lengths_early(recipe: Any, model_dir: Path, memo: Path) -> None:
    """Preflight's prompt-length check before any calibration when the baseline came from the
    cache (no baseline evaluation will catch over-long prompts). The length is memoized beside
    the cache entry, whose key covers the tokenizer, suite and limits."""
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


class EvaluateBaseline(Stage):
    """Export the 16-bit model and evaluate it (or reuse the cached evaluation with the same key)."""

    name: ClassVar[str] = "baseline"
    needs: ClassVar[tuple[str, ...]] = ("model",)
    produces: ClassVar[str] = "baseline"

    def identity(self, recipe: Any) -> Any:
        from quantgate.engines import backend_identity

        return {"dtype": recipe.model.dtype, "evaluation": recipe.evaluation.model_dump(mode="json"),
                "engine": recipe.engine.model_dump(mode="json"), "backend": backend_identity(recipe)}

    def run(self, ctx: RunContext, *, model: ModelRef) -> Baseline:
        recipe = ctx.recipe
        ckpt = baseline_checkpoint(recipe, model, ctx.clock)
        parts = baseline_key_parts(recipe, model, ckpt)
        key = cache.cache_key(parts)
        if key in ctx.baseline_memo:
            log.info("baseline: cache hit %s (this process)", key)
            return Baseline(ckpt, ctx.baseline_memo[key].results, key, True)
        # Evaluated once per key across processes: a second process needing the same baseline
        # waits for the first's evaluation, then reads it from the cache.
        with cache.fill_lock(f"baseline-{key}"):
            text = cache.load_entry(key)
            if text is None:
                log.info("baseline: cache miss %s; evaluating the %s baseline", key, recipe.model.dtype)
                with ctx.clock.stage("baseline_evaluate"):
                    results = evaluate_checkpoint(ckpt, recipe, "baseline", clock=ctx.clock)
                if not results.errors:  # never cache a failed evaluation
                    cache.store_entry(key, results.model_dump_json(), parts)
                base = Baseline(ckpt, results, key, False)
        if text is not None:
            log.info("baseline: cache hit %s", key)
            with ctx.clock.stage("prompt_lengths"):
                check_prompt_lengths_early(recipe, model.dir, cache.baseline_root() / key / "longest_prompt.txt")
            base = Baseline(ckpt, EvalResults.model_validate_json(text), key, True)
        ctx.baseline_memo[key] = base
        return base

    def save(self, ctx: RunContext, value: Baseline) -> dict[str, Any]:
        value.results.save(ctx.run_dir / "baseline_results.json")
        BaselineRecord(checkpoint=value.checkpoint, key=value.key, cache_hit=value.cache_hit).save(ctx.run_dir / "baseline.json")
        return {"file": "baseline_results.json", "cache_key": value.key}

    def load(self, ctx: RunContext) -> Any:
        try:
            rec = BaselineRecord.load(ctx.run_dir / "baseline.json")
            results = EvalResults.load(ctx.run_dir / "baseline_results.json")
        except (OSError, ValueError):
            return MISSING
        if not (rec.checkpoint.dir / "config.json").is_file():
            return MISSING  # the shared baseline export was cleared: evaluate again
        return Baseline(rec.checkpoint, results, rec.key, True)
