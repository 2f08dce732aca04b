"""Engine backends behind a small registry: name -> lazily imported module.

A backend is one module plus one entry here. The module provides the engine class and what is
the backend's own business, as module-level functions the run asks for by name:
  identity(recipe) -> dict        what changes its scores (device, dtype, version, scoring
                                  method): part of the baseline cache key and the stage keys
  extra_stages(recipe) -> [Stage] stages it needs in the plan (e.g. TensorRT-LLM's legacy export)
  preflight(recipe, fmt) -> PreflightReport   what runs where, refusals before any work
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantgate.registry import lookup

if TYPE_CHECKING:
    from quantgate.artifacts import Checkpoint
    from quantgate.engines.base import Engine
    from quantgate.recipe import EngineSpec, Recipe
    from quantgate.stages import Stage


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    description: str
    requires: str  # import name that must be present


BACKENDS: dict[str, BackendInfo] = {
    b.name: b
    for b in [
        BackendInfo(
            "torch", "quantgate.engines.torch_engine:TorchEngine",
            "PyTorch on CPU or CUDA; reproduces the exported checkpoint's quantized numerics", "torch",
        ),
        BackendInfo(
            "tensorrt-llm", "quantgate.engines.tensorrt_llm:TensorRTLLMEngine",
            "NVIDIA TensorRT-LLM (LLM API, PyTorch backend; legacy trtllm-build engines)", "tensorrt_llm",
        ),
    ]
}


def backend_info(name: str) -> BackendInfo:
    return lookup(BACKENDS, name, "engine backend")


def _backend_module(name: str) -> Any:
    return importlib.import_module(backend_info(name).target.split(":")[0])


def backend_identity(recipe: Recipe) -> dict[str, Any]:
    """The backend's own identity for this recipe (see the module docstring)."""
    fn = getattr(_backend_module(recipe.engine.backend), "identity", None)
    return {"backend": recipe.engine.backend, **(fn(recipe) if fn else {})}


def backend_stages(recipe: Recipe) -> list[Stage]:
    """Extra stages the backend contributes to a quantized recipe's plan (before `export`)."""
    fn = getattr(_backend_module(recipe.engine.backend), "extra_stages", None)
    return list(fn(recipe)) if fn else []


def backend_preflight(recipe: Recipe, fmt: Any) -> Any:
    """The backend's preflight report (quantgate/preflight.py adds what every backend shares)."""
    return _backend_module(recipe.engine.backend).preflight(recipe, fmt)


def load_engine(checkpoint: Checkpoint, spec: EngineSpec) -> Engine:
    """Import the backend named by the recipe and load the checkpoint with it."""
    info = backend_info(spec.backend)
    module_name, cls_name = info.target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.load(checkpoint, spec)
