"""The `torch` backend: runs an exported checkpoint on CPU or CUDA with its quantized numerics.

transformers does not understand ModelOpt's `quant_method: modelopt` and silently loads raw codes
without scales (STACK.md). So this backend reads the safetensors itself: it dequantizes FP8 / INT8 /
packed-INT4 weights with their scales, keeps `pre_quant_scale` as an input multiplier, and
fake-quantizes activations from `input_scale` exactly as ModelOpt's simulated quantization does.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from quantgate.engines.base import (
    ChoiceRequest,
    Engine,
    EngineInfo,
    EngineLimits,
    Generation,
    ScoreRequest,
    ScoreResult,
    trim_at_stop,
)
from quantgate.engines.torch_prefix import SHARED_DECODE_BATCHING, score_segments
from quantgate.errors import StageError

if TYPE_CHECKING:
    from quantgate.artifacts import Checkpoint
    from quantgate.recipe import EngineSpec

log = logging.getLogger(__name__)

FP8_MAX = 448.0
SUPPORTED_ALGOS = {None, "FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ"}


# ---- numerics of the exported formats ---------------------------------------------------------


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int8 [out, in]. Inverse of ModelOpt's `pack_int4_in_uint8`:
    rows 2j and 2j+1 share a byte (row 2j in the low nibble), values are signed 4-bit."""
    low = (packed & 0x0F).to(torch.int16)
    high = ((packed >> 4) & 0x0F).to(torch.int16)
    low = (low ^ 8) - 8  # sign-extend a nibble
    high = (high ^ 8) - 8
    out = torch.stack([low, high], dim=1)  # [out/2, 2, in]
    return out.reshape(-1, packed.shape[-1]).to(torch.int8)


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor | None, quant_algo: str | None, group_size: int | None
) -> torch.Tensor:
    """Exported weight (+ scale) -> float32 weight, as the in-memory fake-quant model uses it."""
    if scale is None:
        return weight.float()
    if weight.dtype == torch.float8_e4m3fn:
        s = scale.float()
        return weight.float() * (s[:, None] if s.dim() == 1 else s)
    if weight.dtype == torch.int8:  # INT8 SmoothQuant: per-output-channel scales
        return weight.float() * scale.float().reshape(-1, 1)
    if weight.dtype == torch.uint8:  # packed INT4, per-block scales [out, in/block]
        w = unpack_int4(weight).float()
        block = w.shape[1] // scale.shape[1]
        if group_size and block != group_size:
            raise StageError("engine", f"INT4 scale blocks ({block}) disagree with group_size {group_size}")
        return w * scale.float().repeat_interleave(block, dim=1)
    raise StageError("engine", f"unsupported quantized weight dtype {weight.dtype} for {quant_algo}")


# The 256 E4M3 values in fp32, indexed by bit pattern: on CPU, reading them from this table is
# 2-3x faster than torch's element-wise float8 -> float32 cast (the largest cost of fake-quant there).
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.take(_FP8_VALUES, q.view(torch.uint8).long()) * scale  # same values as q.to(x.dtype)
    return q.to(x.dtype) * scale


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-128, 127) * scale


class QuantLinear(nn.Module):
    """Linear layer of an exported checkpoint: optional input smoothing and activation fake-quant
    in front of a dequantized weight."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pre_quant_scale: torch.Tensor | None,
        act_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        input_scale: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.register_buffer("input_scale", input_scale)
        self.act_quant = act_quant
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.shared: SharedActQuant | None = None  # set by share_activation_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.shared is not None:
            x = self.shared.quantized(self, x)
        elif self.act_quant is not None:
            x = self.act_quant(x, self.input_scale)
        return F.linear(x, self.weight, self.bias)


class SharedActQuant:
    """The quantized activation of projections that read the same input with the same scale
    (q/k/v, gate/up), computed once per round: the first member quantizes, the others (same
    tensor, unmodified since) reuse it. The same values as each quantizing alone; on CPU the
    fake-quant is ~1/5 of a quantized forward, and this drops 3 of the 7 per Llama layer."""

    def __init__(self, members: list[QuantLinear]) -> None:
        self.size = len(members)
        self._round: tuple[torch.Tensor, int, torch.Tensor, set[int]] | None = None

    def quantized(self, member: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        from quantgate.engines.kernels import _version

        r = self._round
        if r is None or r[0] is not x or r[1] != _version(x) or id(member) in r[3]:
            assert member.act_quant is not None
            r = self._round = (x, _version(x), member.act_quant(x, member.input_scale), set())
        r[3].add(id(member))
        xq = r[2]
        if len(r[3]) == self.size:
            self._round = None  # hold no activation between rounds
        return xq


_SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def share_activation_quant(model: nn.Module) -> int:
    """Install SharedActQuant on reference-path projection groups with one input scale; count."""
    groups = 0
    for parent in model.modules():
        for names in _SHARED_INPUTS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, QuantLinear) and m.act_quant is not None and m.pre_quant_scale is None for m in members):
                continue
            first = members[0]
            if any(m.act_quant is not first.act_quant or not torch.equal(m.input_scale, first.input_scale) for m in members):  # type: ignore[union-attr]
                continue
            shared = SharedActQuant(members)  # type: ignore[arg-type]
            for m in members:
                m.shared = shared  # type: ignore[union-attr]
            groups += 1
    return groups


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put one checkpoint tensor in place of the (meta) parameter or buffer it names."""
    prefix, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        raise StageError("engine", f"checkpoint tensor {key} has no module in the architecture") from None
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise StageError("engine", f"checkpoint tensor {key} does not match the architecture")


