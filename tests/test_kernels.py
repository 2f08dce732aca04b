"""Real low-precision kernels vs the reference (fake-quant) path.

CPU tests (everywhere): the INT4 packing, the folding of SmoothQuant scales, and the kernels'
arithmetic spelled out in plain torch against the reference QuantLinear; the streaming loader.
CUDA tests (marked gpu): the real kernels against the reference path, per layer and per token.
"""

from __future__ import annotations

import pytest
import torch

from quantgate.artifacts import Checkpoint
from quantgate.engines import kernels as kern
from quantgate.engines.torch_engine import (
    QuantLinear,
    dequantize_weight,
    fp8_fake_quant,
    int8_fake_quant,
    load_exported_model,
    unpack_int4,
)
from tests.kernel_ckpt import activation_amax, quantize_linear, write_quantized

FORMATS = ["fp8", "int8_sq", "int4_awq"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _token_kl(ref_logits: torch.Tensor, got_logits: torch.Tensor) -> torch.Tensor:
    p, q = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(got_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).flatten()


def _reference_layer(fmt: str, t: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantLinear:
    algo = {"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ"}[fmt]
    w = dequantize_weight(t["weight"], t["weight_scale"], algo, 128).to(dtype)
    act = {"fp8": fp8_fake_quant, "int8_sq": int8_fake_quant}.get(fmt)
    s = t.get("input_scale")
    pqs = t.get("pre_quant_scale")
    return QuantLinear(w, None, pqs.to(dtype) if pqs is not None else None, act if s is not None else None,
                       s.float().to(dtype) if s is not None else None)


# ---- CPU: logic that runs everywhere ------------------------------------------------------------------


def test_pack_int4_is_inverse_of_unpack_and_matches_modelopt():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (10, 256), generator=g, dtype=torch.int8)
    packed = kern.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 256)
    assert torch.equal(unpack_int4(packed), q)
    modelopt_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    assert torch.equal(modelopt_utils.pack_int4_in_uint8(q.float(), torch.ones(10, 2), 128), packed)
    with pytest.raises(ValueError, match="even"):
        kern.pack_int4(q[:3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_arithmetic_matches_reference_layer(fmt):
    """The scale folding the kernels do (pre_quant_scale into the activation multiplier, scales
    applied after the integer/FP8 product) computes the reference layer's function."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(256, 384, generator=g) * 0.05
    x = torch.randn(64, 384, generator=g) * torch.linspace(0.2, 3.0, 384)
    t = quantize_linear(fmt, "model.layers.0.mlp.down_proj", w, x.abs().amax(0), torch.float32)
    ref = _reference_layer(fmt, t, torch.float32)(x)
    if fmt == "fp8":
        got = kern.fp8_reference_math(x, t["weight"], t["weight_scale"], t["input_scale"])
    elif fmt == "int8_sq":
        got = kern.int8_reference_math(x, t["weight"], t["pre_quant_scale"], t["input_scale"], t["weight_scale"])
    else:
        got = kern.int4_reference_math(x * t["pre_quant_scale"], t["weight"], t["weight_scale"])
    assert _rel(got, ref) < 1e-5, fmt
    assert _rel(got, x @ w.t()) < 0.2  # and it is a quantization of the real layer


def test_kernel_support_falls_back_off_gpu():
    ok, why = kern.kernel_support("FP8", "cpu")
    assert not ok and "CUDA" in why
    ok, why = kern.kernel_support("W4A8_AWQ", "cuda")
    assert not ok and "W4A8_AWQ" in why


def test_int4_tiles_never_straddle_an_awq_block():
    """A tile's BK columns must sit in one AWQ block (one scale per tile) and so never pass K.
    Offering BK=128 for 64-wide blocks gave NaN log-likelihoods for SmolLM2 (K=576) on the H200."""
    for group in (32, 64, 128, 256):
        offered = kern.w4a16_configs(group)
        assert offered and all(group % c["BK"] == 0 for c in offered), group
    assert 128 not in {c["BK"] for c in kern.w4a16_configs(64)}
    x, packed, scales = torch.zeros(4, 576), torch.zeros(64, 576, dtype=torch.uint8), torch.zeros(128, 9)
    with pytest.raises(ValueError, match="BK=128 does not divide the AWQ block 64"):
        kern.w4a16_matmul(x, packed, scales, config=kern.W4A16_CONFIGS[3])
    ok, why = kern.kernel_support("W4A16_AWQ", "cpu", 48)
    assert not ok


_INT4_INTERPRETED = """
import json, torch
from quantgate.engines import kernels as K
torch.manual_seed(0)
out = []
for m, k, n, g in [(8, 576, 192, 64), (5, 256, 128, 128), (20, 576, 128, 32)]:
    packed = K.pack_int4(torch.randint(-8, 8, (n, k)))
    scales = (torch.rand(n, k // g) * 0.02 + 0.001).half()
    x = torch.randn(m, k).half()
    ref = K.int4_reference_math(x, packed, scales)
    for c in K.w4a16_configs(g):
        got = K.w4a16_matmul(x, packed, scales, config=c).float()
        out.append([m, k, n, g, c["BK"], c["BM"], bool(torch.isfinite(got).all()), float((got - ref).norm() / ref.norm())])
print(json.dumps(out))
"""


def test_int4_kernel_matches_reference_under_triton_interpreter():
    """Every tile configuration the autotuner may pick, run by Triton's CPU interpreter on shapes
    whose K is not a multiple of 128 (SmolLM2's 576) and on 32-, 64- and 128-wide AWQ blocks."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (its interpreter runs the INT4 kernel on CPU): pip install triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INT4_INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert len(rows) >= 14
    for m, k, n, g, bk, bm, finite, rel in rows:
        assert finite and rel < 2e-3, (m, k, n, g, bk, bm, rel)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_loader_reads_synthetic_checkpoint_on_cpu(tiny_model_dir, tmp_path, fmt):
    """The meta-device + per-tensor loader builds the reference model; kernels=auto on CPU is the
    reference path (the CPU path is unchanged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("The for statement iterates over the items of any sequence. " * 4, return_tensors="pt").input_ids
    ckpt = write_quantized(model, tiny_model_dir, tmp_path / fmt, fmt, activation_amax(model, ids))
    got, stats = load_exported_model(ckpt, "cpu", torch.float32, kernels="auto")
    assert stats["kernels"] == "reference" and stats["quantized_layers"] == 14
    assert not any(p.is_meta for p in got.parameters())
    with torch.no_grad():
        kl = _token_kl(model(ids).logits, got(ids).logits)
    assert float(kl.mean()) < 0.05, fmt  # quantized, not broken
    assert stats["checkpoint_tensor_bytes"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_joined_fp8_projections_compute_the_separate_layers(tiny_model_dir, tmp_path, monkeypatch, dtype):
    """q/k/v and gate/up joined (one quantization, one row-wise-scaled GEMM in bf16, shared input
    in fp16; SiLU-and-multiply fused into down_proj's quantization) give the separate FP8 layers'
    logits, and hold no activation between calls. torch's _scaled_mm runs on CPU too, so the
    kernel path is exercised here with eager quantizers (compiled ones are the CUDA tests')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("The for statement iterates over the items of any sequence. " * 4, return_tensors="pt").input_ids
    ckpt = write_quantized(model, tiny_model_dir, tmp_path / "fp8", "fp8", activation_amax(model, ids))
    eager = {"fp8_quant": kern._fp8_quant, "fp8_silu_mul_quant": kern._fp8_silu_mul_quant}
    monkeypatch.setattr(kern, "_compiled", lambda name: eager[name])
    monkeypatch.setattr(kern, "kernel_support", lambda *a, **k: (True, ""))
    real_join, joining = kern.join_fp8_projections, {"on": False}
    monkeypatch.setattr(kern, "join_fp8_projections", lambda m: real_join(m) if joining["on"] else {})
    logits, stats = {}, {}
    for join in (False, True):
        joining["on"] = join
        got, stats[join] = load_exported_model(ckpt, "cpu", dtype, kernels="auto")
        with torch.inference_mode():
            logits[join] = got(ids).logits.float()
            if join:
                # 12 tokens, then 7: a new input starts a new round; nothing stays referenced after one
                a, b = got(ids[:, :12]).logits.float(), got(ids[:, :7]).logits.float()
                assert torch.allclose(a[:, :7], b, atol=5e-2)
                rounds = [m._round for m in got.modules() if isinstance(m, kern.JoinedProjections)]
                assert rounds and all(r is None for r in rounds)
    assert stats[True]["joined_groups"] == 4 and stats[True]["fused_mlps"] == 2  # 2 layers x (q/k/v, gate/up)
    layer0 = got.model.layers[0]
    extra = stats[True]["resident_tensor_bytes"] - stats[False]["resident_tensor_bytes"]
    if dtype == torch.bfloat16:  # + one fp32 weight scale per output column instead of one per layer
        widths = 2 * (layer0.self_attn.q_k_v_joined.layer.out_features + layer0.mlp.gate_up.out_features)
        assert 0 < extra <= 4 * widths
        assert layer0.mlp.gate_up.weight_scale.shape == (1, 2 * model.config.intermediate_size)
    else:
        assert extra == 0 and isinstance(layer0.mlp.gate_up, kern.Fp8SharedInput)
    assert isinstance(layer0.self_attn.k_proj, kern.ProjectionOf)
    kl = _token_kl(logits[False], logits[True])
    assert torch.isfinite(logits[True]).all() and float(kl.max()) < 1e-4, float(kl.max())


# ---- CUDA: the real kernels -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_layer_matches_reference_layer_on_cuda(fmt):
    torch.manual_seed(3)
    dtype = torch.bfloat16
    for out_f, in_f in ((512, 384), (1024, 256)):
        w = (torch.randn(out_f, in_f, device="cuda") * 0.05).to(dtype)
        for m in (1, 7, 33, 300):  # 300 > INT4_FUSED_MAX_TOKENS: the dequantize + cuBLAS path
            x = (torch.randn(m, in_f, device="cuda") * torch.linspace(0.2, 3.0, in_f, device="cuda")).to(dtype)
            t = quantize_linear(fmt, "x.down_proj", w, x.float().abs().amax(0), dtype)
            ref = _reference_layer(fmt, t, dtype)(x)
            layer = kern.make_kernel_linear({"fp8": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ"}[fmt],
                                            t["weight"], t["weight_scale"], t.get("input_scale"), t.get("pre_quant_scale"), None, dtype)
            got = layer(x)
            assert got.shape == ref.shape and torch.isfinite(got).all()
            # Same activation codes; left: weight rounding to 16 bits in the reference, summation order.
            assert _rel(got, ref) < 5e-3, (fmt, out_f, in_f, m, _rel(got, ref))
            assert layer.weight.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8)  # stays quantized


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,dtype", [*((f, "bfloat16") for f in FORMATS), ("fp8", "float16")])
def test_kernels_match_reference_path_per_token_kl(tiny_model_dir, tmp_path, fmt, dtype):
    """Same checkpoint, both paths on CUDA: per-token KL(reference || kernels) <= 1e-3. FP8 in
    bf16 joins q/k/v and gate/up with row-wise scales; in fp16 they share one quantized input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.recipe import EngineSpec

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The for statement iterates over the items of any sequence, in the order that they appear. " * 3
    ids = tok([text, "A class definition defines a class object. " * 6], return_tensors="pt", padding=True).input_ids
    ckpt_dir = write_quantized(model, tiny_model_dir, tmp_path / fmt, fmt, activation_amax(model, ids))
    ckpt = Checkpoint(path=str(ckpt_dir), format=fmt, quant_algo=None, dtype=dtype, size_bytes=0)
    logits = {}
    for mode in ("reference", "auto"):
        engine = TorchEngine.load(ckpt, EngineSpec(device="cuda", kernels=mode, max_seq_len=512, max_input_len=256))
        assert engine.settings["kernels"] == ("real" if mode == "auto" else "reference")
        if mode == "auto" and fmt == "fp8":
            assert engine.settings["joined_groups"] == 4 and engine.settings["fused_mlps"] == 2
        with torch.inference_mode():
            logits[mode] = engine.model(input_ids=ids.cuda()).logits.float().cpu()
        assert engine.one_time_costs()["warmup_s"] >= 0
        engine.close()
    kl = _token_kl(logits["reference"], logits["auto"])
    print(f"{fmt}: per-token KL(reference || kernels) mean {kl.mean():.2e} max {kl.max():.2e}")
    assert float(kl.max()) <= 1e-3


# ---- memory plan (item 5) and the frame leak that kept the exported model (item 2) ---------------------

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
H200_BYTES = 143771 * 2**20


def _plan(cfg, algo, bits, kernels="auto", gpu=H200_BYTES):
    from quantgate.memory_plan import plan_memory

    return plan_memory(cfg, quant_algo=algo, weight_bits=bits, gpu_bytes=gpu, max_batch_size=8, max_seq_len=2304,
                       calib_batch_size=8, calib_seq_len=256, kernels=kernels, uses_awq=algo == "W4A16_AWQ")


def test_memory_plan_8b_fits_one_h200_and_quantized_evaluate_is_smaller():
    fp8, ref = _plan(LLAMA_8B, "FP8", 8), _plan(LLAMA_8B, "FP8", 8, kernels="reference")
    assert fp8.refusal is None
    by = {s.stage: s for s in fp8.stages}
    assert by["baseline_export"].gpu_bytes == 0 and by["baseline_export"].host_bytes > 14 * 2**30
    assert by["evaluate"].gpu_bytes < {s.stage: s for s in ref.stages}["evaluate"].gpu_bytes - 6 * 2**30
    assert _plan(LLAMA_8B, "FP8", 8, gpu=16 * 2**30).refusal.startswith("baseline_evaluate needs")


def test_memory_plan_70b_refuses_in_one_line_but_fp8_candidate_fits():
    plan = _plan(LLAMA_70B, "FP8", 8)
    by = {s.stage: s for s in plan.stages}
    assert not by["baseline_evaluate"].fits and not by["calibrate"].fits
    assert by["evaluate"].fits and 60 * 2**30 < by["evaluate"].gpu_bytes < 90 * 2**30  # FP8 stays FP8
    assert not {s.stage: s for s in _plan(LLAMA_70B, "FP8", 8, kernels="reference").stages}["evaluate"].fits
    line = plan.refusal
    assert line is not None and "\n" not in line and "baseline_evaluate" in line and "tensor_parallel_size" in line


LEAK_SCRIPT = """
import gc, sys, weakref
from pathlib import Path
import torch
if sys.argv[2] == "clean":
    from quantgate.leaks import import_clean
    import_clean("modelopt.torch.quantization")
from quantgate.calibrate import calibrate
from quantgate.data import CalibrationBatches
from quantgate.export import export_checkpoint
from quantgate.formats import get_format
from quantgate.models import load_model
from quantgate.recipe import Recipe
recipe = Recipe.model_validate({"name": "x", "quantization": {"format": "fp8"},
                                "calibration": {"num_samples": 2, "seq_len": 32, "batch_size": 2}})
model, tok = load_model(Path(sys.argv[1]), recipe.model, dtype=torch.float32, device="cpu")
calibrate(model, tok, recipe, get_format("fp8"), "cpu", data=CalibrationBatches([torch.randint(0, 500, (2, 32))], "x", 64))
ref = weakref.ref(model)
export_checkpoint(model, tok, get_format("fp8"), "float16", Path(sys.argv[3]))
del model
gc.collect()
print("MODEL_ALIVE" if ref() is not None else "MODEL_FREED")
"""


@pytest.mark.slow
@pytest.mark.parametrize("clean", [True, False])
def test_first_modelopt_import_pins_the_calibrated_model_unless_scrubbed(tiny_model_dir, tmp_path, clean):
    """PuLP (imported by ModelOpt) stores import errors in class bodies; their tracebacks keep the
    importing call stack alive through f_back. Imported first inside calibrate(), that pins the
    model for the life of the process. The plain case documents the cause: if it ever reports
    MODEL_FREED, PuLP stopped doing it and quantgate.leaks is no longer needed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("modelopt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", LEAK_SCRIPT, str(tiny_model_dir), "clean" if clean else "plain", str(tmp_path / "ck")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ("MODEL_FREED" if clean else "MODEL_ALIVE") in out.stdout, out.stderr[-2000:]
