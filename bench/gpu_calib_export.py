"""GPU benchmark: quantgate's calibrate + export vs ModelOpt's own calls, same model, same data.

A Llama-3.1-8B-shaped model with random bf16 weights is built on the GPU (speed and memory do not
depend on the weights' values). For each format, both sides start from a freshly built model:
  plain:     mtq.quantize(model, CFG, loop over batches) ; export_hf_checkpoint(model, dir)
  quantgate: quantgate.calibrate.calibrate(...)          ; quantgate.export.export_checkpoint(...)
Reports seconds per stage, the ratio quantgate/plain, and peak GPU memory over the 16-bit weights.
Run on a CUDA machine:  python bench/gpu_calib_export.py --out results.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)


def build_model(shape: dict, layers: int | None, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})}, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def batches(n: int, seq: int, bs: int, vocab: int, seed: int):
    from quantgate.data import CalibrationBatches

    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, seq), generator=g)
    return CalibrationBatches([data[i : i + bs] for i in range(0, n, bs)], "bench", n * seq)


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def plain(model, cfg_name, data, out: Path) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    def loop(m):
        for b in data.batches:
            m(b.to("cuda"))

    t0 = sync_time()
    with torch.no_grad():
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), loop)
    t1 = sync_time()
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=out)
    t2 = sync_time()
    return {"calibrate_s": t1 - t0, "export_s": t2 - t1}


def quantgate_side(model, fmt_name, block, data, out: Path, tokenizer) -> dict:
    from quantgate.calibrate import calibrate
    from quantgate.export import export_checkpoint
    from quantgate.formats import get_format
    from quantgate.recipe import Recipe

    recipe = Recipe.model_validate({"name": "bench", "quantization": {"format": fmt_name, **({"awq_block_size": block} if block else {})},
                                    "calibration": {"num_samples": data.tokens // data.batches[0].shape[1], "seq_len": data.batches[0].shape[1], "batch_size": data.batches[0].shape[0]}})
    fmt = get_format(fmt_name)
    t0 = sync_time()
    calibrate(model, tokenizer, recipe, fmt, "cuda", data=data)
    t1 = sync_time()
    export_checkpoint(model, tokenizer, fmt, "bfloat16", out)
    t2 = sync_time()
    return {"calibrate_s": t1 - t0, "export_s": t2 - t1}


def warm_up_extensions() -> None:
    """ModelOpt JIT-compiles its CUDA extensions on first use (~50 s each): keep that out of both sides."""
    import modelopt.torch.quantization as mtq

    small = build_model({**LLAMA_8B, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}, 1, 0)
    for cfg in ("FP8_DEFAULT_CFG", "INT4_AWQ_CFG"):
        m = copy.deepcopy(small)
        mtq.quantize(m, copy.deepcopy(getattr(mtq, cfg)), lambda mm: mm(torch.randint(0, 1024, (2, 128), device="cuda")))
    del small
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--formats", default="fp8,int4_awq")
    ap.add_argument("--quantgate-first", action="store_true", help="run the quantgate side before the plain side")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import build_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qg-gpu-bench-"))
    tok = build_tokenizer(work / "tok")
    t = time.perf_counter()
    warm_up_extensions()
    print(f"extension warm-up {time.perf_counter() - t:.1f} s", flush=True)
    plan = {"fp8": ("FP8_DEFAULT_CFG", None, 512), "int4_awq": ("INT4_AWQ_CFG", 128, 128)}
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": "Llama-3.1-8B", "layers": args.layers or 32, "rows": []}
    for fmt in args.formats.split(","):
        cfg_name, block, n = plan[fmt]
        data = batches(n, 512, 8, LLAMA_8B["vocab_size"], 0)
        for side in (("quantgate", "plain") if args.quantgate_first else ("plain", "quantgate")):
            gc.collect()
            torch.cuda.empty_cache()
            model = build_model(LLAMA_8B, args.layers, 0)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = work / f"{fmt}-{side}"
            row = plain(model, cfg_name, data, out) if side == "plain" else quantgate_side(model, fmt, block, data, out, tok)
            peak = torch.cuda.max_memory_allocated()
            row.update(format=fmt, side=side, tokens=data.tokens, weights_gib=weights / 2**30, peak_gib=peak / 2**30,
                       peak_over_weights=peak / weights, start_over_weights=base / weights,
                       checkpoint_gib=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            del model
            shutil.rmtree(out, ignore_errors=True)
    for fmt in args.formats.split(","):
        p = next(r for r in results["rows"] if r["format"] == fmt and r["side"] == "plain")
        q = next(r for r in results["rows"] if r["format"] == fmt and r["side"] == "quantgate")
        ratio = (q["calibrate_s"] + q["export_s"]) / (p["calibrate_s"] + p["export_s"])
        results[f"{fmt}_ratio"] = ratio
        print(f"{fmt}: plain {p['calibrate_s']:.1f}+{p['export_s']:.1f} s, quantgate {q['calibrate_s']:.1f}+{q['export_s']:.1f} s, "
              f"ratio {ratio:.3f}; peak/16-bit weights plain {p['peak_over_weights']:.3f}, quantgate {q['peak_over_weights']:.3f}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
