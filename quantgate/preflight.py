"""Preflight: refuse a run that cannot work here, BEFORE any calibration, and say what will run where.

Cheap by design: no ModelOpt, MLflow or lm-eval import, and `tensorrt_llm` is never imported (its
presence is checked with `importlib.util.find_spec`, its version read from package metadata). torch
is imported only to ask CUDA about the GPU. Every refusal is a `PreflightError` whose text is one
line naming the setting and the fix (the CLI exits 2).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import PreflightError, RecipeError

if TYPE_CHECKING:
    from quantgate.formats import FormatSpec
    from quantgate.recipe import Recipe

GIB = 1 << 30
TRTLLM_INSTALL = (
    "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com "
    "(on Linux with an NVIDIA GPU and CUDA 12/13)"
)
ARCH_NAMES = {(8, 0): "Ampere", (8, 9): "Ada/Hopper", (9, 0): "Hopper", (10, 0): "Blackwell"}
# quant_algo values the torch backend reproduces (quantgate/engines/torch_engine.py SUPPORTED_ALGOS).
TORCH_ENGINE_ALGOS = {None, "FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ", "MIXED_PRECISION"}
# SmolLM2-135M (STACK.md): known without converting the bundled GGUF.
BUNDLED_CONFIGS: dict[str, dict[str, Any]] = {
    "bundled:SmolLM2-135M-Instruct": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}


# ---- memory estimate -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    linear_params: int
    """Parameters in the decoder's linear layers (the ones a format quantizes)."""
    weight_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.kv_tokens

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def estimate_params(config: dict[str, Any]) -> tuple[int, int]:
    """(total parameters, decoder linear-layer parameters) of a Llama-style HF config."""
    c = _text_config(config)
    h = int(c["hidden_size"])
    layers = int(c["num_hidden_layers"])
    vocab = int(c["vocab_size"])
    heads = int(c.get("num_attention_heads") or max(h // 64, 1))
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    inter = int(c.get("intermediate_size") or 4 * h)
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o + k, v
    mlp = (3 if "intermediate_size" in c else 2) * h * inter  # gated (Llama) MLP vs plain GPT MLP
    linear = layers * (attn + mlp)
    embed = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    norms = layers * 2 * h + h
    return linear + embed + norms, linear


def kv_bytes_per_token(config: dict[str, Any], kv_cache: str = "none", dtype_bytes: int = 2) -> int:
    c = _text_config(config)
    h = int(c["hidden_size"])
    heads = int(c.get("num_attention_heads") or max(h // 64, 1))
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    elem = 1 if kv_cache == "fp8" else dtype_bytes
    return 2 * int(c["num_hidden_layers"]) * kv_heads * head_dim * elem


def weight_bits(fmt: FormatSpec, awq_block_size: int | None = None) -> float:
    """Bits per quantized linear weight, scales included where they are not negligible."""
    bits = float(fmt.weight_bits)
    if fmt.uses_awq:
        bits += 16.0 / float(awq_block_size or fmt.default_awq_block_size or 128)  # fp16 block scales
    if fmt.quant_algo == "NVFP4":
        bits += 8.0 / 16.0  # one FP8 scale per 16 elements
    return bits


def estimate_memory(
    config: dict[str, Any], fmt: FormatSpec, *, max_seq_len: int, max_batch_size: int,
    kv_cache: str = "none", awq_block_size: int | None = None, dtype_bytes: int = 2,
) -> MemoryEstimate:
    """Weights at the format's bits (16-bit embeddings, norms and lm_head) plus a full KV cache
    for max_batch_size sequences of max_seq_len tokens. Activations and workspaces not included."""
    total, linear = estimate_params(config)
    wbytes = int(linear * weight_bits(fmt, awq_block_size) / 8 + (total - linear) * dtype_bytes)
    return MemoryEstimate(total, linear, wbytes, kv_bytes_per_token(config, kv_cache, dtype_bytes), max_seq_len * max_batch_size)


def estimate_from_model_dir(model_dir: Path | str, fmt: FormatSpec, **kwargs: Any) -> MemoryEstimate:
    """`estimate_memory` from a model directory's config.json."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return estimate_memory(config, fmt, **kwargs)


def model_config_for(source: str) -> dict[str, Any] | None:
    """The model's config without loading it: a local dir's config.json or a bundled model's."""
    if source in BUNDLED_CONFIGS:
        return BUNDLED_CONFIGS[source]
    p = Path(source).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    return None


# ---- GPU facts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    available: bool
    count: int = 0
    name: str = ""
    capability: tuple[int, int] | None = None
    total_bytes: int = 0


@lru_cache(maxsize=1)
def gpu_info() -> GpuInfo:
    """What torch sees of CUDA (imports torch; called only when a check needs it)."""
    import torch

    if not torch.cuda.is_available():
        return GpuInfo(False)
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(True, torch.cuda.device_count(), torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0)), int(props.total_memory))


def trtllm_installed() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def _cc(cc: tuple[int, int]) -> str:
    return f"SM{cc[0]}{cc[1]}"


def check_compute_capability(fmt: FormatSpec, capability: tuple[int, int], gpu_name: str, kv_cache: str = "none") -> None:
    need = fmt.min_compute_capability
    if need is not None and tuple(capability) < tuple(need):
        arch = ARCH_NAMES.get(tuple(need), "")
        raise PreflightError(
            f"quantization.format={fmt.name} needs a GPU of compute capability {need[0]}.{need[1]}+ "
            f"({_cc(need)}+{', ' + arch if arch else ''}) in TensorRT-LLM; {gpu_name or 'this GPU'} is "
            f"{capability[0]}.{capability[1]}: pick a format this GPU runs or use engine.backend=torch"
        )
    if kv_cache == "fp8" and tuple(capability) < (8, 9):
        raise PreflightError(
            f"quantization.kv_cache=fp8 needs compute capability 8.9+ (SM89+); {gpu_name or 'this GPU'} is "
            f"{capability[0]}.{capability[1]}: set quantization.kv_cache=none"
        )


# ---- the report -----------------------------------------------------------------------------------


@dataclass
class PreflightReport:
    calibration_device: str
    engine_backend: str
    engine_device: str
    format: str
    lines: list[str] = field(default_factory=list)
    """What will run where, one fact a line (printed before the run starts)."""
    warnings: list[str] = field(default_factory=list)
    trtllm_path: str | None = None
    trtllm_version: str | None = None
    score_mode: str | None = None
    compute_capability: tuple[int, int] | None = None
    memory: MemoryEstimate | None = None

    def render(self) -> str:
        return "\n".join([*self.lines, *(f"warning: {w}" for w in self.warnings)])


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def preflight(recipe: Recipe, *, longest_prompt_tokens: int | None = None) -> PreflightReport:
    """Check backend, GPU, format, path, prompt lengths and memory; raise PreflightError or report."""
    from quantgate.formats import get_format

    try:
        fmt = get_format(recipe.quantization.format)
    except KeyError as err:
        raise PreflightError(f"quantization.format: {err.args[0]}") from None
    q, eng = recipe.quantization, recipe.engine

    # Prompt length first: it needs nothing but numbers, and fails the same on every machine.
    if longest_prompt_tokens is not None and longest_prompt_tokens > eng.max_input_len:
        raise PreflightError(
            f"the longest evaluation prompt has {longest_prompt_tokens} tokens but engine.max_input_len is "
            f"{eng.max_input_len}: it would be truncated or rejected; raise engine.max_input_len (and "
            f"engine.max_seq_len) to at least {longest_prompt_tokens}, or shorten the suite"
        )

    from quantgate.engines import backend_preflight

    try:
        report = backend_preflight(recipe, fmt)
    except KeyError as err:  # unknown backend: the registry's did-you-mean line
        raise PreflightError(f"engine.backend: {err.args[0]}") from None

    desc = f"format: {fmt.name} ({fmt.description})"
    if q.kv_cache != "none":
        desc += f", KV cache {q.kv_cache}"
    report.lines.insert(0, desc)
    if fmt.is_auto and q.auto_quantize:
        aq = q.auto_quantize
        report.lines.insert(1, f"calibration: ModelOpt auto_quantize ({aq.method} sensitivity) over {', '.join(aq.formats)} and 16-bit, "
                               f"effective bits <= {aq.effective_bits:g}, on {report.calibration_device}")
    elif fmt.quantized:
        report.lines.insert(1, f"calibration: ModelOpt {fmt.modelopt_config} ({fmt.algorithm}) on {report.calibration_device}")
    else:
        report.lines.insert(1, "calibration: none (16-bit baseline format)")
    report.lines.append("baseline: the same model in 16-bit on the same engine")

    limits = f"limits: max_batch_size={eng.max_batch_size}, max_input_len={eng.max_input_len}, max_seq_len={eng.max_seq_len}"
    if eng.backend == "tensorrt-llm":
        from quantgate.engines.tensorrt_llm import resolve_max_num_tokens
        from quantgate.errors import StageError

        try:
            limits += f", max_num_tokens={resolve_max_num_tokens(eng)}"
        except StageError as err:
            raise PreflightError(str(err).split(": ", 1)[1]) from None
    if longest_prompt_tokens is not None:
        limits += f"; longest prompt {longest_prompt_tokens} tokens"
        room = eng.max_seq_len - longest_prompt_tokens
        golden = recipe.evaluation.golden
        if golden.enabled and room < golden.max_new_tokens:
            report.warnings.append(
                f"the longest prompt leaves {room} tokens under engine.max_seq_len={eng.max_seq_len}, "
                f"fewer than evaluation.golden.max_new_tokens={golden.max_new_tokens}: generations will be cut"
            )
    report.lines.append(limits)

    config = model_config_for(recipe.model.source)
    if config is not None:
        try:
            mem = estimate_memory(
                config, fmt, max_seq_len=eng.max_seq_len, max_batch_size=eng.max_batch_size,
                kv_cache=q.kv_cache, awq_block_size=q.awq_block_size,
            )
        except (KeyError, TypeError, ValueError):
            mem = None
        if mem is not None:
            report.memory = mem
            report.lines.append(
                f"memory: weights ~{_gib(mem.weight_bytes)} ({mem.params / 1e6:.1f}M params, "
                f"{weight_bits(fmt, q.awq_block_size):g}-bit linear layers); full KV cache ~{_gib(mem.kv_bytes)} "
                f"for {eng.max_batch_size} x {eng.max_seq_len} tokens"
            )
            _check_memory(report, mem, recipe)
    else:
        report.lines.append("memory: not estimated (no local config.json for this model source)")
    return report


def _check_memory(report: PreflightReport, mem: MemoryEstimate, recipe: Recipe) -> None:
    if report.engine_backend == "torch":
        _check_memory_torch(report, recipe)
        return
    if report.engine_backend != "tensorrt-llm":
        return
    info = gpu_info()
    if not info.available or not info.total_bytes:
        return
    tp = recipe.engine.tensor_parallel_size
    per_gpu = info.total_bytes
    if mem.weight_bytes / tp > 0.9 * per_gpu:
        raise PreflightError(
            f"the {recipe.quantization.format} weights need ~{_gib(mem.weight_bytes // tp)} per GPU at "
            f"engine.tensor_parallel_size={tp}, more than {info.name} has ({_gib(per_gpu)}): raise "
            "engine.tensor_parallel_size or pick a smaller format"
        )
    free_for_kv = (per_gpu * tp - mem.weight_bytes) * recipe.engine.kv_cache_free_gpu_memory_fraction
    if mem.kv_bytes > free_for_kv:
        report.warnings.append(
            f"a full KV cache ({_gib(mem.kv_bytes)}) exceeds the ~{_gib(int(free_for_kv))} that "
            "engine.kv_cache_free_gpu_memory_fraction leaves: TensorRT-LLM will hold fewer sequences at once"
        )


def _check_memory_torch(report: PreflightReport, recipe: Recipe) -> None:
    """On a GPU: the per-stage memory plan (quantgate/memory_plan.py); refuse a stage that cannot fit."""
    from quantgate.formats import get_format
    from quantgate.memory_plan import plan_memory

    info = gpu_info()
    config = model_config_for(recipe.model.source)
    if report.engine_device != "cuda" or not info.available or not info.total_bytes or config is None:
        return
    fmt, q, eng, cal = get_format(recipe.quantization.format), recipe.quantization, recipe.engine, recipe.calibration
    fp8_ok = info.capability is not None and tuple(info.capability) >= (8, 9)
    plan = plan_memory(
        config, quant_algo=fmt.quant_algo, weight_bits=weight_bits(fmt, q.awq_block_size), gpu_bytes=info.total_bytes,
        max_batch_size=eng.max_batch_size, max_seq_len=eng.max_seq_len, calib_batch_size=cal.batch_size,
        calib_seq_len=cal.seq_len, kernels=eng.kernels, kernels_available=fp8_ok or fmt.quant_algo != "FP8", uses_awq=fmt.uses_awq,
    )
    report.lines.extend(plan.lines())
    if plan.refusal:
        raise PreflightError(plan.refusal)


def preflight_torch(recipe: Recipe, fmt: FormatSpec) -> PreflightReport:
    """The torch backend's own checks (engines/torch_engine.py `preflight` calls this)."""
    eng, q = recipe.engine, recipe.quantization
    if q.kv_cache != "none":
        raise PreflightError(
            f"quantization.kv_cache={q.kv_cache} is only reproduced by TensorRT-LLM; with engine.backend=torch "
            "set quantization.kv_cache=none"
        )
    from quantgate.formats import get_format

    subs = [get_format(n) for n in q.auto_quantize.formats] if fmt.is_auto and q.auto_quantize else []
    for sub in subs:
        if sub.quant_algo not in TORCH_ENGINE_ALGOS:
            raise PreflightError(
                f"quantization.auto_quantize.formats: {sub.name} ({sub.quant_algo}) is not reproduced by engine.backend=torch; "
                "leave it out or use engine.backend=tensorrt-llm on a GPU that runs it"
            )
    if fmt.quant_algo not in TORCH_ENGINE_ALGOS:
        raise PreflightError(
            f"quantization.format={fmt.name} ({fmt.quant_algo}) is not reproduced by engine.backend=torch; "
            "use engine.backend=tensorrt-llm on a GPU that runs it"
        )
    gpu = gpu_info()
    if eng.device == "cuda" and not gpu.available:
        raise PreflightError("engine.device=cuda but no CUDA GPU is visible; use engine.device=cpu or auto")
    device = "cpu" if eng.device == "cpu" or not gpu.available else "cuda"
    calib = "cuda" if gpu.available else "cpu"
    where = "cpu" if device == "cpu" else f"cuda ({gpu.name})"
    report = PreflightReport(calib, "torch", device, fmt.name)
    report.lines.append("export: unified HF checkpoint (ModelOpt export_hf_checkpoint)" if fmt.quantized else "export: 16-bit HF checkpoint")
    if device == "cuda" and eng.kernels == "auto" and fmt.quantized:
        report.lines.append(f"engine: torch on {where}: quantized weights stay quantized, real low-precision GEMMs (engine.kernels=auto)")
    else:
        report.lines.append(f"engine: torch on {where}: exported weights dequantized, activations fake-quantized from their scales")
    return report


def preflight_trtllm(recipe: Recipe, fmt: FormatSpec) -> PreflightReport:
    """TensorRT-LLM's own checks (engines/tensorrt_llm.py `preflight` calls this)."""
    from quantgate.engines import trtllm_legacy
    from quantgate.engines.tensorrt_llm import resolve_score_mode, resolve_trtllm_path
    from quantgate.errors import StageError

    eng, q = recipe.engine, recipe.quantization
    if not trtllm_installed():
        raise PreflightError(
            f"engine.backend=tensorrt-llm but TensorRT-LLM is not installed on this machine: {TRTLLM_INSTALL}, "
            "or run with --set engine.backend=torch"
        )
    version = trtllm_legacy.installed_version() or "unknown"
    gpu = gpu_info()
    if not gpu.available:
        raise PreflightError(
            f"engine.backend=tensorrt-llm needs an NVIDIA GPU, and CUDA sees none here (TensorRT-LLM {version} "
            "is installed): run on a GPU machine or use --set engine.backend=torch"
        )
    assert gpu.capability is not None
    check_compute_capability(fmt, gpu.capability, gpu.name, q.kv_cache)
    if eng.tensor_parallel_size > gpu.count:
        raise PreflightError(
            f"engine.tensor_parallel_size={eng.tensor_parallel_size} but only {gpu.count} GPU(s) are visible"
        )
    try:
        path = resolve_trtllm_path(eng.trtllm_path, fmt)
    except StageError as err:
        raise PreflightError(str(err).split(": ", 1)[1]) from None
    if path == "legacy":
        ok, why = trtllm_legacy.legacy_availability()
        if not ok:
            raise PreflightError(
                f"quantization.format={fmt.name} runs only on TensorRT-LLM's legacy trtllm-build path "
                f"(the {trtllm_legacy.LAST_LEGACY_LINE}.x line and older): {why}"
            )
    score_mode = resolve_score_mode(eng.trtllm_score_mode, version, path)
    report = PreflightReport("cuda", "tensorrt-llm", "cuda", fmt.name, trtllm_path=path, trtllm_version=version,
                             score_mode=score_mode, compute_capability=gpu.capability)
    if path == "legacy":
        report.lines.append("export: unified HF checkpoint + TRT-LLM checkpoint (export_tensorrt_llm_checkpoint) for trtllm-build")
        how = "legacy path: trtllm-build engine on the TensorRT backend"
    else:
        report.lines.append("export: unified HF checkpoint (ModelOpt export_hf_checkpoint)" if fmt.quantized else "export: 16-bit HF checkpoint")
        how = "PyTorch-backend path: tensorrt_llm.LLM on the unified checkpoint"
    report.lines.append(
        f"engine: TensorRT-LLM {version}, {how}, on {eng.tensor_parallel_size} x {gpu.name} "
        f"(compute capability {gpu.capability[0]}.{gpu.capability[1]})"
    )
    report.lines.append(
        "scoring: SamplingParams.prompt_logprobs (prompt token always included)" if score_mode == "prompt_logprobs"
        else "scoring: full context logits (return_context_logits), KV-cache block reuse off"
    )
    return report


# ---- inputs (issue 10: unreadable model files and short calibration data are bad input) ---------


def _tokenizer_file(recipe: Recipe) -> Path | None:
    """The model's tokenizer.json, where one exists without converting or downloading anything."""
    from quantgate.models import BUNDLED, cache_root

    src = recipe.model.source
    if src.startswith("bundled:"):
        name = src.split(":", 1)[1]
        spec = importlib.util.find_spec(BUNDLED[name][0]) if name in BUNDLED else None
        if spec is None or not spec.submodule_search_locations:
            return None
        gguf = Path(list(spec.submodule_search_locations)[0]) / BUNDLED[name][1]
        converted = cache_root() / "models" / f"{name}-{gguf.stat().st_size}" / "tokenizer.json" if gguf.is_file() else None
        return converted if converted is not None and converted.is_file() else None
    p = Path(src).expanduser() / "tokenizer.json"
    return p if p.is_file() else None


def check_model_files(recipe: Recipe, source_name: str = "recipe") -> None:
    """RecipeError (exit 2) for a model source whose files cannot be what they claim: a truncated
    or corrupt GGUF, safetensors whose header or sizes do not match the file, a missing or broken
    config.json. Reads headers only."""
    from quantgate.models import (
        BUNDLED,
        BadModelFile,
        _looks_like_path,
        check_gguf_file,
        check_model_dir,
    )

    src = recipe.model.source
    target: Path | None = None
    if src.startswith("bundled:"):
        name = src.split(":", 1)[1]
        spec = importlib.util.find_spec(BUNDLED[name][0]) if name in BUNDLED else None
        if spec is not None and spec.submodule_search_locations:
            target = Path(list(spec.submodule_search_locations)[0]) / BUNDLED[name][1]
    elif _looks_like_path(src):
        target = Path(src).expanduser()
    if target is None:
        return  # a hub id: its files arrive (and are checked by their loader) at run time
    how = "re-download or re-export the model, or point model.source at a complete copy"
    try:
        if target.is_dir():
            check_model_dir(target)
        elif target.suffix == ".gguf":
            check_gguf_file(target)
        elif target.suffix == ".safetensors":
            raise BadModelFile("a single .safetensors file is not a model: give its directory (with config.json)")
        elif not target.exists():
            raise BadModelFile("does not exist")
    except BadModelFile as err:
        text = str(err)
        where = text if text.startswith(str(target)) else f"{target}: {text}"
        raise RecipeError(source_name, "model.source", f"{where}; {how}") from None
    except OSError as err:
        raise RecipeError(source_name, "model.source", f"{target}: unreadable ({err.strerror or err}); {how}") from None


def check_inputs(recipe: Recipe, source_name: str = "recipe") -> None:
    """Bad input found before any model work (exit 2, one line: file, what, how to fix): model
    files (headers and sizes, never the weights) and, for quantized formats, calibration data that
    is unreadable, empty or shorter than calibration.num_samples x seq_len tokens."""
    from quantgate.data import check_calibration_data
    from quantgate.formats import get_format

    check_model_files(recipe, source_name)
    try:
        quantized = get_format(recipe.quantization.format).quantized
    except KeyError:
        quantized = True
    if quantized:
        check_calibration_data(recipe.calibration, source_name, _tokenizer_file(recipe))
