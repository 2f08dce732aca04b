"""Quantization formats: a registry from recipe name to ModelOpt config, export kind and deploy needs.

Adding a format (W4A8 AWQ, NVFP4, ...) is one more `FormatSpec` entry. ModelOpt is imported only
when a config is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from quantgate.registry import lookup

if TYPE_CHECKING:
    from quantgate.recipe import QuantizationSpec


@dataclass(frozen=True)
class FormatSpec:
    name: str
    description: str
    modelopt_config: str | None
    """Attribute of `modelopt.torch.quantization` holding the base config (None: no quantization)."""
    algorithm: Literal["none", "max", "smoothquant", "awq_lite", "auto_quantize"]
    export_kind: Literal["hf", "unified"]
    """'hf': plain 16-bit HF checkpoint; 'unified': ModelOpt `export_hf_checkpoint`."""
    quant_algo: str | None
    """`hf_quant_config.json` quantization.quant_algo written by the export."""
    min_compute_capability: tuple[int, int] | None = None
    """Lowest CUDA compute capability that runs it natively in TensorRT-LLM."""
    trtllm_pytorch_backend: bool = True
    """False: the TensorRT-LLM PyTorch backend cannot run it; only the legacy trtllm-build path."""
    weight_bits: int = 16
    default_awq_block_size: int | None = None

    @property
    def uses_awq(self) -> bool:
        return self.algorithm == "awq_lite"

    @property
    def quantized(self) -> bool:
        return self.modelopt_config is not None or self.is_auto

    @property
    def is_auto(self) -> bool:
        """ModelOpt auto_quantize: per-layer formats chosen under a bits budget (quantization.auto_quantize)."""
        return self.algorithm == "auto_quantize"

    def export_algos(self, spec: QuantizationSpec) -> set[str | None]:
        """quant_algo values the export may write: auto_quantize writes MIXED_PRECISION, or a single
        format's name when it kept only one format (the rest 16-bit)."""
        if not self.is_auto:
            return {self.quant_algo}
        subs = spec.auto_quantize.formats if spec.auto_quantize else []
        return {"MIXED_PRECISION", *(get_format(n).quant_algo for n in subs)}

    def build_modelopt_config(self, spec: QuantizationSpec, keep_16bit: list[str] | None = None) -> dict[str, Any]:
        """A fresh ModelOpt config dict for `mtq.quantize`, with the recipe's settings applied.
        `keep_16bit`: module-name globs (aliases already resolved) whose quantizers stay off."""
        if self.modelopt_config is None:
            raise ValueError(f"format {self.name!r} does not quantize")
        import modelopt.torch.quantization as mtq

        cfg = copy.deepcopy(getattr(mtq, self.modelopt_config))
        entries = cfg["quant_cfg"]
        if self.uses_awq:
            block = spec.awq_block_size or self.default_awq_block_size
            for entry in _entries(entries, "*weight_quantizer"):
                for sub in _as_list(entry["cfg"]):
                    if isinstance(sub.get("block_sizes"), dict) and -1 in sub["block_sizes"]:
                        sub["block_sizes"][-1] = block
        if self.algorithm == "smoothquant" and spec.smoothquant_alpha is not None:
            cfg["algorithm"] = {"method": "smoothquant", "alpha": spec.smoothquant_alpha}
        if spec.kv_cache == "fp8":
            kv = copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
            entries.extend(kv if isinstance(kv, list) else [{"quantizer_name": k, "cfg": v} for k, v in kv.items()])
        # Last, so they win over the format's own entries (ModelOpt applies the list in order).
        entries.extend({"quantizer_name": f"{glob}.*", "enable": False} for glob in keep_16bit or [])
        return cfg


def _as_list(cfg: Any) -> list[dict[str, Any]]:
    return cfg if isinstance(cfg, list) else [cfg]


def _entries(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if isinstance(e, dict) and e.get("quantizer_name") == name]


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in [
        FormatSpec(
            "fp16", "16-bit baseline (the model's dtype): no quantization", None, "none", "hf", None
        ),
        FormatSpec(
            "fp8", "FP8 E4M3 weights and activations, per-tensor scales (max calibration)",
            "FP8_DEFAULT_CFG", "max", "unified", "FP8", (8, 9), True, 8,
        ),
        FormatSpec(
            "int8_sq", "INT8 SmoothQuant: per-channel weights, per-tensor activations",
            "INT8_SMOOTHQUANT_CFG", "smoothquant", "unified", "W8A8_SQ_PER_CHANNEL", (8, 0), False, 8,
        ),
        FormatSpec(
            "int4_awq", "INT4 AWQ weight-only (W4A16), per-block scales",
            "INT4_AWQ_CFG", "awq_lite", "unified", "W4A16_AWQ", (8, 0), True, 4, 128,
        ),
        FormatSpec(
            "w4a8_awq", "INT4 AWQ weights with FP8 activations (W4A8)",
            "W4A8_AWQ_BETA_CFG", "awq_lite", "unified", "W4A8_AWQ", (8, 9), True, 4, 128,
        ),
        FormatSpec(
            "auto_quantize", "ModelOpt auto_quantize: each layer gets one of quantization.auto_quantize.formats "
            "or stays 16-bit, chosen by loss sensitivity under an effective-bits budget",
            None, "auto_quantize", "unified", "MIXED_PRECISION", (8, 9), True, 8,
        ),
        FormatSpec(
            "nvfp4", "NVFP4 weights and activations (Blackwell)",
            "NVFP4_DEFAULT_CFG", "max", "unified", "NVFP4", (10, 0), True, 4,
        ),
    ]
}


def get_format(name: str) -> FormatSpec:
    return lookup(FORMATS, name, "format")
