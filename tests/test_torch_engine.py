"""The torch backend reproduces exported ModelOpt checkpoints; transformers' naive load does not."""

from __future__ import annotations

import copy

import pytest
import torch

from quantgate.artifacts import Checkpoint
from quantgate.engines.base import EngineLimits, ScoreRequest
from quantgate.engines.torch_engine import TorchEngine, load_exported_model, unpack_int4
from quantgate.export import cast_weights_keep_quantizers, export_checkpoint
from quantgate.formats import get_format


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _quantize(model_dir, cfg_name):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = "The for statement iterates over the items of any sequence, in order. " * 6
    ids = tok(text, return_tensors="pt").input_ids[:, :96]
    mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), lambda m: m(ids))
    # Compare against what is shipped: weights rounded to the export dtype, quantizers fp32.
    cast_weights_keep_quantizers(model, torch.float16)
    cast_weights_keep_quantizers(model, torch.float32)
    with torch.no_grad():
        ref = model(ids).logits
    return model, tok, ids, ref


def test_unpack_int4_inverts_modelopt_packing():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-8, 8, (6, 256), generator=g).float()
    scale = torch.ones(6, 2)
    packed = pack_int4_in_uint8(w, scale, 128)
    assert packed.shape == (3, 256) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed).float(), w)


@pytest.mark.parametrize("fmt,cfg,limit", [("fp8", "FP8_DEFAULT_CFG", 1e-4), ("int8_sq", "INT8_SMOOTHQUANT_CFG", 1e-4), ("int4_awq", "INT4_AWQ_CFG", 5e-3)])
def test_backend_matches_in_memory_modelopt_model(tiny_model_dir, tmp_path, fmt, cfg, limit):
    from transformers import AutoModelForCausalLM

    model, tok, ids, ref = _quantize(tiny_model_dir, cfg)
    ckpt = export_checkpoint(model, tok, get_format(fmt), "float16", tmp_path / fmt)
    exported, stats = load_exported_model(ckpt.dir, "cpu", torch.float32)
    assert stats["quantized_layers"] == 14  # 7 linears x 2 layers
    with torch.no_grad():
        got = exported(ids).logits
    kl = _kl(ref, got)
    print(f"{fmt}: KL(in-memory || torch backend) = {kl:.2e}")
    assert kl < limit
    # transformers does not know quant_method "modelopt": raw codes without scales, or a crash.
    try:
        naive = AutoModelForCausalLM.from_pretrained(ckpt.dir, dtype=torch.float32)
        with torch.no_grad():
            naive_kl = _kl(ref, naive(ids).logits)
    except Exception:
        naive_kl = float("inf")
    print(f"{fmt}: KL(in-memory || naive transformers load) = {naive_kl:.2e}")
    assert naive_kl > 100 * max(kl, 1e-6)


def test_engine_scores_and_generates_like_hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ckpt = Checkpoint(path=str(tiny_model_dir), format="fp16", quant_algo=None, dtype="float16", size_bytes=0)
    from quantgate.recipe import EngineSpec

    engine = TorchEngine.load(ckpt, EngineSpec(device="cpu", max_batch_size=2, max_input_len=256, max_seq_len=320))
    seqs = [tok(t).input_ids for t in ("The if statement is used for", "A class definition defines a class object and more", "x")]
    reqs = [ScoreRequest(s, 1) for s in seqs]
    got = engine.score(reqs, top_k=4)
    for req, res in zip(reqs, got, strict=True):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([req.token_ids])).logits[0].float(), -1)
        want = [lp[t - 1, req.token_ids[t]].item() for t in range(1, len(req.token_ids))]
        assert res.logprobs == pytest.approx(want, abs=1e-4)
        assert res.top_ids is not None and len(res.top_ids) == len(want)
        assert all(ids[0] == int(lp[t].argmax()) for t, ids in enumerate(res.top_ids))
    prompt = seqs[0]
    gen = engine.generate([prompt, seqs[1]], max_new_tokens=8)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ref_new = ref[0, len(prompt):].tolist()
    eos = tok.eos_token_id
    ref_new = ref_new[: ref_new.index(eos)] if eos in ref_new else ref_new
    assert gen[0].token_ids == ref_new
    with pytest.raises(Exception, match="max_input_len"):
        engine.generate([[1] * 300], max_new_tokens=2)


def test_quantized_kv_cache_is_refused_not_ignored(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    (d / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"}}))
    with pytest.raises(Exception, match="KV cache"):
        load_exported_model(d, "cpu", torch.float32)
    assert EngineLimits().max_batch_size == 8


def test_fp8_fake_quant_table_lookup_equals_the_cast():
    """On CPU the E4M3 values are read from a 256-entry table (faster than torch's cast): the
    same numbers for every code, ties, subnormals and the clamp at +-448."""
    from quantgate.engines.torch_engine import fp8_fake_quant

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200_000, generator=g) * 100, torch.randn(200_000, generator=g) * 0.01,
                   torch.linspace(-470, 470, 100_000), torch.tensor([0.0, -0.0, 2**-9, 2**-10, 3 * 2**-11, 448.0, 464.0, -500.0])])
    for scale in (torch.tensor(1.0), torch.tensor(0.0173)):
        want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale
        got = fp8_fake_quant(x.reshape(-1, 8), scale).reshape(-1)
        assert torch.equal(got, want)


def test_projections_of_one_input_share_its_fp8_quantization(tiny_model_dir, tmp_path):
    """q/k/v and gate/up quantize their common input once (same values as each alone)."""
    from quantgate.engines import torch_engine as te

    model, tok, ids, _ref = _quantize(tiny_model_dir, "FP8_DEFAULT_CFG")
    ckpt = export_checkpoint(model, tok, get_format("fp8"), "float16", tmp_path / "fp8")
    shared, stats = load_exported_model(ckpt.dir, "cpu", torch.float32)
    assert stats["shared_act_quant_groups"] == 4  # (q/k/v, gate/up) x 2 layers
    alone, _ = load_exported_model(ckpt.dir, "cpu", torch.float32)
    for m in alone.modules():
        if isinstance(m, te.QuantLinear):
            m.shared = None
    calls = {"n": 0}
    fq = te.fp8_fake_quant

    def counting(x, scale):
        calls["n"] += 1
        return fq(x, scale)

    for m in [*shared.modules(), *alone.modules()]:
        if isinstance(m, te.QuantLinear) and m.act_quant is not None:
            m.act_quant = counting
    counts = []
    with torch.inference_mode():
        for mdl in (alone, shared):
            calls["n"] = 0
            out = mdl(ids).logits
            counts.append(calls["n"])
            if mdl is alone:
                want = out
    assert torch.equal(out, want)
    assert counts == [14, 8]  # 7 per layer alone; 4 per layer shared
