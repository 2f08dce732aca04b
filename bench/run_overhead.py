"""quantgate's overhead: `quantgate run` wall time vs the library work it wraps, in one invocation.

Library work = ModelOpt calibration (mtq.quantize incl. its forward passes) + checkpoint exports
(baseline and candidate) + evaluation (lm-eval scoring and golden generation, both sides), each
as timed inside the run. Everything else (model loading, data prep, MLflow logging and artifact
copies, registry) is quantgate's overhead. Also times `quantgate --help` and `quantgate validate`
(lazy imports). A cold cache directory is used so the baseline is evaluated too; the GGUF
conversion is done first, outside the timed run.

    python bench/run_overhead.py [--recipe recipes/fp8.yaml] [--set evaluation.limit=60 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0, proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/fp8.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qg-bench-"))
    env = {**os.environ, "QUANTGATE_CACHE": str(work / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    qg = [sys.executable, "-m", "quantgate.cli"]

    startup = {}
    for name, cmd in {"help": [*qg, "--help"], "validate": [*qg, "validate", args.recipe]}.items():
        startup[name] = statistics.median(timed(cmd, env)[0] for _ in range(5))

    # Warm the model conversion (GGUF -> HF) outside the measurement.
    subprocess.run([sys.executable, "-c", "from quantgate.models import resolve_model_dir; from quantgate.recipe import load_recipe; "
                    f"resolve_model_dir(load_recipe('{args.recipe}').model)"], env=env, cwd=ROOT, check=True, capture_output=True)

    sets = [*args.set, f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    cmd = [*qg, "run", args.recipe, "--json", "--fresh"] + [x for s in sets for x in ("--set", s)]
    wall, proc = timed(cmd, env)
    out = json.loads(proc.stdout)
    run_dir = Path(out["run_dir"])
    calib = json.loads((run_dir / "calibration.json").read_text()) if (run_dir / "calibration.json").is_file() else {"seconds": 0}
    ckpt = json.loads((run_dir / "checkpoint.json").read_text()) if (run_dir / "checkpoint.json").is_file() else {"export_seconds": 0}
    base_ckpt = next((work / "cache" / "baseline_checkpoints").glob("*.json"))
    base_export = json.loads(base_ckpt.read_text())["export_seconds"]
    evals = {side: json.loads((run_dir / f"{side}_results.json").read_text()).get("timings", {}) for side in ("baseline", "candidate")}
    eval_seconds = {side: t.get("total", sum(v for k, v in t.items() if k != "total")) for side, t in evals.items()}
    library = calib["seconds"] + ckpt["export_seconds"] + base_export + sum(eval_seconds.values())
    result = {
        "recipe": args.recipe, "settings": args.set, "verdict": out["verdict"], "wall_s": round(wall, 2),
        "library_s": round(library, 2), "ratio_wall_over_library": round(wall / library, 3),
        "parts": {"calibrate": calib["seconds"], "export": ckpt["export_seconds"], "baseline_export": base_export, **{f"evaluate_{k}": v for k, v in eval_seconds.items()}},
        "stage_timings": out["timings"], "startup_median_s": {k: round(v, 3) for k, v in startup.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
