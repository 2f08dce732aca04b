"""Real low-precision GEMMs for exported ModelOpt checkpoints: the weights stay quantized in memory.

- FP8 (quant_algo FP8): E4M3 weight + per-tensor weight scale, static per-tensor activation scale.
  The activation is quantized by one fused (torch.compile'd) pointwise kernel, then
  `torch._scaled_mm` multiplies with fp32 accumulation (use_fast_accum=False), as TensorRT-LLM's
  FP8 GEMM does. Eager quantization costs more than the FP8 GEMM saves (STACK.md).
- INT8 SmoothQuant (W8A8_SQ_PER_CHANNEL): int8 weight + per-output-channel scale; pre_quant_scale
  and the static activation scale are folded into one per-input-channel multiplier; the quantize,
  `torch._int_mm` (int32 accumulation) and the dequantizing epilogue are one compiled graph.
- INT4 AWQ (W4A16_AWQ): the packed uint8 weight of the checkpoint (two output rows per byte, see
  `unpack_int4`) and its per-block scales stay as they are. Up to INT4_FUSED_MAX_TOKENS tokens a
  Triton GEMM unpacks and scales each weight tile in registers; above, the layer is dequantized
  into a transient 16-bit buffer (one layer at a time, freed after the call) for cuBLAS.

Activations are quantized with the same roundings as the reference path (x / s rounded to the
compute dtype first), so the two paths differ only in accumulation order and weight rounding.

Everything here is CUDA-only and imported lazily; the CPU path keeps the reference (fake-quant)
`QuantLinear` of torch_engine.py. The `*_reference_math` helpers spell out the same arithmetic in
plain torch, so the folding of scales is testable on any machine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

FP8_MAX = 448.0
# Kernel paths by exported quant_algo; anything else (W4A8_AWQ, unquantized) keeps the reference.
KERNEL_ALGOS = {"FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"}
# INT4: up to this many tokens per GEMM the fused Triton kernel (memory-bound regime, generation);
# above it a per-call dequantized copy of the layer and cuBLAS (compute-bound regime, scoring).
INT4_FUSED_MAX_TOKENS = 256


def kernel_support(algo: str | None, device: str, group_size: int | None = None) -> tuple[bool, str]:
    """(usable, why not) for the real-kernel path of `algo` on `device` (AWQ block `group_size`)."""
    if algo not in KERNEL_ALGOS:
        return False, f"no kernel path for quant_algo {algo!r}"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, "kernels need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if algo == "FP8" and (major, minor) < (8, 9):
        return False, f"FP8 GEMMs need compute capability 8.9+, this GPU is {major}.{minor}"
    if algo == "W4A16_AWQ":
        if not group_size or group_size % INT4_MIN_BLOCK:
            return False, f"the INT4 kernel needs AWQ blocks that are a multiple of {INT4_MIN_BLOCK} (got {group_size})"
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "the INT4 kernel needs triton"
    return True, ""


# ---- arithmetic shared with the tests ------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [out, in] in [-8, 7] -> uint8 [out/2, in]: rows 2j (low nibble) and 2j+1 (high nibble)
    share a byte, as ModelOpt's export writes them. Inverse of torch_engine.unpack_int4."""
    if q.shape[0] % 2:
        raise ValueError("INT4 packing needs an even number of output rows")
    u = (q.to(torch.int16) & 0x0F).to(torch.uint8)
    return u[0::2] | (u[1::2] << 4)


