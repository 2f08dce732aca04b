"""The search spec: a base recipe plus an ordered ladder of candidates, and its expansion into
recipes (one per candidate, grid knobs expanded), ordered cheapest first.

A spec is one YAML mapping; unknown keys are errors, a bad spec is one line and exit 2:

    name: smollm2-ladder
    base: ../recipes/_base.yaml          # relative to the spec file
    split: {fraction: 0.5, seed: 0}      # search / held-out confirmation split of every task
    candidates:                          # cheapest first (re-ordered by estimated bits per weight)
      - name: int4_awq_b64
        set: {quantization.format: int4_awq, quantization.awq_block_size: 64}
      - name: int8_sq
        set: {quantization.format: int8_sq}
        grid: {quantization.smoothquant_alpha: [0.5, 0.75, 1.0]}   # one candidate per value
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantgate.errors import RecipeError
from quantgate.recipe import PromotionSpec, Recipe, simple_name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    fraction: float = Field(
        0.5, ge=0.1, le=0.9,
        description="Share of each task's items (and of the golden prompts) in the search split; the rest is the "
        "held-out confirmation split. Assigned by a hash of (seed, task, item id): deterministic, disjoint.",
    )
    seed: int = Field(0, ge=0, description="Salt of the split hash (a new seed draws a new split).")


class CandidateSpec(_Strict):
    name: str = Field(..., description="Short name (no spaces or slashes); becomes the candidate recipe's name.")
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="Recipe overrides as dotted keys, exactly as `--set` (e.g. quantization.format: fp8).",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Knob lists expanded into one candidate per combination (e.g. quantization.smoothquant_alpha: "
        "[0.5, 0.75, 1.0]); the value joins the candidate's name.",
    )

    @field_validator("name")
    @classmethod
    def _simple(cls, v: str) -> str:
        return simple_name(v)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"grid {key!r} has no values")
        return v


class SearchSpec(_Strict):
    name: str = Field(..., description="Name of the search (MLflow parent run, lineage tags, output folder).")
    description: str = Field("", description="What this search is for.")
    base: str = Field(..., description="Base recipe YAML, relative to the spec file (extends: works as in recipes).")
    candidates: list[CandidateSpec] = Field(..., min_length=1, description="The ladder, cheapest first.")
    order: Literal["estimate", "given"] = Field(
        "estimate",
        description="'estimate': sort the ladder by the format registry's estimate of bits per weight (ties keep the "
        "given order); 'given': run in the order written.",
    )
    split: SplitSpec = Field(default_factory=SplitSpec)

    @field_validator("name")
    @classmethod
    def _simple(cls, v: str) -> str:
        return simple_name(v)


@dataclass
class Candidate:
    """One rung of the ladder: a resolved recipe and where it came from."""

    name: str
    recipe: Recipe
    overrides: list[str]
    bits_estimate: float
    promotion: PromotionSpec  # the base recipe's: used for the confirmed winner only
    index: int = 0  # position in the ladder actually run (cheapest first)
    given_index: int = 0


def bits_per_weight(recipe: Recipe) -> float:
    """Estimated stored bits per linear weight from the format registry: the weight bits plus one
    16-bit scale per AWQ block (a cost estimate to order the ladder; the measured checkpoint bytes
    are what the report shows)."""
    from quantgate import formats

    fmt = formats.get_format(recipe.quantization.format)
    if fmt.is_auto and recipe.quantization.auto_quantize:  # its budget (AWQ block scales not counted)
        return float(recipe.quantization.auto_quantize.effective_bits)
    bits = float(fmt.weight_bits)
    if fmt.uses_awq:
        block = recipe.quantization.awq_block_size or fmt.default_awq_block_size or 128
        bits += 16.0 / block
    return bits


SHORT = {"awq_block_size": "b", "smoothquant_alpha": "a", "num_samples": "n", "seq_len": "len", "effective_bits": "eb"}


def _label(key: str, value: Any) -> str:
    last = key.split(".")[-1]
    return f"-{SHORT.get(last, last)}{value}"


def _override(key: str, value: Any) -> str:
    # JSON is valid YAML, so `--set`'s own parser reads the value back exactly.
    return f"{key}={json.dumps(value)}"


def load_spec(path: str | Path) -> SearchSpec:
    from quantgate.recipe import _format_validation_error, _read_yaml_mapping

    data = _read_yaml_mapping(Path(path), str(path))
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as err:
        key, msg = _format_validation_error(err)
        raise RecipeError(str(path), key, msg) from None


def expand(spec: SearchSpec, spec_path: str | Path, cli_overrides: list[str] | None = None) -> list[Candidate]:
    """One recipe per candidate (and per grid combination), validated like a recipe file, ordered
    cheapest first. Every candidate runs with promotion off: only the confirmed winner is
    registered, by the search itself."""
    from quantgate.recipe import _load_with_extends

    shown = str(spec_path)
    base_path = Path(spec_path).parent / spec.base
    if not base_path.is_file():
        raise RecipeError(shown, "base", f"base recipe {spec.base!r} not found next to the spec")
    base = _load_with_extends(base_path, str(base_path))
    out: list[Candidate] = []
    seen: set[str] = set()
    for i, cand in enumerate(spec.candidates):
        where = f"candidates.{i}"
        bad = [k for k in [*cand.set, *cand.grid] if k == "name" or k.split(".")[0] in ("gate", "promotion", "tracking", "output_dir")]
        if bad:
            raise RecipeError(shown, f"{where}.{bad[0]}", "the gate, promotion, tracking and output are the search's, the same for "
                              "every candidate (set them in the base recipe or with --set)")
        keys, values = list(cand.grid), [cand.grid[k] for k in cand.grid]
        for combo in itertools.product(*values) if keys else [()]:
            name = cand.name + "".join(_label(k, v) for k, v in zip(keys, combo, strict=True))
            if name in seen:
                raise RecipeError(shown, f"{where}.name", f"candidate {name!r} appears twice")
            seen.add(name)
            overrides = [_override(k, v) for k, v in cand.set.items()] + [_override(k, v) for k, v in zip(keys, combo, strict=True)]
            recipe = _candidate_recipe(base, overrides, list(cli_overrides or []), name, f"{shown} ({where}: {name})")
            promotion = recipe.promotion.model_copy(deep=True)
            recipe.promotion.enabled = False  # candidates never register; the search registers its confirmed winner
            out.append(Candidate(name, recipe, overrides, bits_per_weight(recipe), promotion, given_index=len(out)))
    if spec.order == "estimate":
        out.sort(key=lambda c: (c.bits_estimate, c.given_index))
    for i, c in enumerate(out):
        c.index = i
    return out


def _candidate_recipe(base: dict[str, Any], overrides: list[str], cli: list[str], name: str, source: str) -> Recipe:
    from quantgate.recipe import apply_overrides, recipe_from_data

    data = apply_overrides(base, overrides + cli)
    data["name"] = name
    recipe = recipe_from_data(data, source)
    from quantgate import formats

    if not formats.get_format(recipe.quantization.format).quantized:
        raise RecipeError(source, "quantization.format", "the 16-bit baseline is what candidates are judged against, not a candidate")
    return recipe


def search_key(spec: SearchSpec, candidates: list[Candidate]) -> str:
    """The search's identity: its name, the candidates' run directories and the split."""
    from quantgate.runner import run_dir_for

    blob = json.dumps([spec.name, [run_dir_for(c.recipe).name for c in candidates], spec.split.model_dump()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
