"""GPU benchmark of the torch engine's real kernels and memory, in one process (issue 12, items 1-4).

A random-weight model of a real architecture (default: the Llama-3.1-8B shape) is built on the GPU,
its linear layers' input ranges measured on one forward, and written as a bf16 HF checkpoint plus
FP8, INT8-SQ and INT4-AWQ checkpoints in ModelOpt's unified-export layout (tests/kernel_ckpt.py;
speed and memory do not depend on the weights' values). Then, per format, in this order
bf16, fp8, int8_sq, int4_awq, bf16 again (the second bf16 shows order effects):
  - TorchEngine.load (kernels=auto): load seconds, warm-up seconds, load peak and resident GPU
    memory vs the checkpoint's tensor bytes;
  - scoring throughput through TorchEngine.score, lm-eval style (the last 16 tokens of each
    sequence scored), warm-up excluded, median of --repeats timed passes; tokens/s counts every
    token run through the model;
  - quantized formats: per-token KL(reference path || kernels) on --kl-seqs sequences.
    Random weights give nearly flat logits, so this KL mostly checks that nothing is broken; the
    trained-model KL check is tests/test_kernels.py.
Run on a CUDA machine:  python bench/gpu_kernels.py --out results.json [--layers 2 for a smoke run]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def build(work: Path, shape: str, layers: int | None) -> tuple[dict, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.kernel_ckpt import activation_amax, write_quantized
    from tests.tiny import build_tokenizer

    src = work / "bf16"
    tok = build_tokenizer(src)
    cfg = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}, max_position_embeddings=8192,
                      architectures=["LlamaForCausalLM"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(src)
    ids = torch.randint(0, cfg.vocab_size, (4, 512), generator=torch.Generator().manual_seed(1))
    amax = activation_amax(model, ids)
    info = {"build_and_save_bf16_s": round(time.perf_counter() - t0, 1)}
    for fmt in ("fp8", "int8_sq", "int4_awq"):
        t = time.perf_counter()
        write_quantized(model, src, work / fmt, fmt, amax)
        info[f"write_{fmt}_s"] = round(time.perf_counter() - t, 1)
    info["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return info, src


def throughput(engine, seqs: list[list[int]], repeats: int) -> dict:
    from quantgate.engines.base import ScoreRequest

    reqs = [ScoreRequest(s, len(s) - 16) for s in seqs]
    engine.score(reqs[: engine.limits.max_batch_size])  # this shape's own first call
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.score(reqs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    tokens = sum(len(s) for s in seqs)
    tps = [tokens / x for x in times]
    return {"tokens": tokens, "seconds": [round(x, 4) for x in times], "tokens_per_s_median": statistics.median(tps),
            "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps)}


def generation(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy decoding throughput (the GSM8K-CoT regime: small GEMMs, launch- and memory-bound)."""
    engine.generate(prompts[:2], 4)  # this regime's own first call
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, new_tokens)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    made = sum(len(o.token_ids) for o in outs)
    return {"prompts": len(prompts), "new_tokens": made, "seconds": round(dt, 3), "new_tokens_per_s": made / dt}