def fp8_reference_math(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """What the FP8 kernel computes, in fp32: quantize x with the static scale, then
    (x_q @ w_q^T) * in_scale * w_scale."""
    xq = _fp8_quant(x, in_scale.to(x.dtype)).float()  # eager: the reference's roundings
    return (xq @ w8.float().t()) * (in_scale.float() * w_scale.float())


def int8_quant(x: torch.Tensor, pre_quant_scale: torch.Tensor, in_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x exactly as the reference computes them, in the compute dtype:
    round((x * pre_quant_scale) / input_scale), clamped (round half to even)."""
    return ((x * pre_quant_scale) / in_scale).round().clamp(-128, 127).to(torch.int8)


def int8_reference_math(x: torch.Tensor, w8: torch.Tensor, pre_quant_scale: torch.Tensor, in_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """What the INT8 kernel computes, in fp32: (x_q @ w_q^T) * input_scale * weight_scale[out]."""
    xq = int8_quant(x, pre_quant_scale, in_scale).float()
    return (xq @ w8.float().t()) * (in_scale.float() * w_scale.float().reshape(-1))


def int4_reference_math(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    from quantgate.engines.torch_engine import unpack_int4

    w = unpack_int4(packed).float()
    block = w.shape[1] // scales.shape[1]
    return x.float() @ (w * scales.float().repeat_interleave(block, dim=1)).t()


# ---- FP8 ----------------------------------------------------------------------------------------


def _fp8_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The reference's expression in the compute dtype; compiled with emulate_precision_casts so each
    # op rounds to 16 bits as in eager (else ~1/30 of activations take the other FP8 neighbour).
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _fp8_silu_mul_quant(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # A gated MLP's down_proj input, quantized in the same kernel that computes it (eager would
    # write silu(gate) * up in 16 bits and read it back to quantize).
    return _fp8_quant(torch.nn.functional.silu(gate) * up, scale)


def _int4_dequant(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    b = packed.to(torch.int16)
    lo = b & 15
    hi = (b >> 4) & 15
    q = torch.stack([lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)], dim=1).reshape(-1, packed.shape[1])
    block = packed.shape[1] // scales.shape[1]
    return (q.float() * scales.float().repeat_interleave(block, dim=1)).to(dtype)


@functools.cache
def _compiled(name: str) -> Any:
    fn = {"fp8_quant": _fp8_quant, "fp8_silu_mul_quant": _fp8_silu_mul_quant, "int8_linear": _int8_linear,
          "int4_dequant": _int4_dequant}[name]
    # dynamic=True: one graph for every token count (lm-eval batches vary in length).
    try:
        return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
    except Exception:  # an inductor without the option: codes may differ from the reference at ties
        return torch.compile(fn, dynamic=True)


def fp8_quantize(x2: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(E4M3 codes of the 2-D activation, padded to a multiple of 16 rows as _scaled_mm wants; real rows)."""
    m = x2.shape[0]
    pad = (-m) % 16
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    return _compiled("fp8_quant")(x2, input_scale.to(x2.dtype)), m


class Fp8Linear(nn.Module):
    """y = scaled_mm(fp8(x / s_x), W_fp8^T) * s_x * s_w (+ bias); W stays E4M3 in memory.

    A joined layer (`join_fp8`: q/k/v or gate/up side by side) has one weight scale per output
    column, (1, N), and uses _scaled_mm's row-wise scaling: the same products and scales per column."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        rowwise = weight_scale.numel() > 1
        self.register_buffer("weight_scale", weight_scale.float().reshape((1, -1) if rowwise else ()).contiguous())
        # The reference path quantizes with the scale rounded to the compute dtype; use the same grid.
        self.register_buffer("input_scale", input_scale.float().to(out_dtype).float().reshape(()))
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype

    def gemm(self, xq: torch.Tensor) -> torch.Tensor:
        """The product for quantized (padded) rows; the caller drops the padding rows."""
        scale_a = self.input_scale
        if self.weight_scale.ndim:
            scale_a = scale_a.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        return torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.weight_scale,
                                bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, m = fp8_quantize(x.reshape(-1, shape[-1]), self.input_scale)
        return self.gemm(xq)[:m].reshape(*shape[:-1], self.out_features)


class Fp8SharedInput(nn.Module):
    """FP8 projections of one input with one quantization and a GEMM each: the join where
    row-wise scaling is not available (16-bit float output: torch's row-wise FP8 GEMM writes bf16)."""

    def __init__(self, members: list[Fp8Linear]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(members)
        self.input_scale = members[0].input_scale
        self.in_features, self.out_features = members[0].in_features, sum(m.out_features for m in members)

    def gemm(self, xq: torch.Tensor) -> list[torch.Tensor]:
        return [m.gemm(xq) for m in self.parts]


def join_fp8(members: list[Fp8Linear]) -> Fp8Linear | Fp8SharedInput | None:
    """One layer for FP8 projections of the same input (ModelOpt's export gives q/k/v and gate/up
    one input scale so engines can fuse them), or None when they do not share an input scale."""
    first = members[0]
    if not all(isinstance(m, Fp8Linear) and m.in_features == first.in_features and m.out_dtype == first.out_dtype
               and m.weight_scale.ndim == 0 and torch.equal(m.input_scale, first.input_scale) for m in members):
        return None
    if first.out_dtype != torch.bfloat16 or any(m.bias is not None for m in members) or not _rowwise_fp8_works(first.weight.device):
        return Fp8SharedInput(members)
    weight = torch.cat([m.weight for m in members])
    scale = torch.cat([m.weight_scale.expand(m.out_features) for m in members])
    for m in members:  # the joined copy replaces them; free as we go (peak + one group)
        m.weight = None  # type: ignore[assignment]
    return Fp8Linear(weight, scale, first.input_scale, None, first.out_dtype)


@functools.cache
def _rowwise_fp8_works(device: torch.device) -> bool:
    """Whether this torch/GPU runs _scaled_mm with row-wise scales (bf16 output, fp32 accumulation)."""
    try:
        a = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        b = torch.ones(16, 32, device=device).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=device), scale_b=torch.full((1, 16), 2.0, device=device),
                             out_dtype=torch.bfloat16, use_fast_accum=False)
        return bool((y == 64).all())
    except (RuntimeError, NotImplementedError):
        return False


def _split(y: torch.Tensor | list[torch.Tensor], sizes: list[int], m: int) -> list[torch.Tensor]:
    parts = y if isinstance(y, list) else list(y.split(sizes, dim=-1))
    return [p[:m] for p in parts]


class JoinedProjections(nn.Module):
    """The projections of one input computed together. The model still calls q_proj(x), k_proj(x),
    v_proj(x) one by one: the first call computes all of them, the next ones (same tensor, not
    modified since) take their part; an input seen for the first time starts a new round."""

    def __init__(self, layer: Fp8Linear | Fp8SharedInput, sizes: list[int]) -> None:
        super().__init__()
        self.layer, self.sizes = layer, sizes
        self._round: tuple[torch.Tensor, int, list[torch.Tensor | None]] | None = None

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        shape = x.shape
        xq, m = fp8_quantize(x.reshape(-1, shape[-1]), self.layer.input_scale)
        return [p.reshape(*shape[:-1], p.shape[-1]) for p in _split(self.layer.gemm(xq), self.sizes, m)]

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        r = self._round
        if r is None or r[0] is not x or r[1] != _version(x) or r[2][index] is None:
            r = self._round = (x, _version(x), list(self.outputs(x)))
        y = r[2][index]
        r[2][index] = None
        if all(p is None for p in r[2]):
            self._round = None  # hold nothing between rounds (the input and parts are activations)
        assert y is not None
        return y


def _version(x: torch.Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be modified in place)
        return -1


class ProjectionOf(nn.Module):
    """Stands where q_proj (etc.) was: its part of the joined projections' output."""

    def __init__(self, joined: JoinedProjections, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "joined", joined)  # not a submodule: the weights belong to the parent's join
        self.index = index
        self.in_features, self.out_features = joined.layer.in_features, joined.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.joined.part(self.index, x)


class Fp8GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) of Llama-style MLPs: gate and up joined, and down_proj's input
    quantized in the kernel that computes it."""

    def __init__(self, gate_up: Fp8Linear | Fp8SharedInput, sizes: list[int], down: Fp8Linear) -> None:
        super().__init__()
        self.gate_up, self.sizes, self.down_proj = gate_up, sizes, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, m = fp8_quantize(x.reshape(-1, shape[-1]), self.gate_up.input_scale)
        gate, up = _split(self.gate_up.gemm(xq), self.sizes, xq.shape[0])
        hq = _compiled("fp8_silu_mul_quant")(gate, up, self.down_proj.input_scale.to(gate.dtype))
        return self.down_proj.gemm(hq)[:m].reshape(*shape[:-1], self.down_proj.out_features)


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) with SiLU.
GATED_SILU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
JOINABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def join_fp8_projections(model: nn.Module) -> dict[str, int]:
    """Join FP8 projections that read the same input (q/k/v, gate/up) into one quantization and
    one GEMM, and fuse SiLU-and-multiply into down_proj's quantization; counts of what was joined."""
    counts = {"joined_groups": 0, "fused_mlps": 0}
    for name, parent in list(model.named_modules()):
        for names in JOINABLE:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, Fp8Linear) for m in members):
                continue
            sizes = [m.out_features for m in members]  # type: ignore[union-attr]
            down, act = getattr(parent, "down_proj", None), getattr(parent, "act_fn", None)
            fuse_mlp = (names[0] == "gate_proj" and type(parent).__name__ in GATED_SILU_MLPS and isinstance(down, Fp8Linear)
                        and type(act).__name__ in ("SiLU", "SiLUActivation"))
            layer = join_fp8(members)  # type: ignore[arg-type]
            if layer is None:
                continue
            counts["joined_groups"] += 1
            if fuse_mlp:
                counts["fused_mlps"] += 1
                _replace(model, name, Fp8GatedMLP(layer, sizes, down))  # type: ignore[arg-type]
                continue
            joined = JoinedProjections(layer, sizes)
            parent.add_module("_".join(n.split("_")[0] for n in names) + "_joined", joined)
            for i, n in enumerate(names):
                setattr(parent, n, ProjectionOf(joined, i))
    return counts


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


