"""Engine backends behind a small registry: name -> lazily imported class."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantgate.registry import lookup

if TYPE_CHECKING:
    from quantgate.artifacts import Checkpoint
    from quantgate.engines.base import Engine
    from quantgate.recipe import EngineSpec


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


def load_engine(checkpoint: Checkpoint, spec: EngineSpec) -> Engine:
    """Import the backend named by the recipe and load the checkpoint with it."""
    info = backend_info(spec.backend)
    module_name, cls_name = info.target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.load(checkpoint, spec)
