"""Wall time of one matrix with `--executor local` vs `--executor ray` (a local Ray cluster
started by the run itself, as `quantgate run --executor ray` does without RAY_ADDRESS).

Each run starts from a cold baseline (the baseline cache and its export are cleared) with the
converted model and built suites kept, writes fresh run directories (`--fresh`) and its own
sqlite MLflow store. Executors alternate (local, ray, ray, local, ...) so drift on a shared
machine falls on both. The verdicts of every run are recorded to show they agree.

    python bench/executor_local_vs_ray.py [--repeats 1] [--recipes recipes/fp8.yaml recipes/int8_sq.yaml] \
        [--set evaluation.limit=20 ...] [--out bench/results/cpu_executor_local_vs_ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(executor: str, recipes: list[str], cache: Path, work: Path, sets: list[str]) -> dict:
    for sub in ("baselines", "baseline_checkpoints"):  # cold baseline, warm model conversion
        shutil.rmtree(cache / sub, ignore_errors=True)
    env = {**os.environ, "QUANTGATE_CACHE": str(cache)}
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    all_sets = [*sets, f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "quantgate.cli", "run", *recipes, "--json", "--fresh", "--executor", executor]
    cmd += [x for s in all_sets for x in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1, 4, 5):
        raise SystemExit(f"{executor} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout)
    return {"executor": executor, "wall_s": round(wall, 1), "exit_code": proc.returncode,
            "verdicts": {r["recipe"]: r["decision"] for r in out["recipes"]},
            "baseline_cache": {r["recipe"]: r["baseline_cache"].split()[0] for r in out["recipes"]},
            "stage_s": {r["recipe"]: r["timings"] for r in out["recipes"]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["recipes/fp8.yaml", "recipes/int8_sq.yaml"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (local+ray, then ray+local, ...)")
    ap.add_argument("--cache", default=None, help="cache folder to reuse (converted model, suites); default: a temp one")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qg-exec-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    runs = []
    for i in range(args.repeats):
        order = ["local", "ray"] if i % 2 == 0 else ["ray", "local"]
        for executor in order:
            r = run(executor, args.recipes, cache, work / f"{executor}-{i}", args.set)
            print(json.dumps({k: r[k] for k in ("executor", "wall_s", "exit_code", "verdicts", "baseline_cache")}), flush=True)
            runs.append(r)
    result = {"recipes": args.recipes, "settings": args.set, "cpus": os.cpu_count(), "runs": runs}
    for executor in ("local", "ray"):
        walls = [r["wall_s"] for r in runs if r["executor"] == executor]
        result[f"{executor}_wall_s"] = walls
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