# ---- INT8 SmoothQuant ---------------------------------------------------------------------------


def _int8_linear(x: torch.Tensor, w_t: torch.Tensor, pqs: torch.Tensor, in_scale: torch.Tensor, mult_out: torch.Tensor) -> torch.Tensor:
    acc = torch._int_mm(int8_quant(x, pqs, in_scale), w_t)
    return (acc.float() * mult_out).to(x.dtype)


class Int8Linear(nn.Module):
    """W8A8 with static per-tensor activation scale and per-channel weight scales (int32 accumulation)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor, pre_quant_scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        dtype = pre_quant_scale.dtype if pre_quant_scale is not None else torch.bfloat16
        s_in = input_scale.float().to(dtype).reshape(())  # the reference's scale, in the compute dtype
        pqs = pre_quant_scale if pre_quant_scale is not None else torch.ones(self.in_features, dtype=dtype, device=weight.device)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("pre_quant_scale", pqs)
        self.register_buffer("input_scale", s_in)
        self.register_buffer("mult_out", (s_in.float() * weight_scale.float().reshape(-1)).contiguous())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        # _int_mm wants more than 16 rows and a multiple of 8.
        pad = max(32 - m, (-m) % 8)
        if pad:
            x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
        y = _compiled("int8_linear")(x2, self.weight.t(), self.pre_quant_scale, self.input_scale, self.mult_out)
        if pad:
            y = y[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


# ---- INT4 AWQ (W4A16) ----------------------------------------------------------------------------


# Tile shapes the autotuner chooses from. A tile's BK columns of K must sit inside one AWQ block
# (one scale per output column per tile) and, because blocks divide K, never run past K: so only
# tiles with block % BK == 0 are offered. (Offering BK=128 for 64-wide blocks read past K=576 and
# applied one block's scale to two: NaN log-likelihoods for SmolLM2 INT4 AWQ on the H200.)
W4A16_CONFIGS: list[dict[str, int]] = [
    {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 128, "BK": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 128, "BK": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
]
INT4_MIN_BLOCK = 32  # the smallest BK above; smaller or odd AWQ blocks keep the reference path


def w4a16_configs(group: int) -> list[dict[str, int]]:
    """The tile configurations valid for AWQ blocks of `group` input columns."""
    return [c for c in W4A16_CONFIGS if group % c["BK"] == 0]


@functools.cache
def _w4a16_jit() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a_ptr, b_ptr, s_ptr, c_ptr, M, N, K, M_BUCKET,
               stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_cm, stride_cn,
               GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # Output columns 2j / 2j+1 come from the low / high nibble of packed row j: two
        # accumulators of BN/2 columns each, no interleaving in registers.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BM)
        num_pid_n = tl.cdiv(N, BN)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % in_group) % size_m)
        pid_n = (pid % in_group) // size_m
        HALF: tl.constexpr = BN // 2
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_p = pid_n * HALF + tl.arange(0, HALF)  # packed rows
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_p[:, None] * stride_bn + offs_k[None, :] * stride_bk
        m_ok = offs_m[:, None] < M
        p_ok = offs_p < (N // 2)
        acc_lo = tl.zeros((BM, HALF), dtype=tl.float32)
        acc_hi = tl.zeros((BM, HALF), dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(a_ptrs, mask=m_ok, other=0.0)
            b = tl.load(b_ptrs, mask=p_ok[:, None], other=0).to(tl.int16)
            lo = b & 15
            hi = (b >> 4) & 15
            lo = lo - ((lo & 8) << 1)  # sign-extend the nibble
            hi = hi - ((hi & 8) << 1)
            g = k0 // GROUP  # BK divides GROUP: one scale per column in this tile
            s_lo = tl.load(s_ptr + (2 * offs_p) * stride_sn + g * stride_sg, mask=p_ok, other=0.0).to(tl.float32)
            s_hi = tl.load(s_ptr + (2 * offs_p + 1) * stride_sn + g * stride_sg, mask=p_ok, other=0.0).to(tl.float32)
            w_lo = (lo.to(tl.float32) * s_lo[:, None]).to(a.dtype)
            w_hi = (hi.to(tl.float32) * s_hi[:, None]).to(a.dtype)
            acc_lo = tl.dot(a, tl.trans(w_lo), acc_lo)
            acc_hi = tl.dot(a, tl.trans(w_hi), acc_hi)
            a_ptrs += BK * stride_ak
            b_ptrs += BK * stride_bk
        c_base = c_ptr + offs_m[:, None] * stride_cm
        ok = m_ok & p_ok[None, :]
        tl.store(c_base + (2 * offs_p)[None, :] * stride_cn, acc_lo.to(c_ptr.dtype.element_ty), mask=ok)
        tl.store(c_base + (2 * offs_p + 1)[None, :] * stride_cn, acc_hi.to(c_ptr.dtype.element_ty), mask=ok)

    return kernel


@functools.cache
def _w4a16_autotuned(group: int) -> Any:
    import triton

    configs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                             num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in w4a16_configs(group)]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"])(_w4a16_jit())


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] (16-bit) @ dequant(packed [N/2, K] uint8, scales [N, K/G])^T -> [M, N].
    `config` pins one tile configuration (tests run each under Triton's interpreter); else autotuned."""
    m, k = x.shape
    n = packed.shape[0] * 2
    group = k // scales.shape[1]
    if k % scales.shape[1] or not w4a16_configs(group):
        raise ValueError(f"INT4 kernel needs AWQ blocks that divide K and are a multiple of {INT4_MIN_BLOCK} (got {k}/{scales.shape[1]})")
    if config is not None and group % config["BK"]:
        raise ValueError(f"tile BK={config['BK']} does not divide the AWQ block {group}")
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    # Few distinct tunings: token counts bucketed by power of two (up to 4096).
    bucket = min(1 << max(m - 1, 0).bit_length(), 4096)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    args = (x, packed, scales, out, m, n, k, bucket,
            x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1),
            out.stride(0), out.stride(1))
    import triton

    if config is None:
        _w4a16_autotuned(group)[grid](*args, GROUP=group)
    else:
        _w4a16_jit()[grid](*args, GROUP=group, **config)
    return out


