"""Wall time of one `quantgate search --full` against the same candidates run as separate
`quantgate run` processes, one after another (how a team does it without the search).

Both sides start from a cold baseline (the baseline cache and its export are cleared; the
converted model is kept, so neither pays the one-time GGUF conversion), write fresh run
directories and track to their own sqlite MLflow store. The separate runs take each candidate's
overrides from the search's own `search.json`, so both sides run exactly the same recipes; the
separate side judges every candidate on all items (no split), which is what a team reads today.

    python bench/search_vs_separate.py searches/cpu_quick.yaml [--set evaluation.limit=10 ...] \
        [--out bench/results/cpu_search_vs_separate.json]
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


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "QUANTGATE_CACHE": str(cache)}
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    return env


def _cold(cache: Path) -> None:
    for sub in ("baselines", "baseline_checkpoints"):
        shutil.rmtree(cache / sub, ignore_errors=True)


def _sets(sets: list[str], work: Path) -> list[str]:
    all_sets = [*sets, f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    return [x for s in all_sets for x in ("--set", s)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--base-recipe", default="recipes/fp8.yaml", help="recipe the separate runs start from (overrides set the format)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/results/cpu_search_vs_separate.json")
    ap.add_argument("--search-only", action="store_true", help="measure the search side alone (e.g. a repeat)")
    args = ap.parse_args()
    cache = Path(os.environ.get("QUANTGATE_CACHE", Path.home() / ".cache" / "quantgate"))
    result: dict = {"spec": args.spec, "sets": args.set, "machine": f"{os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="qg-bench-search-") as tmp:
        work = Path(tmp)
        _cold(cache)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "quantgate.cli", "search", args.spec, "--full", "--json", "--fresh", *_sets(args.set, work / "search")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(cache), cwd=ROOT)
        search_wall = time.perf_counter() - t0
        if proc.returncode not in (0, 1, 4, 5):
            print(proc.stderr[-3000:], file=sys.stderr)
            return 3
        summary = json.loads(proc.stdout)
        result["search"] = {"wall_s": round(search_wall, 1), "exit_code": proc.returncode, "decision": summary["decision"],
                            "candidates": {r["name"]: {"decision": r["decision"], "seconds": r["seconds"]} for r in summary["rows"]}}
        print(f"search --full: {search_wall:.1f} s, exit {proc.returncode}", flush=True)

        if args.search_only:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            return 0
        _cold(cache)
        separate: dict[str, dict] = {}
        t0 = time.perf_counter()
        for row in summary["rows"]:
            over = [x for o in row["overrides"] for x in ("--set", o)]
            cmd = [sys.executable, "-m", "quantgate.cli", "run", args.base_recipe, "--json", "--fresh", *over,
                   "--set", "promotion.enabled=false", *_sets(args.set, work / "separate")]
            t1 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=_env(cache), cwd=ROOT)
            decision = json.loads(p.stdout)["decision"] if p.stdout.strip().startswith("{") else f"exit {p.returncode}"
            separate[row["name"]] = {"wall_s": round(time.perf_counter() - t1, 1), "exit_code": p.returncode, "decision": decision}
            print(f"  {row['name']}: {separate[row['name']]}", flush=True)
        sep_wall = time.perf_counter() - t0
        result["separate"] = {"wall_s": round(sep_wall, 1), "candidates": separate}
        result["ratio_search_over_separate"] = round(search_wall / sep_wall, 3)
        print(f"separate runs: {sep_wall:.1f} s; search/separate = {search_wall / sep_wall:.3f}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