def kl_vs_reference(ckpt, spec_kwargs: dict, logits_kernel: torch.Tensor, ids: torch.Tensor) -> dict:
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.recipe import EngineSpec

    engine = TorchEngine.load(ckpt, EngineSpec(**{**spec_kwargs, "kernels": "reference"}))
    with torch.inference_mode():
        ref = engine.model(input_ids=ids.cuda()).logits.float()
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(logits_kernel.cuda(), -1)
    kl = (p.exp() * (p - q)).sum(-1).flatten()
    top1 = float((ref.argmax(-1) == logits_kernel.cuda().argmax(-1)).float().mean())
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": top1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--out", default="gpu_kernels.json")
    ap.add_argument("--workdir", default=None)
    # fp8-separate: the FP8 checkpoint without joining q/k/v and gate/up (kernels.join_fp8_projections)
    ap.add_argument("--formats", default="bf16,fp8,fp8-separate,int8_sq,int4_awq,bf16")
    ap.add_argument("--gen-prompts", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--seq-lens", default="512,1024")
    ap.add_argument("--n-seqs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kl-seqs", type=int, default=4)
    args = ap.parse_args()
    from quantgate.artifacts import Checkpoint
    from quantgate.engines import kernels as kern
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.recipe import EngineSpec

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qg-kernels-"))
    if not args.workdir:  # ~40 GB of 8B checkpoints: a full disk fails the next job on the machine
        import atexit
        import shutil

        atexit.register(shutil.rmtree, work, True)
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                 "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"], "rows": [], "errors": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    info, src = build(work, args.shape, args.layers)
    res.update(info)
    print(json.dumps(info), flush=True)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(2)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    data = {n: torch.randint(0, vocab, (args.n_seqs, n), generator=g).tolist() for n in seq_lens}
    kl_ids = torch.randint(0, vocab, (args.kl_seqs, 256), generator=g)
    gen_prompts = torch.randint(0, vocab, (args.gen_prompts, 200), generator=g).tolist()
    joiner = kern.join_fp8_projections
    spec_kwargs = dict(device="cuda", max_batch_size=8, max_input_len=2048, max_seq_len=2304)
    for i, fmt in enumerate(args.formats.split(",")):
        d = src if fmt == "bf16" else work / fmt.split("-")[0]
        kern.join_fp8_projections = joiner if fmt != "fp8-separate" else (lambda model: {})
        ckpt = Checkpoint(path=str(d), format=fmt, quant_algo=None, dtype="bfloat16", size_bytes=0)
        row: dict = {"format": fmt, "order": i,
                     "checkpoint_file_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors"))}
        try:
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            engine = TorchEngine.load(ckpt, EngineSpec(**spec_kwargs, kernels="auto"))
            mem = engine.memory_stats()
            row.update(engine.one_time_costs())
            row.update(kernels=engine.settings["kernels"], base_allocated_bytes=base, **mem)
            row["resident_over_checkpoint"] = (mem["resident_gpu_bytes"] - base) / mem["checkpoint_tensor_bytes"]
            row["load_peak_over_checkpoint"] = (mem["load_peak_gpu_bytes"] - base) / mem["checkpoint_tensor_bytes"]
            for n in seq_lens:
                row[f"score_{n}"] = throughput(engine, data[n], args.repeats)
            if args.gen_tokens:
                row["generate"] = generation(engine, gen_prompts, args.gen_tokens)
            row.update({k: v for k, v in engine.settings.items() if k in ("joined_groups", "fused_mlps")})
            with torch.inference_mode():
                kernel_logits = engine.model(input_ids=kl_ids.cuda()).logits.float().cpu()
            engine.close()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            row["after_close_allocated_bytes"] = torch.cuda.memory_allocated()
            if fmt != "bf16":
                row["kl_vs_reference"] = kl_vs_reference(ckpt, spec_kwargs, kernel_logits, kl_ids)
        except Exception as err:  # keep the other formats' figures
            import traceback

            traceback.print_exc()
            res["errors"].append(f"{fmt}: {type(err).__name__}: {err}")
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    first_bf16 = next((r for r in res["rows"] if r["format"] == "bf16" and f"score_{seq_lens[0]}" in r), None)
    if first_bf16:
        for r in res["rows"]:
            for n in seq_lens:
                if f"score_{n}" in r:
                    r[f"speedup_vs_bf16_{n}"] = r[f"score_{n}"]["tokens_per_s_median"] / first_bf16[f"score_{n}"]["tokens_per_s_median"]
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{'format':9} {'kernels':9} {'ckpt GiB':>8} {'resident/ckpt':>13} {'loadpeak/ckpt':>13} {'load s':>6} {'warm s':>6} "
          + " ".join(f"{'tok/s@' + str(n):>11} {'x bf16':>6}" for n in seq_lens) + "  KL mean/max")
    for r in res["rows"]:
        if "resident_over_checkpoint" not in r:
            print(f"{r['format']:9} FAILED")
            continue
        kl = r.get("kl_vs_reference")
        print(f"{r['format']:9} {r['kernels']:9} {r['checkpoint_tensor_bytes'] / 2**30:8.2f} {r['resident_over_checkpoint']:13.3f} "
              f"{r['load_peak_over_checkpoint']:13.3f} {r.get('load_s', 0):6.1f} {r.get('warmup_s', 0):6.1f} "
              + " ".join(f"{r[f'score_{n}']['tokens_per_s_median']:11.0f} {r.get(f'speedup_vs_bf16_{n}', 0):6.2f}" for n in seq_lens)
              + (f"  {kl['kl_mean']:.1e}/{kl['kl_max']:.1e}" if kl else ""))
    for e in res["errors"]:
        print("ERROR", e)


if __name__ == "__main__":
    main()
