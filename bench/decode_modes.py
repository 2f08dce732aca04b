"""GSM8K-CoT-shaped generation through the gate's own path (TorchEngine.generate_shared), one
process, same weights, each decode mode (EngineSpec.decode) in turn, alternating over repeats:

  shrinking  eager steps, finished rows leave the batch (the decode up to session 7)
  fixed      fixed shapes (whole reserved buffer, masked tail), eager
  graph      the same fixed shapes, each step one CUDA graph replay (engines/decode_graph.py)
  MODE@b     MODE as it decoded before the token budget and the overlap: `--batch` rows a batch
             (not shared_decode_rows) and each step's tokens read before the next step is queued

A shared prefix of `--prefix` tokens (GSM8K-CoT's 8 exemplars are ~800 with SmolLM2's tokenizer),
`--rows` suffixes of 60..`--suffix` tokens, `--new` greedy tokens with no stop string (a random-
weight model rarely emits EOS, so every row runs to the end: steps = batches x new). Reports wall
time per mode, ms per decode step, and how many rows' tokens equal the shrinking loop's.

    python bench/decode_modes.py MODEL_DIR --batch 64 --rows 128 --new 256 --out OUT.json
    python bench/decode_modes.py MODEL_DIR --batch 64 --rows 234 --modes graph@b,graph --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("shrinking", "fixed", "graph")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=800)
    ap.add_argument("--suffix", type=int, default=160)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.attention import use_grouped_decode_attention
    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.engines.torch_prefix import generate_shared, shared_decode_rows

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    grouped = use_grouped_decode_attention(model)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    engine = TorchEngine.from_model(model, tok, EngineLimits(max_batch_size=args.batch, max_input_len=2048, max_seq_len=2304),
                                    device=args.device)
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, len(tok))
    prefix = torch.randint(100, vocab, (args.prefix,), generator=g).tolist()
    sizes = torch.randint(60, args.suffix + 1, (args.rows,), generator=g).tolist()
    suffixes = [torch.randint(100, vocab, (n,), generator=g).tolist() for n in sizes]
    load_s = time.perf_counter() - t0
    modes = args.modes.split(",")
    result: dict = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__,
                    "model": args.model_dir.name, "layers": model.config.num_hidden_layers, "grouped_attention": grouped,
                    "batch": args.batch, "rows": args.rows, "prefix": args.prefix, "suffix_max": args.suffix, "new": args.new,
                    "shared_decode_rows": shared_decode_rows(args.batch, 2304, args.prefix, sizes, args.new),
                    "load_s": round(load_s, 1), "runs": {m: [] for m in modes},
                    # SDPBackend ids (1 flash, 2 efficient, 0 math, 3 cuDNN): the order SDPA tries them in
                    "sdp_priority": [int(b) for b in torch._C._get_sdp_priority_order()]}
    tokens: dict[str, list[list[int]]] = {}
    for _rep in range(args.repeats):
        for mode in modes:
            engine.decode_mode, before = mode.split("@")[0], mode.endswith("@b")
            engine._one_time.clear()
            if args.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            gens = generate_shared(engine, prefix, suffixes, args.new, rows_per_batch=args.batch if before else None, overlap=not before)
            if args.device != "cpu":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            costs = engine.one_time_costs()
            if "decode_batches" in costs:  # fixed shapes: every step of every batch
                steps = int(costs["decode_graph_replays"] + costs["decode_eager_steps"])
            else:
                steps = sum(max(len(x.token_ids) for x in gens[i : i + args.batch]) for i in range(0, len(gens), args.batch))
            tokens[mode] = [x.token_ids for x in gens]
            result["runs"][mode].append({"wall_s": round(wall, 2), "decode_steps": steps, "ms_per_step": round(1000 * wall / max(steps, 1), 2),
                                         "tokens_per_s": round(sum(len(x.token_ids) for x in gens) / wall, 1),
                                         **{k: v for k, v in costs.items() if k.startswith("decode")}})
            print(mode, result["runs"][mode][-1], flush=True)
    med = {m: statistics.median(r["ms_per_step"] for r in runs) for m, runs in result["runs"].items()}
    result["median_ms_per_step"] = med
    walls = {m: statistics.median(r["wall_s"] for r in runs) for m, runs in result["runs"].items()}
    result["median_wall_s"] = walls
    for m in walls:  # the token budget and the overlap against the decode before them
        if m.endswith("@b") and m[:-2] in walls:
            result[f"wall_ratio_{m[:-2]}_vs_{m}"] = round(walls[m[:-2]] / walls[m], 3)
            result[f"rows_equal_{m[:-2]}_vs_{m}"] = sum(a == b for a, b in zip(tokens[m[:-2]], tokens[m], strict=True))
    if "shrinking" in med:
        result["ratio_vs_shrinking"] = {m: round(v / med["shrinking"], 3) for m, v in med.items()}
        ref = tokens["shrinking"]
        result["rows_equal_to_shrinking"] = {m: sum(a == b for a, b in zip(t, ref, strict=True)) for m, t in tokens.items()}
        result["tokens_equal_to_shrinking"] = {
            m: round(sum(x == y for a, b in zip(t, ref, strict=True) for x, y in zip(a, b, strict=False)) / max(1, sum(len(b) for b in ref)), 4)
            for m, t in tokens.items()}
    if "fixed" in tokens and "graph" in tokens:
        result["graph_rows_equal_to_fixed"] = sum(a == b for a, b in zip(tokens["graph"], tokens["fixed"], strict=True))
    if args.device != "cpu":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
