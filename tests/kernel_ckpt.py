"""Checkpoints in ModelOpt's unified-export layout, written without ModelOpt, from a model's own
weights: for the kernel tests and bench/gpu_kernels.py on machines that have no ModelOpt (the GPU
box). Conventions follow ModelOpt's export (STACK.md): FP8 weight + scalar weight_scale (amax/448)
+ input_scale; SmoothQuant int8 weight + per-channel weight_scale (amax/127) + pre_quant_scale +
input_scale; INT4 AWQ uint8 [out/2, in] + per-block weight_scale (amax/7), pre_quant_scale on
o_proj / down_proj. Scales come from one calibration forward on the given ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

ALGOS = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ"}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]


@torch.no_grad()
def activation_amax(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-input-channel |x| max of every decoder linear layer's input, from one forward."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in linear_names(model):
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return amax


def _smooth(w: torch.Tensor, ax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant/AWQ-style per-input-channel factor s: x/s and w*s (pre_quant_scale = 1/s)."""
    s = ax.clamp(min=1e-5) ** alpha / w.abs().amax(0).float().clamp(min=1e-5) ** (1 - alpha)
    return s / s.mean()


@torch.no_grad()
def quantize_linear(fmt: str, name: str, w: torch.Tensor, ax: torch.Tensor, dtype: torch.dtype, block: int = 128) -> dict[str, torch.Tensor]:
    from quantgate.engines.kernels import pack_int4

    out: dict[str, torch.Tensor] = {}
    wf = w.float()
    if fmt == "fp8":
        ws = (wf.abs().amax() / 448.0).clamp(min=1e-12)
        out["weight"] = (wf / ws).clamp(-448, 448).to(torch.float8_e4m3fn)
        out["weight_scale"] = ws.reshape(())
        out["input_scale"] = (ax.amax() / 448.0).clamp(min=1e-12).reshape(())
    elif fmt == "int8_sq":
        s = _smooth(wf, ax)
        ws_ = wf * s[None, :]
        ws = (ws_.abs().amax(1) / 127.0).clamp(min=1e-12)
        out["weight"] = (ws_ / ws[:, None]).round().clamp(-128, 127).to(torch.int8)
        out["weight_scale"] = ws.to(dtype)
        out["pre_quant_scale"] = (1.0 / s).to(dtype)
        out["input_scale"] = ((ax / s).amax() / 127.0).clamp(min=1e-12).reshape(())
    elif fmt == "int4_awq":
        if name.endswith(("o_proj", "down_proj")):
            s = _smooth(wf, ax)
            wf = wf * s[None, :]
            out["pre_quant_scale"] = (1.0 / s).to(dtype)
        o, i = wf.shape
        scale = (wf.view(o, i // block, block).abs().amax(-1) / 7.0).clamp(min=1e-12).to(dtype)
        q = (wf / scale.float().repeat_interleave(block, 1)).round().clamp(-8, 7)
        out["weight"] = pack_int4(q.to(torch.int8))
        out["weight_scale"] = scale
    else:
        raise ValueError(fmt)
    return out


def quant_config(fmt: str, block: int = 128) -> dict[str, Any]:
    q: dict[str, Any] = {"quant_algo": ALGOS[fmt], "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if fmt == "int4_awq":
        q.update(group_size=block, has_zero_point=False, pre_quant_scale=True)
    return {"producer": {"name": "quantgate-tests-synthetic"}, "quantization": q}


@torch.no_grad()
def write_quantized(model: nn.Module, src_dir: Path, out: Path, fmt: str, amax: dict[str, torch.Tensor], shard_bytes: int = 4 << 30) -> Path:
    """`model`'s weights in `fmt`, written as a checkpoint dir (config + tokenizer from src_dir)."""
    from safetensors.torch import save_file

    dtype = next(model.parameters()).dtype
    lin = set(linear_names(model))
    out.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    (out / "hf_quant_config.json").write_text(json.dumps(quant_config(fmt)))
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            save_file(shard, str(out / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            shard, size, n = {}, 0, n + 1

    seen: set[int] = set()
    for key, t in model.state_dict().items():
        mod = key.rsplit(".", 1)[0]
        if mod in lin and key.endswith(".weight"):
            parts = {f"{mod}.{k}": v for k, v in quantize_linear(fmt, mod, t, amax[mod], dtype).items()}
        elif id(t) in seen or (key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)):
            continue
        else:
            parts = {key: t}
        seen.add(id(t))
        for k, v in parts.items():
            shard[k] = v.detach().to("cpu").contiguous()
            size += v.numel() * v.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    return out
