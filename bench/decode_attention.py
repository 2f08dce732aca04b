"""Decode-step time of a grouped-query model: transformers' sdpa vs quantgate's grouped decode
attention (quantgate/engines/attention.py), in the same process, same weights, same cache; with
`--compare cache`, both on the grouped attention, transformers' DynamicCache (torch.cat per step)
vs quantgate's reserved cache (quantgate/engines/kv_cache.py).

The loop is quantgate's shared-prefix generation (engines/torch_prefix.py): a left-padded batch
whose KV cache holds `--context` tokens, then greedy decode steps with a 2-D padding mask (which
is what makes transformers expand K/V per query head). Needs CUDA; needs only torch and
transformers (the H200 image has both).

    python bench/decode_attention.py --shape llama-3.1-8b --batch 128 --context 900 --steps 32 --out OUT.json
    python bench/decode_attention.py --compare cache --shape llama-3.1-8b --batch 128 --context 900 --steps 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantgate.engines.attention import NAME, use_grouped_decode_attention  # noqa: E402
from quantgate.engines.kv_cache import reserved_copy  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (64, 128, 2, 8, 2, 97),  # a CPU check of this script
}


def build(shape: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the weights on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_steps(model, cache, mask, pos, last, steps: int, device: str) -> tuple[list[float], torch.Tensor]:
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    times = []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        tok = head(last).float().argmax(dim=-1)
        tok.tolist()  # the host sync quantgate's loop does (stop checks)
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)], dim=1)
        h = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=(pos + step)[:, None],
                    past_key_values=cache, use_cache=True).last_hidden_state
        last = h[:, -1]
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, last


def kernel_error(device: str, n: int = 128, ctx: int = 900, heads: int = 32, kv: int = 8, dim: int = 128) -> dict:
    """One decode attention call, both ways, against an fp32 reference: which one rounds more?"""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quantgate.engines.attention import grouped_decode_attention

    g = torch.Generator(device=device).manual_seed(2)
    q = torch.randn(n, heads, 1, dim, device=device, generator=g).bfloat16()
    k = torch.randn(n, kv, ctx, dim, device=device, generator=g).bfloat16()
    v = torch.randn(n, kv, ctx, dim, device=device, generator=g).bfloat16()
    pad = torch.randint(0, ctx // 4, (n,), device=device, generator=g)
    mask = (torch.arange(ctx, device=device)[None, :] >= pad[:, None])[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True)
    kf, vf = (t.float().repeat_interleave(heads // kv, dim=1) for t in (k, v))
    s = (q.float() @ kf.transpose(-1, -2)) / dim**0.5
    ref = (s.masked_fill(~mask, float("-inf")).softmax(-1) @ vf).transpose(1, 2)
    out = {}
    for name, fn in (("sdpa", sdpa_attention_forward), (NAME, grouped_decode_attention)):
        o = fn(module, q, k, v, mask, scaling=dim**-0.5)[0].float()
        out[name] = {"max_abs_err": float((o - ref).abs().max()), "mean_abs_err": float((o - ref).abs().mean())}
    out["ref_mean_abs"] = float(ref.abs().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=900)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--kernel-error-only", action="store_true")
    ap.add_argument("--compare", choices=("attention", "cache"), default="attention",
                    help="attention: sdpa vs grouped decode; cache: DynamicCache vs reserved cache (both grouped)")
    args = ap.parse_args()
    if args.kernel_error_only:
        print(json.dumps(kernel_error(args.device), indent=1))
        return
    t0 = time.perf_counter()
    dev = args.device
    model = build(args.shape, dev)
    n, ctx = args.batch, args.context
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (n, ctx), device=dev, generator=g)
    pad = torch.randint(0, ctx // 4, (n,), device=dev, generator=g)  # left padding of 0..ctx/4 tokens
    mask = (torch.arange(ctx, device=dev)[None, :] >= pad[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        from transformers import DynamicCache

        cache0 = DynamicCache(config=model.config)
        last0 = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache0,
                                    use_cache=True).last_hidden_state[:, -1]
    build_s = time.perf_counter() - t0
    result: dict = {"device": torch.cuda.get_device_name() if dev != "cpu" else "cpu", "torch": torch.__version__, "shape": args.shape, "batch": n,
                    "context": ctx, "steps": args.steps, "setup_s": round(build_s, 1), "runs": {}}
    lasts = {}
    variants = ("sdpa", NAME) if args.compare == "attention" else ("dynamic", "reserved")

    def prepare(impl: str):
        if impl == "sdpa":
            model.set_attn_implementation("sdpa")
        elif model.config._attn_implementation != NAME:
            assert use_grouped_decode_attention(model)
        if impl == "reserved":
            return reserved_copy(model, cache0, n, ctx + args.steps)
        return copy.deepcopy(cache0)

    for _rep in range(args.repeats):
        for impl in variants:  # alternate, so drift hits both
            cache = prepare(impl)
            times, last = time_steps(model, cache, mask, pos[:, -1] + 1, last0, args.steps, dev)
            del cache
            if dev != "cpu":
                torch.cuda.empty_cache()
            lasts[impl] = last.float()
            steady = times[2:]  # first steps: allocator growth
            result["runs"].setdefault(impl, []).append({"median_ms": round(1000 * statistics.median(steady), 2),
                                                        "mean_ms": round(1000 * statistics.fmean(steady), 2)})
    # One decode step from the same cache and the same tokens (the timed runs diverge: with random
    # weights the greedy token flips on rounding, after which the rows are different sequences).
    tok = torch.randint(0, model.config.vocab_size, (n, 1), device=dev, generator=g)
    step_mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
    one = {}
    for impl in variants:
        cache = prepare(impl)
        with torch.inference_mode():
            one[impl] = model.get_decoder()(input_ids=tok, attention_mask=step_mask, position_ids=pos[:, -1:] + 1,
                                            past_key_values=cache, use_cache=True).last_hidden_state[:, -1].float()
        del cache
    base, other = variants
    d = (one[base] - one[other]).abs()
    result["one_step_max_abs_diff"] = float(d.max())
    result["one_step_mean_abs_diff"] = float(d.mean())
    result["one_step_mean_abs"] = float(one[base].abs().mean())
    if args.compare == "attention":
        result["attention_error_vs_fp32"] = kernel_error(dev)
    a, b = lasts[base], lasts[other]
    result["last_hidden_max_abs_diff"] = float((a - b).abs().max())
    result["last_hidden_max_abs"] = float(a.abs().max())
    med = {k: statistics.median(r["median_ms"] for r in v) for k, v in result["runs"].items()}
    result["ratio_grouped_over_sdpa" if args.compare == "attention" else "ratio_reserved_over_dynamic"] = round(med[other] / med[base], 3)
    result["compare"] = args.compare
    if dev != "cpu":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
