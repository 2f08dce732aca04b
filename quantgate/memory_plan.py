"""Per-stage GPU memory plan of a run, from the model's config, the format and the GPU's memory.

A pure function (no torch, no GPU query): preflight passes the GPU's size and gets back, per stage,
the bytes it needs on one GPU and whether they fit, plus a one-line refusal when a stage cannot run.
The torch backend runs every stage on ONE GPU (no tensor parallelism, no offload), so a stage that
needs more than one GPU holds is refused up front, before any calibration. See docs/gpu-memory.md.

What each stage holds (measured on an H200 for the Llama-3.1-8B shape, bench/gpu_kernels.py):
- baseline_export: the 16-bit model on the CPU (host RAM), nothing on the GPU.
- baseline_evaluate: the 16-bit weights (the loader streams tensor by tensor: peak = weights) plus
  the scoring workspace of one batch (activations, the transient KV cache of the forward, one
  row's fp32 log-probs over the vocabulary). Generation holds no more: a shared-prefix decode
  batch reserves at most max_batch_size x max_seq_len KV tokens, however many rows that is
  (engines/torch_prefix.shared_decode_rows), and golden batches likewise (evaluation/golden.py).
- calibrate: the 16-bit model, ModelOpt's quantizer state (small) and one calibration batch's
  activations; AWQ's search keeps a layer's inputs and a copy of one layer's weights.
- export: in place on the calibrated model plus one layer's quantized copy.
- evaluate: the checkpoint's tensors when the kernels keep them quantized (engine.kernels=auto on a
  GPU that runs them), else the dequantized 16-bit weights, plus the same scoring workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1 << 30
# Share of a GPU's memory a stage may plan for: the CUDA context, allocator fragmentation and
# cuBLAS/Triton workspaces take the rest.
USABLE_FRACTION = 0.92
KERNEL_ALGOS = {"FP8", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ"}  # engines/kernels.py KERNEL_ALGOS


@dataclass(frozen=True)
class StagePlan:
    stage: str
    gpu_bytes: int
    """Peak bytes on one GPU (0: the stage runs on the CPU)."""
    host_bytes: int
    fits: bool
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: int
    usable_bytes: int
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def refusal(self) -> str | None:
        """One line naming the first stage that cannot run on one GPU, or None."""
        bad = next((s for s in self.stages if not s.fits), None)
        if bad is None:
            return None
        return (f"{bad.stage} needs ~{bad.gpu_bytes / GIB:.1f} GiB on one GPU but only "
                f"~{self.usable_bytes / GIB:.1f} GiB of {self.gpu_bytes / GIB:.1f} GiB are usable: {bad.note}")

    def lines(self) -> list[str]:
        return [f"{s.stage}: {'GPU ~%.1f GiB' % (s.gpu_bytes / GIB) if s.gpu_bytes else 'CPU'}"
                f"{', host ~%.1f GiB' % (s.host_bytes / GIB) if s.host_bytes else ''}"
                f"{'' if s.fits else ' (does NOT fit)'}" for s in self.stages]


def _dims(config: dict[str, Any]) -> dict[str, int]:
    c = config.get("text_config") or config
    h = int(c["hidden_size"])
    heads = int(c.get("num_attention_heads") or max(h // 64, 1))
    return {"h": h, "inter": int(c.get("intermediate_size") or 4 * h), "vocab": int(c["vocab_size"]),
            "layers": int(c["num_hidden_layers"]), "heads": heads,
            "kv_heads": int(c.get("num_key_value_heads") or heads), "head_dim": int(c.get("head_dim") or h // heads)}


def scoring_workspace(config: dict[str, Any], batch: int, seq: int, dtype_bytes: int = 2) -> int:
    """Transient bytes of one scoring forward: the KV cache HF builds during the forward, the
    largest activations of a layer (MLP: gate, up, product), and one row's fp32 log-probs."""
    d = _dims(config)
    tokens = batch * seq
    kv = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * tokens * dtype_bytes
    acts = tokens * (4 * d["h"] + 3 * d["inter"]) * dtype_bytes
    logprobs = 3 * seq * d["vocab"] * 4
    return kv + acts + logprobs


def plan_memory(
    config: dict[str, Any], *, quant_algo: str | None, weight_bits: float, gpu_bytes: int,
    max_batch_size: int, max_seq_len: int, calib_batch_size: int, calib_seq_len: int,
    kernels: str = "auto", kernels_available: bool = True, uses_awq: bool = False, dtype_bytes: int = 2,
) -> MemoryPlan:
    """Per-stage plan for one GPU of `gpu_bytes`. `weight_bits`: bits per quantized linear weight,
    scales included (preflight.weight_bits); `kernels_available`: this GPU runs the format's kernels."""
    from quantgate.preflight import estimate_params

    total, linear = estimate_params(config)
    w16 = total * dtype_bytes
    quantized = int(linear * weight_bits / 8 + (total - linear) * dtype_bytes)
    d = _dims(config)
    usable = int(gpu_bytes * USABLE_FRACTION)
    score_ws = scoring_workspace(config, max_batch_size, max_seq_len, dtype_bytes)
    calib_tokens = calib_batch_size * calib_seq_len
    calib_ws = calib_tokens * (4 * d["h"] + 3 * d["inter"]) * dtype_bytes
    if uses_awq:  # the search caches a layer's inputs and tries scales on a copy of its weights
        calib_ws += calib_tokens * d["h"] * dtype_bytes * 4 + d["h"] * d["inter"] * dtype_bytes * 3
    layer16 = (linear // max(d["layers"], 1)) * dtype_bytes
    real = kernels == "auto" and kernels_available and quant_algo in KERNEL_ALGOS
    cand = quantized if real else w16
    too_big_16 = "the 16-bit model does not fit one GPU; quantgate's torch backend has no tensor parallelism or offload"
    stages = [
        StagePlan("baseline_export", 0, w16, True, "16-bit export on the CPU"),
        StagePlan("baseline_evaluate", w16 + score_ws, 0, w16 + score_ws <= usable,
                  f"{too_big_16}: evaluate the baseline with engine.backend=tensorrt-llm and tensor_parallel_size>1"),
    ]
    if quant_algo is not None:
        stages += [
            StagePlan("calibrate", w16 + calib_ws, 0, w16 + calib_ws <= usable,
                      f"{too_big_16}: calibrate on several GPUs (ModelOpt with device_map) or with CPU offload, "
                      "then gate the exported checkpoint"),
            StagePlan("export", w16 + layer16, 0, w16 + layer16 <= usable, "export runs in place on the calibrated model"),
            StagePlan("evaluate", cand + score_ws, 0, cand + score_ws <= usable,
                      "the candidate does not fit one GPU even " + ("with its weights quantized" if real else
                      "dequantized to 16 bits: use engine.kernels=auto on a GPU that runs this format")),
        ]
    return MemoryPlan(gpu_bytes, usable, stages)
