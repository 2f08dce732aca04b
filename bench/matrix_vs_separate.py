"""Matrix run vs the same recipes run one by one from cold, cache-hit overhead, per-stage times.

  separate: each recipe in its own process with its own cold cache (baseline evaluated each time)
  matrix:   one `quantgate run A B C` with a cold cache (baseline evaluated once)
  cache hit: a second matrix run over the same cache (`--fresh` run dirs): the baseline lookup only
Reported as ratios measured in this one invocation.

    python bench/matrix_vs_separate.py [--set evaluation.limit=40 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/fp8.yaml", "recipes/int8_sq.yaml", "recipes/int4_awq.yaml"]


def run(recipes: list[str], cache: Path, work: Path, sets: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "QUANTGATE_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)
    all_sets = [*sets, f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "quantgate.cli", "run", *recipes, "--json", "--fresh"] + [x for s in all_sets for x in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    out = json.loads(proc.stdout)
    return wall, out


def warm_model(cache: Path) -> None:
    env = {**os.environ, "QUANTGATE_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", "from quantgate.models import resolve_model_dir; from quantgate.recipe import ModelSpec; resolve_model_dir(ModelSpec())"], env=env, check=True, capture_output=True, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qg-matrix-"))
    separate, stage_times = {}, {}
    for recipe in RECIPES:
        cache = work / f"cache-{Path(recipe).stem}"
        warm_model(cache)  # model conversion is not what is compared
        wall, out = run([recipe], cache, work / "sep", args.set)
        separate[recipe] = wall
        stage_times[recipe] = out["timings"]
    matrix_cache = work / "cache-matrix"
    warm_model(matrix_cache)
    matrix_wall, matrix_out = run(RECIPES, matrix_cache, work / "matrix", args.set)
    hit_wall, hit_out = run(RECIPES, matrix_cache, work / "matrix2", args.set)
    baseline_eval = {r: t.get("baseline_evaluate", 0.0) for r, t in stage_times.items()}
    result = {
        "settings": args.set,
        "separate_wall_s": {k: round(v, 1) for k, v in separate.items()},
        "separate_total_s": round(sum(separate.values()), 1),
        "matrix_wall_s": round(matrix_wall, 1),
        "ratio_matrix_over_separate": round(matrix_wall / sum(separate.values()), 3),
        "matrix_again_cache_hit_wall_s": round(hit_wall, 1),
        "cache_hit_lines": [r["baseline_cache"] for r in hit_out["recipes"]],
        "baseline_evaluate_s_per_separate_run": baseline_eval,
        "per_stage_s": {r["recipe"]: r["timings"] for r in matrix_out["recipes"]},
        "verdicts": {r["recipe"]: r["verdict"] if "verdict" in r else r["decision"] for r in matrix_out["recipes"]},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