def _empty_model(config: Any, device: str, compute_dtype: torch.dtype) -> nn.Module:
    """The architecture with its parameters on the meta device (no memory, no random init) and its
    computed buffers (rotary inv_freq) on `device`; the checkpoint's tensors are assigned after."""
    from transformers import AutoModelForCausalLM

    try:
        from accelerate import init_empty_weights
    except ImportError:  # the old way: random init on the device, then overwritten
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    with torch.device(device), init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=compute_dtype)


def load_exported_model(
    ckpt_dir: Path, device: str, compute_dtype: torch.dtype, kernels: str = "reference"
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the HF architecture from config.json and load the exported tensors with their
    quantized numerics. Returns (model, stats).

    Tensors stream one at a time from the safetensors files to `device` (peak = the model plus one
    tensor). kernels='reference' dequantizes quantized weights to the compute dtype and
    fake-quantizes activations (exact, any device); 'auto' keeps FP8 / INT8 / INT4 weights
    quantized on a CUDA GPU and runs real low-precision GEMMs (kernels.py), else the reference."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from quantgate.engines import kernels as kern

    qcfg_path = ckpt_dir / "hf_quant_config.json"
    qcfg = json.loads(qcfg_path.read_text())["quantization"] if qcfg_path.is_file() else {}
    algo = qcfg.get("quant_algo")
    # Mixed precision (ModelOpt auto_quantize): each quantized layer names its own format.
    per_layer: dict[str, dict[str, Any]] = (qcfg.get("quantized_layers") or {}) if algo == "MIXED_PRECISION" else {}
    for a in {algo} if algo != "MIXED_PRECISION" else {c.get("quant_algo") for c in per_layer.values()}:
        if a not in SUPPORTED_ALGOS:
            raise StageError("engine", f"the torch backend does not reproduce quant_algo {a!r} (supported: FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ, and MIXED_PRECISION of them)")
    if qcfg.get("kv_cache_quant_algo"):
        raise StageError("engine", f"the torch backend does not reproduce a quantized KV cache ({qcfg['kv_cache_quant_algo']}); use engine.backend=tensorrt-llm or quantization.kv_cache=none")
    if kernels not in ("reference", "auto"):
        raise StageError("engine", f"engine.kernels must be auto or reference, not {kernels!r}")

    def layer_format(name: str) -> tuple[str | None, int | None, bool, str]:
        """(quant_algo, AWQ block, real kernels?, why not) of one quantized layer."""
        cfg = per_layer.get(name, {}) if per_layer else qcfg
        if per_layer and name not in per_layer:
            raise StageError("engine", f"layer {name} has quantized tensors but no entry in hf_quant_config.json's quantized_layers")
        a, g = cfg.get("quant_algo"), cfg.get("group_size")
        ok, why_not = (False, "engine.kernels=reference") if kernels == "reference" else kern.kernel_support(a, device, g)
        return a, g, ok, why_not

    config = AutoConfig.from_pretrained(ckpt_dir)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # else transformers tries (and fails) to apply it
    model = _empty_model(config, device, compute_dtype)
    model.eval()

    handles = [safe_open(shard, framework="pt", device="cpu") for shard in sorted(ckpt_dir.glob("*.safetensors"))]
    where: dict[str, Any] = {k: fh for fh in handles for k in fh.keys()}  # noqa: SIM118 (no __iter__)
    file_bytes = 0

    def take(key: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        nonlocal file_bytes
        fh = where.pop(key, None)
        if fh is None:
            return None
        t = fh.get_tensor(key)
        file_bytes += t.numel() * t.element_size()
        if dtype is not None and t.is_floating_point():
            return t.to(device, dtype)
        return t.to(device)

    act_quants = {"FP8": fp8_fake_quant, "W4A8_AWQ": fp8_fake_quant, "W8A8_SQ_PER_CHANNEL": int8_fake_quant}
    quantized = [k[: -len(".weight_scale")] for k in where if k.endswith(".weight_scale")]
    kernel_layers, fallbacks = 0, set()
    for name in quantized:
        layer_algo, group_size, use_kernels, why = layer_format(name)
        act_quant = act_quants.get(layer_algo or "")
        take(f"{name}.weight_scale_2")
        pqs = take(f"{name}.pre_quant_scale", compute_dtype)
        in_scale = take(f"{name}.input_scale")
        bias = take(f"{name}.bias", compute_dtype)
        weight = take(f"{name}.weight")
        scale = take(f"{name}.weight_scale")
        assert weight is not None and scale is not None
        layer: nn.Module
        if use_kernels:
            layer = kern.make_kernel_linear(layer_algo, weight, scale, in_scale, pqs, bias, compute_dtype)
            kernel_layers += 1
        else:
            fallbacks.add(why)
            # Dequantized where the tensor already is (the GPU on CUDA): same fp32 arithmetic as on CPU.
            w = dequantize_weight(weight, scale, layer_algo, group_size).to(compute_dtype)
            del weight
            layer = QuantLinear(
                w, bias, pqs, act_quant if in_scale is not None else None,
                in_scale.to(torch.float32).to(compute_dtype) if in_scale is not None else None,
            )
        _set_module(model, name, layer)
    # Unquantized layers that still carry a pre_quant_scale (AWQ folds most into norms).
    for key in [k for k in where if k.endswith(".pre_quant_scale")]:
        raise StageError("engine", f"unexpected pre_quant_scale without weight_scale: {key}")

    for key in list(where):
        tensor = take(key, compute_dtype)
        assert tensor is not None
        _assign(model, key, tensor)
    del handles
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StageError("engine", f"checkpoint tensors do not match the architecture: missing {left[:4]}")
    joined = kern.join_fp8_projections(model) if kernel_layers else {}
    shared = share_activation_quant(model)
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    return model, {
        "quant_algo": algo, "quantized_layers": len(quantized),
        **({"layer_formats": dict(sorted(Counter(str(c.get("quant_algo")) for c in per_layer.values()).items()))} if per_layer else {}),
        # "mixed": some layers on real kernels, some on the reference (e.g. W4A8 next to FP8)
        "kernels": ("real" if not fallbacks else "mixed") if kernel_layers else "reference",
        **({"kernels_fallback": "; ".join(sorted(fallbacks))} if fallbacks and kernels != "reference" else {}),
        "checkpoint_tensor_bytes": file_bytes, "resident_tensor_bytes": resident, **joined,
        **({"shared_act_quant_groups": shared} if shared else {}),
    }


# ---- the engine ---------------------------------------------------------------------------------


def _sync_time(device: str) -> float:
    import time

    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("engine", "engine.device is 'cuda' but no CUDA GPU is visible; use engine.device=cpu or auto")
    return device


def compute_dtype_for(device: str, checkpoint_dtype: str) -> torch.dtype:
    # CPU kernels for fp16/bf16 are slow or missing; fp32 on CPU keeps both sides on one footing.
    if device == "cpu":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(checkpoint_dtype, torch.float16)


def identity(recipe: Any) -> dict[str, Any]:
    """What changes this backend's scores besides the checkpoint (see engines/__init__.py)."""
    device = resolve_device(recipe.engine.device)
    # "attention": decode steps of grouped-query models changed kernels (engines/attention.py):
    # same math, other rounding, so baselines cached before it are not reused. "kv_cache": decode
    # reads K/V as views of a reserved buffer (engines/kv_cache.py), which kernels may round otherwise.
    # "decode": how shared-prefix generation steps run (engines/decode_graph.py); a fixed-shape
    # step attends over the whole reserved buffer with the tail masked, which kernels may round otherwise.
    # "shared_decode_batching": how many rows such a batch holds (torch_prefix.shared_decode_rows).
    return {"device_type": device, "compute_dtype": str(compute_dtype_for(device, recipe.model.dtype)), "torch": torch.__version__,
            "attention": "sdpa+grouped-decode/1", "kv_cache": "reserved/1", "decode": f"{resolved_decode(recipe.engine.decode, device)}/1",
            "shared_decode_batching": SHARED_DECODE_BATCHING}


def resolved_decode(mode: str, device: str) -> str:
    """The decode a setting means on a device (see EngineSpec.decode): graphs need CUDA."""
    if mode == "auto":
        return "shrinking" if device == "cpu" else "graph"
    return "fixed" if mode == "graph" and device == "cpu" else mode


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any, limits: EngineLimits, device: str, *, settings: dict[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.settings = settings or {}
        cfg_eos = getattr(model.config, "eos_token_id", None)
        ids = set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self._eos_ids = sorted(ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos_ids[0]
        self._one_time: dict[str, float] = {}
        self._memory: dict[str, int] = {}
        self.decode_mode = resolved_decode(str(self.settings.get("decode", "auto")), device)

    @classmethod
    def load(cls, checkpoint: Checkpoint, spec: EngineSpec) -> TorchEngine:
        import time

        from transformers import AutoTokenizer

        from quantgate.engines.attention import use_grouped_decode_attention

        device = resolve_device(spec.device)
        dtype = compute_dtype_for(device, checkpoint.dtype)
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()  # the load's own peak (the stage's is taken at its end)
        t0 = _sync_time(device)
        model, stats = load_exported_model(checkpoint.dir, device, dtype, kernels=getattr(spec, "kernels", "auto"))
        load_s = _sync_time(device) - t0
        # Decode steps of grouped-query models attend over the KV heads without copying them per
        # query head (engines/attention.py); both sides of a gate load through here.
        stats["attention"] = "sdpa, grouped decode" if use_grouped_decode_attention(model) else "sdpa"
        tok = AutoTokenizer.from_pretrained(checkpoint.dir)
        limits = EngineLimits(spec.max_batch_size, spec.max_input_len, spec.max_seq_len)
        engine = cls(model, tok, limits, device, settings={**stats, "decode": getattr(spec, "decode", "auto")})
        engine._one_time["load_s"] = round(load_s, 3)
        if device != "cpu":
            engine._memory["resident_gpu_bytes"] = int(torch.cuda.memory_allocated())
            engine._memory["load_peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
            t1 = time.perf_counter()
            engine.warmup()
            engine._one_time["warmup_s"] = round(time.perf_counter() - t1, 3)
            log.info("torch engine: loaded %s in %.1f s (%s kernels), warm-up %.1f s, resident %.2f GiB",
                     checkpoint.dir.name, load_s, stats.get("kernels"), engine._one_time["warmup_s"],
                     engine._memory["resident_gpu_bytes"] / 2**30)
        return engine

    @torch.inference_mode()
    def warmup(self) -> None:
        """One forward per token-count class (compiles the fused quantizers, autotunes the INT4
        kernel, creates cuBLAS handles), so scoring throughput excludes these one-time costs."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0) or len(self.tokenizer)
        g = torch.Generator().manual_seed(0)
        for batch, length in ((1, 5), (2, 100), (2, min(1024, self.limits.max_seq_len))):
            ids = torch.randint(0, vocab, (batch, length), generator=g).to(self.device)
            self._hidden_and_head(ids, torch.ones_like(ids))
        torch.cuda.synchronize()

    def one_time_costs(self) -> dict[str, float]:
        return dict(self._one_time)

    def note_decode(self, stats: dict[str, Any]) -> None:
        """Counts of a fixed-shape decode batch (engines/decode_graph.py), kept with the one-time costs."""
        t = self._one_time
        t["decode_batches"] = t.get("decode_batches", 0) + 1
        t["decode_graph_capture_s"] = round(t.get("decode_graph_capture_s", 0.0) + stats["capture_s"], 3)
        t["decode_graph_replays"] = t.get("decode_graph_replays", 0) + stats["replays"]
        t["decode_eager_steps"] = t.get("decode_eager_steps", 0) + stats["eager_steps"]
        if stats.get("fallback"):
            self.settings["decode_fallback"] = stats["fallback"]

    def memory_stats(self) -> dict[str, int]:
        return {**self._memory, **{k: v for k, v in self.settings.items() if k.endswith("_bytes")}}

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, limits: EngineLimits | None = None, device: str | None = None) -> TorchEngine:
        """Wrap an in-memory HF (or ModelOpt-quantized) model, e.g. for alignment tests."""
        device = device or str(next(model.parameters()).device)
        return cls(model.eval(), tokenizer, limits or EngineLimits(), device, settings={"in_memory": True})

    def info(self) -> EngineInfo:
        return EngineInfo(
            backend=self.backend,
            device=self.device if self.device == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
            compute_dtype=str(self.dtype).replace("torch.", ""),
            settings={"max_batch_size": self.limits.max_batch_size, "max_input_len": self.limits.max_input_len, "max_seq_len": self.limits.max_seq_len,
                      **({"kernels": self.settings["kernels"]} if self.settings.get("quantized_layers") else {})},
        )

    # -- scoring --
    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(requests)
        # Longest first: similar lengths share a batch, less padding.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].token_ids))
        bs = self.limits.max_batch_size
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            batch = [requests[i] for i in idx]
            for req in batch:
                if req.start < 1 or req.start > len(req.token_ids):
                    raise ValueError(f"score start {req.start} outside 1..{len(req.token_ids)}")
                if len(req.token_ids) > self.limits.max_seq_len:
                    raise StageError("engine", f"sequence of {len(req.token_ids)} tokens exceeds engine.max_seq_len={self.limits.max_seq_len}")
            width = max(len(r.token_ids) for r in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, req in enumerate(batch):
                ids[row, : len(req.token_ids)] = torch.tensor(req.token_ids)
                mask[row, : len(req.token_ids)] = 1
            hidden, head = self._hidden_and_head(ids.to(self.device), mask.to(self.device))
            # position t-1 predicts token t; the vocab projection runs only where scored, once per batch
            segments = [hidden[row, req.start - 1 : len(req.token_ids) - 1] for row, req in enumerate(batch)]
            scored = score_segments(head, segments, [req.token_ids[req.start :] for req in batch], top_k)
            for i, res in zip(idx, scored, strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    # issue 11: multiple-choice contexts run once (quantgate/engines/torch_prefix.py)
    @property
    def shares_prefixes(self) -> bool:  # type: ignore[override]
        from quantgate.engines.torch_prefix import supports_shared_prefix

        return supports_shared_prefix(self.model)

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[list[ScoreResult]]:
        from quantgate.engines.torch_prefix import score_choices_shared

        return score_choices_shared(self, requests) if self.shares_prefixes else super().score_choices(requests)

    def generate_shared(self, prefix: list[int], suffixes: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[Generation]:
        from quantgate.engines.torch_prefix import generate_shared

        if not self.shares_prefixes:
            return super().generate_shared(prefix, suffixes, max_new_tokens, stop)
        return generate_shared(self, prefix, suffixes, max_new_tokens, stop)

    def _hidden_and_head(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Decoder hidden states and the output head, so the (large) vocab projection is applied
        only to scored positions. Models with logit post-processing use the full forward."""
        cfg = self.model.config
        decoder = getattr(self.model, "get_decoder", lambda: None)()
        head = self.model.get_output_embeddings()
        if decoder is None or head is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return logits, lambda x: x
        return decoder(input_ids=ids, attention_mask=mask).last_hidden_state, head

    # -- generation --
    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (), max_rows: int | None = None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        bs = max_rows or self.limits.max_batch_size
        for p in prompts:
            if len(p) > self.limits.max_input_len:
                raise StageError("engine", f"prompt of {len(p)} tokens exceeds engine.max_input_len={self.limits.max_input_len}")
        for b in range(0, len(order), bs):
            idx = order[b : b + bs]
            batch = [prompts[i] for i in idx]
            width = max(len(p) for p in batch)
            budget = min(max_new_tokens, self.limits.max_seq_len - width)
            # Left padding so every row continues from its last real token.
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(batch):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **self._cache_for(width + budget),
                max_new_tokens=max(budget, 1), do_sample=False, num_beams=1,
                eos_token_id=self._eos_ids, pad_token_id=self.pad_id,
                stop_strings=list(stop) or None, tokenizer=self.tokenizer if stop else None,
                temperature=None, top_p=None, top_k=None,
            )
            for row, i in enumerate(idx):
                new = gen[row, width:].tolist()
                reason = "length"
                for j, t in enumerate(new):
                    if t in self._eos_ids:
                        new, reason = new[:j], "eos"
                        break
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                text, stopped = trim_at_stop(text, stop)
                if stopped:
                    reason = "stop"
                out[i] = Generation(new, text, reason)
        return out  # type: ignore[return-value]

    def _cache_for(self, tokens: int) -> dict[str, Any]:
        """A KV cache with room for the whole generation (engines/kv_cache.py), where the model allows."""
        from quantgate.engines.kv_cache import reserved_cache, supports_reserved_cache

        return {"past_key_values": reserved_cache(self.model, tokens)} if supports_reserved_cache(self.model) else {}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def preflight(recipe: Any, fmt: Any) -> Any:
    """This backend's checks before any work (see engines/__init__.py)."""
    from quantgate.preflight import preflight_torch

    return preflight_torch(recipe, fmt)
