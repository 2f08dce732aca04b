"""What a gate spends before its first forward pass, per side: loading lm-eval's tasks, building
their requests and tokenizing them, the first time in a process and again (the candidate side,
or the lm-eval run after the prompt-length check), with quantgate's per-process token memo
(`EncodingMemo`) on and off. CPU only; no model is run.

    PYTHONPATH=. python bench/task_prep.py recipes/fp8_standard.yaml --repeats 2 --out bench/results/x.json

Each pass uses a tokenizer object loaded afresh from the same files, as each side's engine does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--repeats", type=int, default=2, help="tokenization passes after the first, per setting")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from quantgate.evaluation import suites
    from quantgate.evaluation.lm_eval_adapter import ENCODING_MEMO
    from quantgate.models import resolve_model_dir
    from quantgate.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    spec = recipe.evaluation
    model_dir = resolve_model_dir(recipe.model)
    built = suites.build_suite(spec.suite, spec.seed)
    out: dict = {"recipe": args.recipe, "suite": spec.suite, "cpus": os.cpu_count(), "machine": platform.machine()}

    t = time.perf_counter()
    loaded = suites.load_tasks(built, spec)
    out["load_tasks_s"] = [round(time.perf_counter() - t, 3)]
    t = time.perf_counter()
    suites.load_tasks(built, spec)
    out["load_tasks_s"].append(round(time.perf_counter() - t, 3))

    def lengths_pass() -> tuple[float, int]:
        tok = AutoTokenizer.from_pretrained(model_dir)
        t = time.perf_counter()
        lengths = suites._request_lengths(tok, loaded.tasks, spec.limit)
        return round(time.perf_counter() - t, 3), len(lengths)

    for setting in ("memo_off", "memo_on"):
        ENCODING_MEMO.clear()
        ENCODING_MEMO.max_tokens = 0 if setting == "memo_off" else 64_000_000
        runs = [lengths_pass() for _ in range(1 + args.repeats)]
        out[setting] = {"build_and_tokenize_s": [s for s, _ in runs], "requests": runs[0][1],
                        "memo_tokens": ENCODING_MEMO.tokens}
        print(setting, out[setting], flush=True)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
