"""quantgate's scoring (torch engine + lm-eval adapter, shared contexts) vs lm-eval's own HF
backend (`--model hf`), on the same standard tasks, model and hardware.

Both sides run lm-eval's `simple_evaluate` on the same offline task YAMLs (standard_tasks.py) and
the same in-memory model (SmolLM2-135M, its 16-bit weights computed in fp32, as the torch engine
runs the exported baseline on CPU); only the `model=` differs. Repeats alternate the order.
quantgate's side is its evaluation path: every prompt's length is checked before the run (one
more build of the requests, as `evaluate_tasks` does), Jinja templates compiled once, contexts
shared, continuations scored in one vocab projection per batch.
Reports wall time per side, the ratio (target: quantgate <= 0.7x lm-eval) with its spread, and
tokens through the model: counted by the adapter for quantgate; for lm-eval, counted from the
requests the way HFLM runs them (each (context, continuation) on its own, except that HFLM runs
a context once when all its continuations are single tokens; prompt + generated tokens for
generation).

    PYTHONPATH=. python bench/scoring_vs_lm_eval.py --repeats 2 --out bench/results/cpu_scoring_vs_lm_eval.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_TASKS = {"hellaswag": 40, "arc_challenge": 40, "mmlu_anatomy": 20, "mmlu_astronomy": 20, "mmlu_marketing": 20,
                 "lambada_openai": 40, "gsm8k_cot": 4}


def load_model(device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.models import resolve_model_dir
    from quantgate.recipe import ModelSpec

    d = resolve_model_dir(ModelSpec(source="bundled:SmolLM2-135M-Instruct"))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16)
    model = (model.float() if device == "cpu" else model).to(device).eval()
    return model, tok


def hf_tokens(out: dict[str, Any], tok: Any) -> int:
    """Tokens HFLM sends through the model for the logged requests (see module doc)."""
    from quantgate.evaluation.lm_eval_adapter import TokenEncoder

    enc = TokenEncoder(tok)
    total = 0
    for samples in out["samples"].values():
        seen: set[int] = set()
        for s in samples:
            if s["doc_id"] in seen:  # one logged sample per (doc, filter): count each doc once
                continue
            seen.add(s["doc_id"])
            args = s["arguments"]  # one (context, continuation) or (context, gen_kwargs) per request
            if isinstance(args[0][1], str):  # log-likelihood
                pairs = [enc.encode_pair(x, c) for x, c in args]
                if all(len(c) == 1 for _, c in pairs) and len({tuple(x) for x, _ in pairs}) == 1:
                    total += len(pairs[0][0]) + 1
                else:
                    total += sum(len(x) + len(c) for x, c in pairs)
            else:  # generation: prompt + generated
                total += len(enc.encode_generation_context(args[0][0])) + len(tok.encode(s["resps"][0][0], add_special_tokens=False))
    return total


def run_once(kind: str, model: Any, tok: Any, tasks: dict[str, int], dirs: list[str], batch_size: int, device: str) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager, get_task_dict

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM, compiled_templates
    from quantgate.evaluation.suites import _request_lengths

    lm: Any
    args = None
    if kind == "quantgate":
        engine = TorchEngine.from_model(model, tok, EngineLimits(batch_size, 2048, 2304), device=device)
        lm = QuantgateLM(engine, batch_size=batch_size, show_progress=False)
    else:
        lm, args = "hf", {"pretrained": model, "tokenizer": tok, "device": device, "batch_size": batch_size}
    wall, tokens, per_task = 0.0, 0, {}
    for name, limit in tasks.items():  # lm-eval's `limit` is one number per call
        tm = TaskManager(include_path=dirs, include_defaults=False)
        t0 = time.perf_counter()
        with compiled_templates() if kind == "quantgate" else contextlib.nullcontext():
            if kind == "quantgate":  # as evaluate_tasks: every prompt's length is checked first
                _request_lengths(tok, get_task_dict([name], tm), limit)
            out = lm_eval.simple_evaluate(model=lm, model_args=args, tasks=[name], task_manager=tm, limit=limit, log_samples=True,
                                          bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        dt = time.perf_counter() - t0
        n_tok = lm.stats[name].tokens if kind == "quantgate" else hf_tokens(out, tok)
        wall += dt
        tokens += n_tok
        metric = {k: v for k, v in out["results"][name].items() if isinstance(v, float) and "stderr" not in k}
        per_task[name] = {"wall_s": round(dt, 2), "tokens": n_tok, "metrics": metric}
    return {"wall_s": round(wall, 2), "tokens": tokens, "tasks": per_task}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", default=",".join(f"{k}={v}" for k, v in DEFAULT_TASKS.items()), help="name=limit,...")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import torch

    from quantgate.evaluation.standard_tasks import build_standard

    tasks = {k: int(v) for k, v in (x.split("=") for x in a.tasks.split(","))}
    dirs = sorted({str(build_standard(n).task_dir) for n in tasks})
    model, tok = load_model(a.device)
    runs: list[dict[str, Any]] = []
    for r in range(a.repeats):
        order = ["hf", "quantgate"] if r % 2 == 0 else ["quantgate", "hf"]
        rep = {k: run_once(k, model, tok, tasks, dirs, a.batch_size, a.device) for k in order}
        rep["ratio"] = round(rep["quantgate"]["wall_s"] / rep["hf"]["wall_s"], 3)
        runs.append(rep)
        print(f"repeat {r + 1}: lm-eval hf {rep['hf']['wall_s']:.1f} s ({rep['hf']['tokens']} tokens), "
              f"quantgate {rep['quantgate']['wall_s']:.1f} s ({rep['quantgate']['tokens']} tokens), ratio {rep['ratio']:.3f}", flush=True)
    ratios = [x["ratio"] for x in runs]
    summary = {
        "tasks": tasks, "device": a.device, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "ratio_mean": round(statistics.mean(ratios), 3), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "tokens_hf": runs[0]["hf"]["tokens"], "tokens_quantgate": runs[0]["quantgate"]["tokens"],
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
