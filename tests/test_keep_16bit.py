"""`quantization.keep_16bit`: named layers stay unquantized through calibration, export and the
torch engine; a pattern that names nothing is one line, before any calibration."""

from __future__ import annotations

import pytest
import torch

from quantgate.errors import PreflightError
from quantgate.formats import get_format
from quantgate.recipe import QuantizationSpec


def _model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_aliases_resolve_to_the_first_and_last_decoder_layer(tiny_model_dir):
    from quantgate.calibrate import resolve_keep_16bit

    model, _ = _model(tiny_model_dir)
    n = model.config.num_hidden_layers
    assert resolve_keep_16bit(model, ["first_block", "last_block", "*.mlp.down_proj"]) == [
        "model.layers.0", f"model.layers.{n - 1}", "*.mlp.down_proj"]
    with pytest.raises(PreflightError, match=r"'model\.layer\.0' matches no Linear layer .* fix the pattern"):
        resolve_keep_16bit(model, ["model.layer.0"])


def test_recipe_refuses_keep_16bit_on_the_16bit_format(tmp_path, tiny_model_dir):
    from quantgate.errors import RecipeError
    from quantgate.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\nmodel: {{source: {tiny_model_dir}}}\nquantization: {{format: fp16, keep_16bit: [first_block]}}\n")
    with pytest.raises(RecipeError, match="keep_16bit"):
        load_recipe(path)
    path.write_text(f"name: x\nmodel: {{source: {tiny_model_dir}}}\nquantization: {{format: fp8, keep_16bit: [first_block]}}\n")
    assert load_recipe(path).quantization.keep_16bit == ["first_block"]


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_kept_layers_are_exported_16bit_and_served_as_calibrated(tiny_model_dir, tmp_path, fmt):
    import modelopt.torch.quantization as mtq
    from safetensors import safe_open

    from quantgate.calibrate import resolve_keep_16bit
    from quantgate.engines.torch_engine import load_exported_model
    from quantgate.export import cast_weights_keep_quantizers, export_checkpoint

    model, tok = _model(tiny_model_dir)
    spec = QuantizationSpec(format=fmt, keep_16bit=["first_block"], awq_block_size=32 if fmt == "int4_awq" else None)
    keep = resolve_keep_16bit(model, spec.keep_16bit)
    ids = tok("The for statement iterates over the items of any sequence, in order. " * 6, return_tensors="pt").input_ids[:, :96]
    mtq.quantize(model, get_format(fmt).build_modelopt_config(spec, keep), lambda m: m(ids))
    enabled = {n.rsplit(".", 1)[0] for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.is_enabled}
    assert enabled and not any(n.startswith("model.layers.0.") for n in enabled)
    assert any(n.startswith("model.layers.1.") for n in enabled)
    cast_weights_keep_quantizers(model, torch.float16)
    cast_weights_keep_quantizers(model, torch.float32)
    with torch.no_grad():
        ref = model(ids).logits
    ckpt = export_checkpoint(model, tok, get_format(fmt), "float16", tmp_path / fmt)
    keys = {}
    for f in ckpt.dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            keys |= {k: fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118
    assert keys["model.layers.0.self_attn.q_proj.weight"] == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in keys
    assert "model.layers.1.self_attn.q_proj.weight_scale" in keys
    import json

    # TensorRT-LLM's loader reads the exclusions from here
    assert "model.layers.0*" in json.loads((ckpt.dir / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    served, _ = load_exported_model(ckpt.dir, "cpu", torch.float32)
    with torch.no_grad():
        got = served(ids).logits
    p, q = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    assert float((p.exp() * (p - q)).sum(-1).mean()) < 1e-3
