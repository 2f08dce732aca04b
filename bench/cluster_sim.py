"""A recipes x models matrix on N GPUs (one Ray task per recipe, `--executor ray`) against one
GPU (`--executor local`), simulated from measured per-stage times.

Inputs are real quantgate runs on an H200 (`bench/results/gpu_e2e_*.json`: fp16, fp8, int8_sq,
int4_awq end to end, the first recipe evaluating the baseline, the others hitting the cache). The
simulation reproduces what the executors do:

- local (1 GPU): the recipes one after another; per model, the model is prepared and the baseline
  exported and evaluated once (in-memory memo and the baseline cache).
- ray (N GPUs): jobs start in submission order on the first free GPU. The first job of a model
  prepares it and fills the baseline cache under the cache's fill lock; a job of the same model
  that reaches the baseline meanwhile WAITS, holding its GPU (that is what the lock does), then
  reads the cache. The candidate work (load, calibrate, export, evaluate) runs in parallel.

Models: A = SmolLM2-135M-Instruct (bundled GGUF; its `model` time is the one-time GGUF
conversion), B = a random Llama-3.2-1B-shaped model, C = a second 1B-shaped model with B's
timings (no third model was measured). `--download-s` adds a per-model download/convert time
(hub downloads were not measured: nothing here reaches a hub).

    python bench/cluster_sim.py [--gpus 1 2 4 8 12] [--download-s 0] [--out bench/results/cluster_sim.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["fp16", "fp8", "int8_sq", "int4_awq"]
MEASURED = {
    "A-smollm2-135m": "bench/results/gpu_e2e_default_model_h200.json",
    "B-llama-1b-shaped": "bench/results/gpu_e2e_llama1b_random_h200.json",
    "C-llama-1b-shaped": "bench/results/gpu_e2e_llama1b_random_h200.json",
}
PREPARE = ("model", "model_hash")  # once per model (cached on shared storage)
BASELINE = ("baseline_export", "baseline_evaluate")  # once per model (baseline cache)


@dataclass
class Job:
    model: str
    recipe: str
    prepare: float  # model download/convert + hash: the first job of a model pays it
    baseline: float  # baseline export + evaluation: the first job of a model pays it
    own: float  # this recipe's own work (calibrate, export, evaluate, gate, ...)


def load_jobs(download_s: float) -> dict[tuple[str, str], Job]:
    jobs = {}
    for model, path in MEASURED.items():
        data = json.loads((ROOT / path).read_text())
        by_recipe = {r["recipe"]: r["timings"] for r in data["recipes"]}
        prep = sum(by_recipe["fp16"].get(k, 0.0) for k in PREPARE) + download_s
        base = sum(by_recipe["fp16"].get(k, 0.0) for k in BASELINE)
        for recipe in RECIPES:
            t = by_recipe[recipe]
            own = sum(v for k, v in t.items() if k not in PREPARE + BASELINE)
            jobs[(model, recipe)] = Job(model, recipe, prep, base, own)
    return jobs


def local_wall(order: list[Job]) -> float:
    seen: set[str] = set()
    total = 0.0
    for j in order:
        if j.model not in seen:
            seen.add(j.model)
            total += j.prepare + j.baseline
        total += j.own
    return total


def ray_wall(order: list[Job], gpus: int) -> tuple[float, float]:
    """(makespan, GPU-seconds spent waiting on another job's baseline)."""
    free = [(0.0, g) for g in range(gpus)]
    heapq.heapify(free)
    ready: dict[str, float] = {}  # model -> time its prepared model + baseline cache entry exist
    end, waited = 0.0, 0.0
    for j in order:
        start, gpu = heapq.heappop(free)
        if j.model not in ready:  # first job of this model fills the cache (holding the lock)
            ready[j.model] = start + j.prepare + j.baseline
            t = ready[j.model]
        else:  # waits for the holder, holding its GPU, then reads the cache
            t = max(start, ready[j.model])
            waited += t - start
        finish = t + j.own
        end = max(end, finish)
        heapq.heappush(free, (finish, gpu))
    return end, waited


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--download-s", type=float, default=0.0, help="per-model download/convert seconds added to the first job of each model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    jobs = load_jobs(args.download_s)
    models = list(MEASURED)
    orders = {
        "by model (A:fp16..int4, B:..., C:...)": [jobs[(m, r)] for m in models for r in RECIPES],
        "interleaved (A:fp16, B:fp16, C:fp16, A:fp8, ...)": [jobs[(m, r)] for r in RECIPES for m in models],
    }
    one_gpu = local_wall(orders["by model (A:fp16..int4, B:..., C:...)"])
    result = {"one_gpu_local_s": round(one_gpu, 1), "download_s": args.download_s, "orders": {}}
    print(f"4 recipes x 3 models = {len(jobs)} jobs; --executor local on 1 GPU: {one_gpu:.0f} s")
    print(f"{'order':<48} {'GPUs':>4} {'wall s':>8} {'speed-up':>8} {'GPU-s waiting on a baseline':>28}")
    for name, order in orders.items():
        rows = []
        for n in args.gpus:
            wall, waited = ray_wall(order, n)
            rows.append({"gpus": n, "wall_s": round(wall, 1), "speedup": round(one_gpu / wall, 2), "gpu_s_waiting": round(waited, 1)})
            print(f"{name:<48} {n:>4} {wall:>8.0f} {one_gpu / wall:>8.2f} {waited:>28.0f}")
        result["orders"][name] = rows
    longest = max(jobs.values(), key=lambda j: j.prepare + j.baseline + j.own)
    floor = longest.prepare + longest.baseline + longest.own
    print(f"floor with unlimited GPUs: the longest chain, {longest.model} {longest.recipe} = {floor:.0f} s (prepare + baseline + its own work)")
    result["floor_s"] = round(floor, 1)
    result["floor_job"] = f"{longest.model}/{longest.recipe}"
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
