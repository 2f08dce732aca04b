"""Recipes: shared defaults, overrides, and one-line errors (exit 2) for every kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.errors import RecipeError
from quantgate.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("name,fmt", [("fp16", "fp16"), ("fp8", "fp8"), ("int8_sq", "int8_sq"), ("int4_awq", "int4_awq")])
def test_shipped_recipes_load_with_shared_defaults(name, fmt):
    r = load_recipe(RECIPES / f"{name}.yaml")
    assert r.name == name and r.quantization.format == fmt
    assert r.model.source == "bundled:SmolLM2-135M-Instruct"  # from _base.yaml
    assert r.calibration.num_samples == 64
    assert r.gate.metrics, "shipped recipes must gate on metrics"


def test_set_overrides_are_validated_like_the_file():
    r = load_recipe(RECIPES / "fp8.yaml", ["calibration.num_samples=16", "engine.backend=torch"])
    assert r.calibration.num_samples == 16
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "fp8.yaml", ["calibration.num_samples=-1"])
    assert "calibration.num_samples" in str(err.value)


def test_hash_changes_with_content():
    a = load_recipe(RECIPES / "fp8.yaml")
    b = load_recipe(RECIPES / "fp8.yaml", ["calibration.seed=1"])
    assert a.content_hash() != b.content_hash()
    assert a.content_hash() == load_recipe(RECIPES / "fp8.yaml").content_hash()


BAD = {
    "empty": ("", "", "empty"),
    "syntax": ("name: x\nquantization: [\n", "", "YAML syntax error at line"),
    "list": ("- a\n- b\n", "", "mapping at the top level"),
    "unknown_key": ("name: x\nquantization: {format: fp8}\ncalibration: {num_sample: 3}\n", "calibration.num_sample", "unknown key"),
    "wrong_type": ("name: x\nquantization: {format: fp8}\nengine: {max_batch_size: lots}\n", "engine.max_batch_size", "integer"),
    "negative": ("name: x\nquantization: {format: fp8}\ncalibration: {num_samples: -4}\n", "calibration.num_samples", "greater than 0"),
    "unknown_format": ("name: x\nquantization: {format: fp9}\n", "quantization.format", "did you mean 'fp8'"),
    "missing_path": ("name: x\nquantization: {format: fp8}\nmodel: {source: ./no/such/model}\n", "model.source", "does not exist"),
    "hub_offline": ("name: x\nquantization: {format: fp8}\nmodel: {source: nobody-here/no-such-model}\n", "model.source", "unreachable"),
    "unknown_backend": ("name: x\nquantization: {format: fp8}\nengine: {backend: tensorrt}\n", "engine.backend", "did you mean"),
    "awq_on_fp8": ("name: x\nquantization: {format: fp8, awq_block_size: 64}\n", "quantization.awq_block_size", "only for AWQ"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_raise_one_precise_error(tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text, key, fragment = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg
    if key:
        assert err.value.key == key


def test_cli_bad_recipe_exit_2_one_line_no_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nquantization: {format: fp8}\ncalibration: {num_samples: -4}\n")
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "calibration.num_samples" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_show_prints_resolved_yaml_and_env_uri_overrides(monkeypatch):
    import yaml

    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"}
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "show", str(RECIPES / "int4_awq.yaml"), "--set", "calibration.seq_len=128"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["quantization"]["awq_block_size"] == 64
    assert data["calibration"]["seq_len"] == 128
    assert data["tracking"]["uri"] == "http://127.0.0.1:5999"


def test_cli_help_and_validate_do_not_import_heavy_libraries():
    code = (
        "import sys\nfrom quantgate.cli import main\n"
        f"rc = main(['validate', r'{RECIPES / 'fp8.yaml'}'])\n"
        "heavy = [m for m in ('torch', 'modelopt', 'lm_eval', 'mlflow', 'tensorrt_llm', 'transformers') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr


def test_cache_prepare_needs_recipes_and_converts_their_models(tmp_path, tiny_model_dir, capsys):
    from quantgate.cli import main

    assert main(["cache", "prepare"]) == 2
    assert "name the recipes" in capsys.readouterr().err
    (tmp_path / "_base.yaml").write_text((RECIPES / "_base.yaml").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text((RECIPES / "fp8.yaml").read_text() + f"model:\n  source: {tiny_model_dir}\n")
    assert main(["cache", "prepare", str(recipe)]) == 0
    assert str(tiny_model_dir) in capsys.readouterr().out
