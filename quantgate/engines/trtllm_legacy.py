"""Legacy TensorRT-LLM path: ModelOpt's TRT-LLM checkpoint -> `trtllm-build` engine -> TensorRT backend.

Needed for INT8 SmoothQuant (W8A8_SQ_PER_CHANNEL), which the PyTorch backend's quantization matrix
lacks (TRT-LLM `docs/source/features/quantization.md`; ModelOpt's `hf_ptq.py` forces the legacy export
for it). Not run here: TensorRT-LLM cannot be installed on these machines; tested with a stand-in.

Versions: `trtllm-build` (`tensorrt_llm/commands/build.py`) and the TensorRT-backend LLM
(`tensorrt_llm/_tensorrt_engine/__init__.py`: `from tensorrt_llm.llmapi.llm import _TrtLLM as LLM`)
ship in the TRT-LLM 1.0-1.2 line. TRT-LLM main removed both (`docs/source/legacy/
tensorrt-backend-removal.md`, PR #15767): there `LLM(backend="tensorrt")` raises and there is no
`trtllm-build`. So availability is decided by what is installed, never assumed from a version.

ModelOpt side: `modelopt.torch.export.export_tensorrt_llm_checkpoint` (0.47; deprecated in 0.48,
removed in 0.49). It needs `inference_tensor_parallel >= 1` (0 raises ZeroDivisionError without
tensorrt_llm, STACK.md).

Runner choice: the TensorRT-backend `LLM` (1.0-1.2) rather than `tensorrt_llm.runtime.ModelRunnerCpp`,
so scoring and generation share the LLM-API code of the PyTorch path. It loads a built engine
directory as `model` with the tokenizer from the unified checkpoint. Scoring reads context logits,
which the engine returns only when built with `--gather_context_logits` (build.py, "Logits arguments").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.errors import StageError

if TYPE_CHECKING:
    from quantgate.artifacts import Checkpoint
    from quantgate.formats import FormatSpec
    from quantgate.recipe import EngineSpec

log = logging.getLogger(__name__)

LAST_LEGACY_LINE = "1.2"
# QDQ formats build without a GEMM plugin (ModelOpt 0.27 examples/llm_ptq/modelopt_to_tensorrt_llm.py
# and NeMo's TRT-LLM export: `use_qdq = quant_algo in ["FP8", "W8A8_SQ_PER_CHANNEL"]`).
QDQ_ALGOS = ("FP8", "W8A8_SQ_PER_CHANNEL")
STAMP = "quantgate_build.json"
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class LegacyPaths:
    """Where the legacy artifacts live: beside the unified checkpoint, never inside it (that folder
    is what gets registered and shipped)."""

    checkpoint_dir: Path
    engine_dir: Path
    build_log: Path


def legacy_paths(checkpoint_dir: Path | str) -> LegacyPaths:
    """`<ckpt>-trtllm_checkpoint/`, `<ckpt>-trtllm_engine/`, `<ckpt>-trtllm_build.log` beside the
    unified checkpoint `<ckpt>/` (named after it, so a baseline and a candidate never collide)."""
    ckpt = Path(checkpoint_dir)
    root, name = ckpt.parent, ckpt.name
    return LegacyPaths(root / f"{name}-trtllm_checkpoint", root / f"{name}-trtllm_engine", root / f"{name}-trtllm_build.log")


def installed_version() -> str | None:
    """TensorRT-LLM's version from package metadata, without importing it (which needs a GPU)."""
    from importlib import metadata

    for name in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def trtllm_build_executable() -> list[str] | None:
    """The trtllm-build command line prefix, or None where this TRT-LLM has none."""
    exe = shutil.which("trtllm-build")
    if exe:
        return [exe]
    try:
        has_module = _module_file_exists("tensorrt_llm", "commands/build.py")
    except (ImportError, ValueError):
        has_module = False
    return [sys.executable, "-m", "tensorrt_llm.commands.build"] if has_module else None


