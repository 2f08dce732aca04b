"""Golden-prompt generation: rows per batch = engine.max_batch_size (before) against `golden_rows`
(one batch of tokens, now), alternating in one process on the recipe's model and suite.

    PYTHONPATH=. python bench/golden_batch.py recipes/fp8.yaml --repeats 2 --out bench/results/x.json

Reports the seconds of each repeat, the ratio of the medians, and how many prompts generate the
same tokens both ways. Runs on the engine's device (the CPU unless CUDA is there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine, compute_dtype_for, resolve_device
    from quantgate.evaluation.golden import encode_prompt, golden_rows, load_golden
    from quantgate.evaluation.suites import load_suite
    from quantgate.models import load_model, resolve_model_dir
    from quantgate.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    e = recipe.engine
    device = resolve_device(e.device)
    model, tok = load_model(resolve_model_dir(recipe.model), recipe.model, dtype=compute_dtype_for(device, recipe.model.dtype), device=device)
    limits = EngineLimits(e.max_batch_size, e.max_input_len, e.max_seq_len)
    engine = TorchEngine.from_model(model, tok, limits, device)
    new = recipe.evaluation.golden.max_new_tokens
    ids = [encode_prompt(tok, p["prompt"]) for p in load_golden(load_suite(recipe.evaluation.suite).golden)]
    settings = {"max_batch_size": limits.max_batch_size, "golden_rows": golden_rows(limits, [len(i) for i in ids], new)}

    def run(rows: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        gens = []
        for b in range(0, len(ids), rows):
            gens += engine.generate(ids[b : b + rows], new, max_rows=rows)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, [g.token_ids for g in gens]

    seconds: dict[str, list[float]] = {k: [] for k in settings}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, rows in settings.items():
            s, toks = run(rows)
            seconds[name].append(round(s, 3))
            tokens[name] = toks
            print(f"{name} ({rows} rows): {s:.2f} s", flush=True)
    same = sum(a == b for a, b in zip(tokens["max_batch_size"], tokens["golden_rows"], strict=True))
    ratio = statistics.median(seconds["golden_rows"]) / statistics.median(seconds["max_batch_size"])
    out = {"recipe": args.recipe, "device": device, "cpus": os.cpu_count(), "machine": platform.machine(),
           "torch": torch.__version__, "prompts": len(ids), "max_new_tokens": new, "rows": settings,
           "seconds": seconds, "ratio_golden_rows_to_max_batch_size": round(ratio, 3),
           "prompts_with_identical_tokens": same}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
