"""Format `auto_quantize`: ModelOpt's per-layer format search under an effective-bits budget,
exported as MIXED_PRECISION and served layer by layer by the torch engine; bad settings are one
line before any model work."""

from __future__ import annotations

import json

import pytest
import torch

from quantgate.errors import RecipeError
from quantgate.recipe import recipe_from_data


def _recipe(model_dir, **quantization):
    q = {"format": "auto_quantize", "auto_quantize": {"effective_bits": 7.0, "formats": ["fp8", "int4_awq"]}, "awq_block_size": 32, **quantization}
    return recipe_from_data({"name": "aq", "model": {"source": str(model_dir)}, "quantization": q,
                             "calibration": {"num_samples": 8, "seq_len": 64, "batch_size": 4}}, "test")


def test_recipe_needs_a_budget_and_mixable_formats(tiny_model_dir):
    with pytest.raises(RecipeError, match="needs quantization.auto_quantize.effective_bits"):
        _recipe(tiny_model_dir, auto_quantize=None)
    with pytest.raises(RecipeError, match="int8_sq' cannot be mixed"):
        _recipe(tiny_model_dir, auto_quantize={"effective_bits": 6.0, "formats": ["fp8", "int8_sq"]})
    with pytest.raises(RecipeError, match="only for format auto_quantize"):
        _recipe(tiny_model_dir, format="fp8", awq_block_size=None)
    assert _recipe(tiny_model_dir).quantization.auto_quantize.effective_bits == 7.0


def test_auto_quantize_mixes_formats_and_the_engine_serves_them_as_calibrated(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.calibrate import calibrate
    from quantgate.engines.torch_engine import load_exported_model
    from quantgate.export import cast_weights_keep_quantizers, export_checkpoint
    from quantgate.formats import get_format

    recipe = _recipe(tiny_model_dir)
    fmt = get_format("auto_quantize")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    info = calibrate(model, tok, recipe, fmt, "cpu")
    chosen = info.auto_quantize["groups_per_choice"]
    assert set(chosen) <= {"fp8", "int4_awq", "16-bit"} and chosen.get("int4_awq") and info.auto_quantize["effective_bits_budget"] == 7.0
    assert info.auto_quantize["achieved"]["effective_bits"] <= 7.0
    ids = tok("The for statement iterates over the items of any sequence, in order. " * 6, return_tensors="pt").input_ids[:, :96]
    cast_weights_keep_quantizers(model, torch.float16)
    cast_weights_keep_quantizers(model, torch.float32)
    with torch.no_grad():
        ref = model(ids).logits
    ckpt = export_checkpoint(model, tok, fmt, "float16", tmp_path / "aq", fmt.export_algos(recipe.quantization))
    q = json.loads((ckpt.dir / "hf_quant_config.json").read_text())["quantization"]
    assert ckpt.quant_algo == q["quant_algo"] in fmt.export_algos(recipe.quantization)
    served, stats = load_exported_model(ckpt.dir, "cpu", torch.float32)
    if q["quant_algo"] == "MIXED_PRECISION":
        assert set(stats["layer_formats"]) <= {"FP8", "W4A16_AWQ"} and sum(stats["layer_formats"].values()) == stats["quantized_layers"]
    with torch.no_grad():
        got = served(ids).logits
    p, r = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    assert float((p.exp() * (p - r)).sum(-1).mean()) < 1e-3


def test_an_infeasible_budget_is_one_line(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.calibrate import calibrate
    from quantgate.errors import PreflightError
    from quantgate.formats import get_format

    recipe = _recipe(tiny_model_dir, auto_quantize={"effective_bits": 4.5, "formats": ["fp8", "int4_awq"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with pytest.raises(PreflightError, match=r"effective_bits: ModelOpt: .*infeasible.* Raise the budget") as err:
        calibrate(model, AutoTokenizer.from_pretrained(tiny_model_dir), recipe, get_format("auto_quantize"), "cpu")
    assert "\n" not in str(err.value)
