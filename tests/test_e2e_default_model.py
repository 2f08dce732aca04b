"""Each shipped recipe end to end on the real default model (SmolLM2-135M), with small limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "calibration.num_samples=8", "calibration.seq_len=128", "calibration.batch_size=4",
    "evaluation.limit=16", "evaluation.golden.max_new_tokens=8",
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp16", "fp8", "int8_sq", "int4_awq"])
def test_recipe_end_to_end_on_default_model(tmp_path_factory, recipe):
    work = tmp_path_factory.getbasetemp() / "e2e"
    work.mkdir(exist_ok=True)
    sets = [*SMALL, f"output_dir={work / 'runs'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    args = [sys.executable, "-m", "quantgate.cli", "run", str(ROOT / "recipes" / f"{recipe}.yaml"), "--json"]
    for s in sets:
        args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1500, env=env)
    out = json.loads(proc.stdout)
    # The gate decided (PASS, REGRESSION, INCONCLUSIVE or ANOMALOUS): nothing errored.
    assert out["exit_code"] in (0, 1, 4, 5), proc.stderr[-3000:]
    assert proc.returncode == out["exit_code"]
    if recipe == "fp16":  # the candidate is the baseline artifact: nothing is compared
        assert out["verdict"] == "PASS" and "baseline artifact" in out["reason"]
    else:
        assert {c["task"] for c in out["checks"] if c.get("task")} >= {"qg_ppl", "qg_cloze", "qg_nextsent"}
    assert out["checkpoint_bytes"] > 0 and out["registered_version"]
    print(recipe, out["verdict"], {k: round(v, 4) for k, v in out["deltas"].items()}, out["timings"])
    if recipe == "int4_awq":
        fp16 = 2 * 134.5e6  # 16-bit weights of the 134.5M-parameter model
        assert out["checkpoint_bytes"] < 0.6 * fp16