class Int4Linear(nn.Module):
    """W4A16 AWQ: the checkpoint's packed weight and block scales, multiplied by a Triton kernel."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, pre_quant_scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0] * 2, packed.shape[1]
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("weight_scale", scales.contiguous())
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] > INT4_FUSED_MAX_TOKENS:
            # Many tokens: the GEMM is compute-bound, so one transient 16-bit copy of this layer's
            # weight (freed right after; at most one layer's worth) and cuBLAS beat the fused kernel.
            w = _compiled("int4_dequant")(self.weight, self.weight_scale, x2.dtype)
            y = torch.nn.functional.linear(x2, w)
        else:
            y = w4a16_matmul(x2.contiguous(), self.weight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def make_kernel_linear(algo: str, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                       pre_quant_scale: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """A kernel-backed layer from the exported tensors (already on the GPU, weights still quantized)."""
    if algo == "FP8":
        if input_scale is None or pre_quant_scale is not None:
            raise ValueError("FP8 kernel layer needs an input_scale and no pre_quant_scale")
        return Fp8Linear(weight, weight_scale, input_scale, bias, dtype)
    if algo == "W8A8_SQ_PER_CHANNEL":
        if input_scale is None:
            raise ValueError("INT8 kernel layer needs an input_scale")
        return Int8Linear(weight, weight_scale, input_scale, pre_quant_scale, bias)
    if algo == "W4A16_AWQ":
        return Int4Linear(weight, weight_scale.to(dtype), pre_quant_scale, bias)
    raise ValueError(f"no kernel path for {algo}")