def _module_file_exists(package: str, relative: str) -> bool:
    """A file inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any((Path(loc) / relative).is_file() for loc in locations)


def legacy_availability() -> tuple[bool, str]:
    """(available, one-line reason) for the legacy trtllm-build path on this machine."""
    version = installed_version()
    if version is None:
        return False, "TensorRT-LLM is not installed"
    if trtllm_build_executable() is None:
        return False, (
            f"TensorRT-LLM {version} has no trtllm-build (removed after the {LAST_LEGACY_LINE}.x line); "
            f"install 'tensorrt-llm<1.3' for the legacy path"
        )
    return True, f"TensorRT-LLM {version} with trtllm-build"


# ---- export (called by the export stage with the in-memory quantized model) ---------------------


def export_legacy_checkpoint(model: Any, decoder_type: str, dtype: Any, out_dir: Path | str, tp: int = 1) -> Path:
    """Write ModelOpt's TRT-LLM checkpoint (config.json + rank*.safetensors) for trtllm-build.

    Call it on the quantized model BEFORE `export_hf_checkpoint`, which mutates the model.
    `decoder_type` is ModelOpt's name ("llama", "qwen", ...); `dtype` a torch dtype or "float16"/
    "bfloat16" (unquantized tensors are written in it).
    """
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1 (ModelOpt divides by it), got {tp}")
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    if isinstance(dtype, str):
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(
            model,
            decoder_type=decoder_type,
            dtype=dtype,
            export_dir=out,
            inference_tensor_parallel=tp,
            inference_pipeline_parallel=1,
        )
    if not (out / "config.json").is_file():
        raise StageError("export", f"export_tensorrt_llm_checkpoint wrote no config.json in {out}")
    return out


# ---- build -----------------------------------------------------------------------------------------


def default_gemm_plugin(quant_algo: str | None) -> str:
    return "disable" if quant_algo in QDQ_ALGOS else "auto"


def build_command(ckpt_dir: Path | str, engine_dir: Path | str, spec: EngineSpec, fmt: FormatSpec, *, executable: Sequence[str] | None = None) -> list[str]:
    """The trtllm-build command line (flags from TRT-LLM 1.x `tensorrt_llm/commands/build.py` and
    `tensorrt_llm/plugin/plugin.py`; plugin/feature flags take 'enable'/'disable' or a dtype)."""
    from quantgate.engines.tensorrt_llm import resolve_max_num_tokens

    exe = list(executable) if executable is not None else (trtllm_build_executable() or ["trtllm-build"])
    gemm = spec.trtllm_gemm_plugin or default_gemm_plugin(fmt.quant_algo)
    return [
        *exe,
        "--checkpoint_dir", str(ckpt_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(spec.max_batch_size),
        "--max_input_len", str(spec.max_input_len),
        "--max_seq_len", str(spec.max_seq_len),
        "--max_num_tokens", str(resolve_max_num_tokens(spec)),
        "--max_beam_width", "1",
        "--gemm_plugin", gemm,
        "--use_paged_context_fmha", "enable",
        "--kv_cache_type", "paged",
        # The runner scores from context logits; the engine only returns them when built so.
        "--gather_context_logits",
        "--workers", str(spec.tensor_parallel_size),
    ]


def run_build(cmd: Sequence[str], log_path: Path | str, *, timeout: float | None = None) -> float:
    """Run trtllm-build, teeing its output to log_path; seconds taken. StageError on failure."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False, env=os.environ.copy())
        except FileNotFoundError:
            raise StageError("engine", f"{cmd[0]!r} not found; the legacy path needs TensorRT-LLM <= {LAST_LEGACY_LINE}.x with trtllm-build") from None
        except subprocess.TimeoutExpired:
            raise StageError("engine", f"trtllm-build did not finish within {timeout:.0f} s; see {log_path}") from None
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        last = next((line.strip() for line in reversed(tail) if line.strip()), "")
        raise StageError("engine", f"trtllm-build failed (exit {proc.returncode}): {last[:300]} (full log: {log_path})")
    return time.monotonic() - t0


def engine_matches(engine_dir: Path, cmd: Sequence[str]) -> bool:
    """True if engine_dir holds an engine built by exactly this command line."""
    stamp = engine_dir / STAMP
    if not (engine_dir / "config.json").is_file() or not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text(encoding="utf-8")).get("command") == list(cmd[1:])
    except (OSError, json.JSONDecodeError):
        return False


