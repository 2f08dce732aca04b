"""Calibration stage: ModelOpt `mtq.quantize` with the format's config and a forward loop over
calibration batches. The model is quantized in place (no copy: an 8B model must fit in ~1.2x its
16-bit weights)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from quantgate.artifacts import CalibrationInfo
from quantgate.data import CalibrationBatches, calibration_batches
from quantgate.errors import PreflightError, StageError
from quantgate.evaluation.results import NonFiniteError, summarize_locations

if TYPE_CHECKING:
    from quantgate.formats import FormatSpec
    from quantgate.recipe import Recipe

log = logging.getLogger(__name__)


def check_awq_block_size(model: Any, block: int) -> None:
    """INT4 export needs every quantized Linear's input dim divisible by the block size
    (ModelOpt: "partial blocks are not supported"). Check before spending minutes calibrating."""
    import torch

    bad = sorted({m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n and m.in_features % block})
    if bad:
        fits = [b for b in (128, 64, 32) if all(d % b == 0 for d in bad)]
        hint = f"; set quantization.awq_block_size={fits[0]}" if fits else ""
        raise StageError("calibrate", f"AWQ block size {block} does not divide linear input dims {bad}{hint}")


def resolve_keep_16bit(model: Any, patterns: list[str]) -> list[str]:
    """Module-name globs for `quantization.keep_16bit`: 'first_block' / 'last_block' become the
    model's first / last decoder layer; every glob must name at least one Linear layer (a typo
    would otherwise quietly quantize everything)."""
    import re
    from fnmatch import fnmatchcase

    import torch

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    blocks = sorted({(m.group(1), int(m.group(2))) for n in linears if (m := re.match(r"(.*\.layers)\.(\d+)\.", n))}, key=lambda b: b[1])
    out = []
    for p in patterns:
        if p in ("first_block", "last_block"):
            if not blocks:
                raise PreflightError(f"quantization.keep_16bit: {p!r}: this model has no '<...>.layers.<i>' decoder layers; give module names instead")
            prefix, idx = blocks[0] if p == "first_block" else blocks[-1]
            p = f"{prefix}.{idx}"
        if not any(fnmatchcase(n, p) or fnmatchcase(n, f"{p}.*") for n in linears):
            example = linears[0] if linears else "?"
            raise PreflightError(f"quantization.keep_16bit: {p!r} matches no Linear layer of the model (names look like {example!r}); fix the pattern")
        out.append(p)
    return out


def decoder_of(model: Any) -> Any:
    """The transformer body without the output head, if the model exposes it and the head is
    excluded from quantization (ModelOpt's configs disable '*lm_head*')."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if decoder is not None and decoder is not model else model


def nonfinite_calibration_ranges(model: Any) -> list[str]:
    """'<quantizer>.amax = nan' for every enabled ModelOpt quantizer whose calibrated range (amax)
    or pre-quantization scale (AWQ/SmoothQuant) holds NaN/inf: such a quantizer turns its
    layer's outputs into NaN/inf, whatever the evaluation later reports."""
    import torch
    from modelopt.torch.quantization.nn import TensorQuantizer

    bad = []
    for name, module in model.named_modules():
        if not isinstance(module, TensorQuantizer) or not module.is_enabled:
            continue
        for attr in ("amax", "pre_quant_scale"):
            value = getattr(module, attr, None)
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                first = value.detach().flatten()[~torch.isfinite(value.detach().flatten())][0].item()
                bad.append(f"{name}.{attr} = {first}")
    return bad


def nonfinite_weights(model: Any) -> list[str]:
    """'<parameter> = nan' for every parameter or buffer holding NaN/inf (one reduction each)."""
    import torch

    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            flat = t.detach().flatten()
            bad.append(f"{name} = {flat[~torch.isfinite(flat)][0].item()}")
    return bad


def check_calibration_ranges(model: Any) -> None:
    """NonFiniteError (exit 3, one line naming the quantizers) if any calibrated range is not finite."""
    bad = nonfinite_calibration_ranges(model)
    if bad:
        raise NonFiniteError(
            "calibrate",
            f"{len(bad)} quantizer(s) got non-finite calibration ranges: {summarize_locations(bad)}: "
            "the model or the calibration data produces NaN/inf (check the weights and calibration.dataset)",
        )


def calibrate(model: Any, tokenizer: Any, recipe: Recipe, fmt: FormatSpec, device: str, data: CalibrationBatches | None = None) -> CalibrationInfo:
    """Quantize `model` in place. `data`: pre-tokenized batches (default: built from the recipe)."""
    import torch

    from quantgate.formats import get_format

    subformats = [get_format(n) for n in recipe.quantization.auto_quantize.formats] if fmt.is_auto and recipe.quantization.auto_quantize else []
    for f in [fmt, *subformats]:
        if f.uses_awq:
            check_awq_block_size(model, recipe.quantization.awq_block_size or f.default_awq_block_size or 128)
    # A NaN weight gives NaN ranges (ModelOpt asserts mid-calibration without naming the layer).
    bad = nonfinite_weights(model)
    if bad:
        raise NonFiniteError("calibrate", f"{len(bad)} model tensor(s) hold non-finite values: {summarize_locations(bad)}: fix the model's weights")
    if data is None:
        data = calibration_batches(recipe.calibration, tokenizer)
    keep = resolve_keep_16bit(model, recipe.quantization.keep_16bit)
    cfg = fmt.build_modelopt_config(recipe.quantization, keep) if not fmt.is_auto else {}
    import modelopt.torch.quantization as mtq
    from tqdm.auto import tqdm

    passes = {"n": 0}

    def forward_loop(m: Any) -> None:
        # AWQ runs the loop more than once (statistics, then search); show each pass.
        passes["n"] += 1
        # The decoder alone: lm_head is never quantized, and its logits (batch x seq x vocab) would
        # be the largest activation of the pass (0.5 GiB for 8 x 256 tokens at vocab 128K).
        body = decoder_of(m)
        for batch in tqdm(data.batches, desc=f"calibrate {fmt.name} pass {passes['n']}", leave=False, disable=None):
            body(input_ids=batch.to(device))

    t0 = time.perf_counter()
    choice: dict[str, Any] = {}
    try:
        if fmt.is_auto:
            choice = _auto_quantize(model, recipe, subformats, keep, data, device)
        else:
            with torch.no_grad():
                mtq.quantize(model, cfg, forward_loop)
    except AssertionError as err:  # ModelOpt's max calibrator: "detected nan values in amax"
        if "nan" not in str(err).lower():
            raise
        raise NonFiniteError(
            "calibrate", f"a quantizer saw NaN activations during calibration (ModelOpt: {str(err).splitlines()[0]}): "
            "the calibration data or the compute dtype overflows; try calibration on other text or model.dtype=bfloat16",
        ) from None
    seconds = time.perf_counter() - t0
    check_calibration_ranges(model)
    log.info("calibrated %s on %d x %d tokens in %.1f s (%s)", fmt.name, recipe.calibration.num_samples, recipe.calibration.seq_len, seconds,
             "calibration, sensitivity scoring and the per-layer choice" if fmt.is_auto else f"{passes['n']} passes")
    return CalibrationInfo(
        dataset=recipe.calibration.dataset, num_samples=recipe.calibration.num_samples,
        seq_len=recipe.calibration.seq_len, seed=recipe.calibration.seed,
        content_sha256=data.sha256, tokens=data.tokens, seconds=round(seconds, 3), **choice,
    )


def _auto_quantize(model: Any, recipe: Recipe, subformats: list[FormatSpec], keep: list[str], data: CalibrationBatches, device: str) -> dict[str, Any]:
    """ModelOpt auto_quantize: calibrate every candidate format, score each layer's sensitivity
    (loss gradients or KL on the calibration batches), then pick per layer a format or 16-bit so
    the average weight bits meet the budget. Returns what was chosen, for the record."""
    from collections import Counter

    import modelopt.torch.quantization as mtq
    import torch

    aq = recipe.quantization.auto_quantize
    assert aq is not None
    batches = [b.to(device) for b in data.batches]
    score = batches[: max(1, -(-(aq.score_samples or recipe.calibration.num_samples) // recipe.calibration.batch_size))]
    with torch.enable_grad():  # the gradient method backpropagates the loss
        try:
            model, state = _run_auto_quantize(mtq, model, aq, recipe, subformats, keep, batches, score)
        except ValueError as err:
            if "infeasible" not in str(err):
                raise
            # e.g. "The effective_bits target 6.0 is infeasible ... The minimum achievable effective bits is 7.43."
            # (lm_head and other 16-bit layers count in the average)
            raise PreflightError(f"quantization.auto_quantize.effective_bits: ModelOpt: {str(err).splitlines()[0]} Raise the budget.") from None
    model.zero_grad(set_to_none=True)
    best = state.get("best", {})
    recipes = best.get("recipe", {}) if isinstance(best, dict) else {}
    counts = Counter(_choice_name(str(v), subformats) for v in recipes.values()) if isinstance(recipes, dict) else Counter()
    log.info("auto_quantize (%s, effective bits <= %g): %s; effective bits %s", aq.method, aq.effective_bits,
             dict(counts), best.get("constraints") if isinstance(best, dict) else "?")
    return {"auto_quantize": {"effective_bits_budget": aq.effective_bits, "groups_per_choice": dict(counts),
                              "achieved": best.get("constraints") if isinstance(best, dict) else None}}


def _choice_name(recipe_str: str, subformats: list[FormatSpec]) -> str:
    """ModelOpt's name of a layer's choice -> the format registry's: 'FP8_DEFAULT_CFG(effective-bits: 8.0)'
    -> 'fp8'; a config it does not recognise is 'CUSTOM_<i>' (its index in the list we passed); 'NONE' -> '16-bit'."""
    import re

    head = recipe_str.split("(")[0]
    if head == "NONE":
        return "16-bit"
    if (m := re.fullmatch(r"CUSTOM_(\d+)", head)) and int(m.group(1)) < len(subformats):
        return subformats[int(m.group(1))].name
    return next((f.name for f in subformats if f.modelopt_config == head), head)


def _run_auto_quantize(mtq: Any, model: Any, aq: Any, recipe: Recipe, subformats: list[FormatSpec], keep: list[str],
                       batches: list[Any], score: list[Any]) -> tuple[Any, dict[str, Any]]:
    return mtq.auto_quantize(
        model, constraints={"effective_bits": aq.effective_bits},
        quantization_formats=[f.build_modelopt_config(recipe.quantization) for f in subformats],
        data_loader=batches, forward_step=lambda m, b: m(input_ids=b, labels=b), loss_func=lambda out, b: out.loss,
        num_calib_steps=len(batches), num_score_steps=len(score), method=aq.method,
        disabled_layers=["*lm_head*", *(f"{g}*" for g in keep)], verbose=False,
    )
