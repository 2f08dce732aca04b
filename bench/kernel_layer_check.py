"""Per-layer check of the real kernels against the reference layer and the exact product, on CUDA,
over Llama-3.1-8B linear shapes and several token counts: ||out - ref|| / ||ref||.
    python bench/kernel_layer_check.py"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from quantgate.engines import kernels as kern
    from tests.kernel_ckpt import quantize_linear
    from tests.test_kernels import _reference_layer

    torch.manual_seed(0)
    dtype = torch.bfloat16
    algos = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ"}
    print(f"{'fmt':9} {'out x in':>12} {'M':>5} {'kern/ref':>9} {'kern/exact':>10} {'ref/exact':>9}")
    for fmt in algos:
        for out_f, in_f in ((1024, 4096), (14336, 4096), (4096, 14336)):
            w = (torch.randn(out_f, in_f, device="cuda") * 0.02).to(dtype)
            for m in (1, 33, 4096):
                x = (torch.randn(m, in_f, device="cuda") * torch.linspace(0.2, 3.0, in_f, device="cuda")).to(dtype)
                t = quantize_linear(fmt, "x.down_proj", w, x.float().abs().amax(0), dtype)
                ref = _reference_layer(fmt, t, dtype)(x)
                layer = kern.make_kernel_linear(algos[fmt], t["weight"], t["weight_scale"], t.get("input_scale"), t.get("pre_quant_scale"), None, dtype)
                got = layer(x)
                exact = x.float() @ w.float().t()
                r = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
                print(f"{fmt:9} {out_f:>5}x{in_f:<6} {m:5} {r(got, ref):9.2e} {r(got, exact):10.2e} {r(ref, exact):9.2e}", flush=True)


if __name__ == "__main__":
    main()