def ensure_engine(checkpoint: Checkpoint, spec: EngineSpec, fmt: FormatSpec) -> tuple[LegacyPaths, dict[str, Any]]:
    """Build the engine from the exported TRT-LLM checkpoint unless an identical build exists."""
    paths = legacy_paths(checkpoint.dir)
    if not (paths.checkpoint_dir / "config.json").is_file():
        raise StageError(
            "engine",
            f"no TRT-LLM checkpoint at {paths.checkpoint_dir}; the legacy path needs the export stage "
            "to write it (trtllm_legacy.export_legacy_checkpoint on the in-memory quantized model)",
        )
    cmd = build_command(paths.checkpoint_dir, paths.engine_dir, spec, fmt)
    info: dict[str, Any] = {"build_command": " ".join(cmd[1:]), "gemm_plugin": cmd[cmd.index("--gemm_plugin") + 1]}
    if engine_matches(paths.engine_dir, cmd):
        info["build_seconds"] = 0.0
        return paths, info
    if paths.engine_dir.exists():
        shutil.rmtree(paths.engine_dir)
    info["build_seconds"] = round(run_build(cmd, paths.build_log), 1)
    # The stamp leaves out the executable path: the same build from another venv is the same engine.
    (paths.engine_dir / STAMP).write_text(json.dumps({"command": cmd[1:]}, indent=1), encoding="utf-8")
    return paths, info


# ---- runtime ----------------------------------------------------------------------------------------


def load_runner(checkpoint: Checkpoint, spec: EngineSpec, fmt: FormatSpec) -> tuple[Any, Any, dict[str, Any]]:
    """(llm, SamplingParams class, settings) for a built engine, on the TensorRT-backend LLM API."""
    paths, info = ensure_engine(checkpoint, spec, fmt)
    try:
        from tensorrt_llm._tensorrt_engine import LLM as TrtLLM
    except ImportError:
        raise StageError(
            "engine",
            f"this TensorRT-LLM has no TensorRT engine runtime (tensorrt_llm._tensorrt_engine); the "
            f"legacy path needs the 1.0-{LAST_LEGACY_LINE}.x line",
        ) from None
    from tensorrt_llm import SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    from quantgate.engines.tensorrt_llm import kv_cache_kwargs

    # KV-cache dtype is baked into the engine at build (KvCacheConfig.dtype is PyTorch-only).
    kv = KvCacheConfig(**kv_cache_kwargs(spec, None))
    try:
        llm = TrtLLM(
            model=str(paths.engine_dir),
            tokenizer=str(checkpoint.dir),
            tensor_parallel_size=spec.tensor_parallel_size,
            kv_cache_config=kv,
        )
    except Exception as err:
        raise StageError("engine", f"TensorRT-LLM could not load the engine in {paths.engine_dir}: {type(err).__name__}: {err}") from err
    info["engine_dir"] = str(paths.engine_dir)
    return llm, SamplingParams, info


# ---- the stage this path adds to a run's plan (see engines/__init__.py: extra_stages) -----------

# ModelOpt's decoder_type names for export_tensorrt_llm_checkpoint, by HF model_type.
DECODER_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen", "qwen3": "qwen", "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3", "mixtral": "llama"}


def decoder_type(model: Any) -> str:
    from quantgate.errors import StageError

    model_type = getattr(model.config, "model_type", "")
    if model_type not in DECODER_TYPES:
        raise StageError("export", f"no legacy TensorRT-LLM decoder type known for model_type {model_type!r}; use a PyTorch-backend format (fp8, int4_awq)")
    return DECODER_TYPES[model_type]


def _legacy_export_stage() -> Any:
    from typing import ClassVar

    from quantgate.stages import RunContext, Stage

    class ExportLegacy(Stage):
        """Write ModelOpt's legacy TensorRT-LLM checkpoint for trtllm-build (before `export`,
        which mutates the model)."""

        name: ClassVar[str] = "export_legacy"
        needs: ClassVar[tuple[str, ...]] = ("calibrated",)
        produces: ClassVar[str] = "legacy_checkpoint"

        def identity(self, recipe: Any) -> Any:
            return {"tp": recipe.engine.tensor_parallel_size, "dtype": recipe.model.dtype}

        def run(self, ctx: RunContext, *, calibrated: Any) -> str:
            out = legacy_paths(ctx.run_dir / "checkpoint").checkpoint_dir
            export_legacy_checkpoint(calibrated.model, decoder_type(calibrated.model), ctx.recipe.model.dtype, out, ctx.recipe.engine.tensor_parallel_size)
            return str(out)

        def save(self, ctx: RunContext, value: str) -> dict[str, Any]:
            return {"dir": value}

        def load(self, ctx: RunContext) -> Any:
            from quantgate.stages import MISSING

            out = legacy_paths(ctx.run_dir / "checkpoint").checkpoint_dir
            return str(out) if (out / "config.json").is_file() else MISSING

    return ExportLegacy()
