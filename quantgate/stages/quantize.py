"""Stages `calibrate`, `probe` and `export`: ModelOpt calibration, a look at the calibrated model
before export, and the unified checkpoint that is evaluated, registered and deployed.

The calibrated model lives only in memory (an 8B model is not written twice): a run killed
between calibrate and export calibrates again. ModelOpt's export mutates the model, so every
stage that reads the in-memory model comes before `export` in the plan.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from quantgate import formats
from quantgate.artifacts import CalibrationInfo, Checkpoint
from quantgate.evaluation.results import GoldenOutput
from quantgate.rundir import atomic_write_text
from quantgate.stages import MISSING, RunContext, Stage
from quantgate.stages.baseline import Baseline, release_memory, torch_dtype
from quantgate.stages.model import ModelRef

log = logging.getLogger("quantgate")


@dataclass
class CalibratedModel:
    model: Any
    tokenizer: Any
    info: CalibrationInfo
    device: str


def calibration_device(recipe: Any) -> str:
    import torch

    if recipe.engine.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


class Calibrate(Stage):
    """Load the 16-bit model and quantize it in place with ModelOpt over the calibration text."""

    name: ClassVar[str] = "calibrate"
    needs: ClassVar[tuple[str, ...]] = ("model",)
    produces: ClassVar[str] = "calibrated"
    persistent: ClassVar[bool] = False  # in memory only; calibration.json records what was done

    def __init__(self) -> None:
        self._compiling: subprocess.Popen[bytes] | None = None

    def identity(self, recipe: Any) -> Any:
        return {"dtype": recipe.model.dtype, "quantization": recipe.quantization.model_dump(mode="json"),
                "calibration": recipe.calibration.model_dump(mode="json"), "device": recipe.engine.device}

    def prefetch(self, ctx: RunContext) -> None:
        # On a fresh machine ModelOpt JIT-compiles its CUDA extensions (~50 s, CPU-bound nvcc):
        # a child process does it while the baseline is exported and evaluated on the GPU.
        recipe = ctx.recipe
        if calibration_device(recipe) == "cuda" and self._compiling is None and _warm_key(recipe.quantization, recipe.model.dtype) not in _WARMED:
            self._compiling = start_modelopt_cuda_compile(recipe)

    def run(self, ctx: RunContext, *, model: ModelRef) -> CalibratedModel:
        from quantgate.calibrate import calibrate
        from quantgate.leaks import import_clean
        from quantgate.models import load_model

        recipe = ctx.recipe
        device = calibration_device(recipe)
        fmt = formats.get_format(recipe.quantization.format)
        # One-time costs get their own lines, apart from calibration: the import (~8 s), and on
        # CUDA ModelOpt's JIT-compiled extensions (~50 s each on a fresh machine). import_clean
        # also drops the import-time tracebacks (PuLP keeps them) that would pin the model.
        with ctx.clock.stage("import_modelopt"):
            import_clean("modelopt.torch.quantization")
        if device == "cuda":
            with ctx.clock.stage("modelopt_cuda_extensions"):  # the clock logs the stage's whole time
                if self._compiling is not None:  # whatever it left undone, the warm-up below does
                    t0 = time.perf_counter()
                    rc = self._compiling.wait()
                    log.info("ModelOpt CUDA extensions: background compile exited with %s after %.1f s of waiting",
                             rc, time.perf_counter() - t0)
                warm_up_modelopt_cuda(fmt, recipe.quantization, torch_dtype(recipe.model.dtype))
                _WARMED.add(_warm_key(recipe.quantization, recipe.model.dtype))
        # CPU: calibrate in float32 (fast, exact fake-quant) and cast to 16-bit at export.
        dtype = torch_dtype(recipe.model.dtype) if device == "cuda" else torch_dtype("float32")
        with ctx.clock.stage("load_model"):
            hf_model, tok = load_model(model.dir, recipe.model, dtype=dtype, device=device)
        info = calibrate(hf_model, tok, recipe, fmt, device)
        info.save(ctx.run_dir / "calibration.json")
        return CalibratedModel(hf_model, tok, info, device)

    def save(self, ctx: RunContext, value: CalibratedModel) -> dict[str, Any]:
        return {"file": "calibration.json", "seconds": value.info.seconds, "sha256": value.info.content_sha256}


_WARMED: set[str] = set()  # quantizations whose extensions this process has loaded


def _warm_key(quantization: Any, dtype: Any) -> str:
    return json.dumps([quantization.model_dump(mode="json"), str(dtype)], sort_keys=True)


def modelopt_compile_command(recipe: Any) -> list[str]:
    payload = json.dumps({"quantization": recipe.quantization.model_dump(mode="json"), "dtype": recipe.model.dtype})
    code = "import sys; from quantgate.stages.quantize import warm_up_in_child; warm_up_in_child(sys.argv[1])"
    return [sys.executable, "-c", code, payload]


def start_modelopt_cuda_compile(recipe: Any) -> subprocess.Popen[bytes]:
    """A child process running `warm_up_modelopt_cuda` for the recipe's format: it compiles into
    TORCH_EXTENSIONS_DIR what this process then only loads. Never killed (torch's build lock
    would stay behind); its output goes nowhere (stdout may carry --json)."""
    return subprocess.Popen(modelopt_compile_command(recipe), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def warm_up_in_child(payload: str) -> None:
    from quantgate.recipe import QuantizationSpec

    # Lowest CPU priority for this child and its nvcc jobs: the parent's evaluation drives the GPU
    # from the CPU meanwhile, and calibration needs the result only minutes later.
    os.nice(19)

    data = json.loads(payload)
    quantization = QuantizationSpec.model_validate(data["quantization"])
    warm_up_modelopt_cuda(formats.get_format(quantization.format), quantization, torch_dtype(data["dtype"]))


def warm_up_modelopt_cuda(fmt: Any, quantization: Any, dtype: Any = None) -> None:
    """Quantize a two-layer toy on the GPU with the format's config and run it once quantized,
    in the model's dtype, so ModelOpt compiles (or loads from TORCH_EXTENSIONS_DIR) the CUDA
    extensions it needs here and not in a later stage. Calibration alone does not: on the H200
    the FP8 extension (modelopt_cuda_ext_fp8) was first loaded by the probe's first quantized
    forward, 44 s of a 64 s probe."""
    import modelopt.torch.quantization as mtq
    import torch

    from quantgate.formats import get_format

    dtype = dtype or torch.float32
    # auto_quantize: every format it may choose
    for each in [get_format(n) for n in quantization.auto_quantize.formats] if fmt.is_auto else [fmt]:
        toy = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)).to("cuda", dtype)
        x = torch.randn(4, 256, device="cuda", dtype=dtype)
        mtq.quantize(toy, each.build_modelopt_config(quantization), lambda m, x=x: m(x))
        with torch.no_grad():
            toy(x)
        del toy
    release_memory()


class ProbeCalibrated(Stage):
    """Score the golden prompts with the calibrated in-memory model (teacher-forced along the
    baseline's outputs), so the report can show how much drift the export itself adds."""

    name: ClassVar[str] = "probe"
    needs: ClassVar[tuple[str, ...]] = ("calibrated", "baseline")
    produces: ClassVar[str] = "probe"

    def identity(self, recipe: Any) -> Any:
        return recipe.evaluation.golden.model_dump(mode="json")

    def run(self, ctx: RunContext, *, calibrated: CalibratedModel, baseline: Baseline) -> list[GoldenOutput]:
        from quantgate.engines.base import EngineLimits
        from quantgate.engines.torch_engine import TorchEngine
        from quantgate.evaluation.golden import run_golden

        if not (ctx.recipe.evaluation.golden.enabled and baseline.results.golden):
            return []
        e = ctx.recipe.engine
        engine = TorchEngine.from_model(calibrated.model, calibrated.tokenizer, EngineLimits(e.max_batch_size, e.max_input_len, e.max_seq_len), calibrated.device)
        # Teacher-forced only: the fidelity check compares next-token distributions along the
        # baseline's outputs; generating with ModelOpt's fake-quant model took 102 s of a cold
        # 6-minute CPU demo and its text is used nowhere.
        return run_golden(engine, ctx.recipe.evaluation, reference=baseline.results.golden, generate=False)

    def save(self, ctx: RunContext, value: list[GoldenOutput]) -> dict[str, Any]:
        import json

        atomic_write_text(ctx.run_dir / "probe_golden.json", json.dumps([g.model_dump(mode="json") for g in value]))
        return {"file": "probe_golden.json", "prompts": len(value)}

    def load(self, ctx: RunContext) -> Any:
        import json

        try:
            return [GoldenOutput.model_validate(g) for g in json.loads((ctx.run_dir / "probe_golden.json").read_text())]
        except (OSError, ValueError):
            return MISSING


class Export(Stage):
    """Write the unified HF checkpoint (+ tokenizer, hf_quant_config.json) atomically."""

    name: ClassVar[str] = "export"
    needs: ClassVar[tuple[str, ...]] = ("calibrated",)
    produces: ClassVar[str] = "checkpoint"

    def identity(self, recipe: Any) -> Any:
        return {"format": recipe.quantization.format, "dtype": recipe.model.dtype}

    def run(self, ctx: RunContext, *, calibrated: CalibratedModel) -> Checkpoint:
        from quantgate.export import export_checkpoint

        fmt = formats.get_format(ctx.recipe.quantization.format)
        ckpt = export_checkpoint(calibrated.model, calibrated.tokenizer, fmt, ctx.recipe.model.dtype, ctx.run_dir / "checkpoint",
                                 fmt.export_algos(ctx.recipe.quantization))
        # The exported model is mutated and of no further use: drop it before evaluation loads
        # the checkpoint (the runner also releases `calibrated` once nothing else needs it).
        calibrated.model = None
        release_memory()
        return ckpt

    def save(self, ctx: RunContext, value: Checkpoint) -> dict[str, Any]:
        value.save(ctx.run_dir / "checkpoint.json")
        return {"file": "checkpoint.json", "bytes": value.size_bytes}

    def load(self, ctx: RunContext) -> Any:
        try:
            ckpt = Checkpoint.load(ctx.run_dir / "checkpoint.json")
        except (OSError, ValueError):
            return MISSING
        return ckpt if (ckpt.dir / "config.json").is_file() else MISSING  # checkpoint folder gone: export again
