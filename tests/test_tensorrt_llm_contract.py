"""The tensorrt-llm backend at its API boundary, against a stand-in `tensorrt_llm` package.

TensorRT-LLM cannot be installed here, so the stand-in mirrors the real classes and behaviour read
from NVIDIA/TensorRT-LLM's source (see quantgate/engines/tensorrt_llm.py): `LLM(**TorchLlmArgs)`
rejecting unknown arguments, `generate(inputs, sampling_params, use_tqdm)`, `RequestOutput.outputs[0]`
(`CompletionOutput`) with `prompt_logprobs: list[dict[int, Logprob(logprob, rank)]]` where entry i
comes from context-logits row i (it predicts prompt[i + 1]), and `RequestOutput.context_logits`.
The prompt logprobs are built the way `executor/base_worker.py::_compute_pytorch_prompt_logprobs`
builds them, from a deterministic fake model, so the scores can be checked against a reference.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from quantgate.artifacts import Checkpoint
from quantgate.engines import tensorrt_llm as trt
from quantgate.engines import trtllm_legacy as legacy
from quantgate.engines.base import ScoreRequest
from quantgate.errors import StageError
from quantgate.formats import get_format
from quantgate.recipe import EngineSpec

V = 32
ALPHABET = "abcdefghijklmnopqrstuvwxyz .\n!"  # ids 2..31; 0 = eos, 1 = pad


class FakeTokenizer:
    eos_token_id = 0
    pad_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ALPHABET.index(c) + 2 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i - 2] if i >= 2 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


TOK = FakeTokenizer()


def fake_logits(prefix: list[int]) -> torch.Tensor:
    """The stand-in model: next-token logits after reading `prefix` (deterministic)."""
    seed = sum((i + 1) * (t + 3) for i, t in enumerate(prefix)) % (2**31)
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3.0


def reference_logprobs(ids: list[int], start: int) -> list[float]:
    return [torch.log_softmax(fake_logits(ids[:t]), -1)[ids[t]].item() for t in range(start, len(ids))]


# ---- the stand-in package -------------------------------------------------------------------------


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    def __init__(self, prompt_token_ids: list[int], outputs: list[CompletionOutput], context_logits: Any = None):
        self.prompt_token_ids = prompt_token_ids
        self.outputs = outputs
        self.context_logits = context_logits
        self.finished = True


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    detokenize: bool = True


@dataclass(kw_only=True)
class KvCacheConfig:
    enable_block_reuse: bool = True
    free_gpu_memory_fraction: float | None = 0.9
    max_tokens: int | None = None
    dtype: str = "auto"


class _Args:
    model_fields = dict.fromkeys(
        ["model", "tokenizer", "tensor_parallel_size", "max_batch_size", "max_input_len",
         "max_seq_len", "max_num_tokens", "kv_cache_config", "trust_remote_code", "dtype"]
    )


class Recorder:
    def __init__(self, version: str, append_target: bool, honor_stop: bool = True):
        self.version = version
        self.append_target = append_target  # PR #11235 behaviour (>= 1.3.0rc11)
        self.honor_stop = honor_stop
        self.inits: list[dict[str, Any]] = []
        self.calls: list[tuple[list[Any], Any]] = []
        self.script: dict[tuple[int, ...], list[int]] = {}
        self.shutdowns = 0
        self.args_fields = dict(_Args.model_fields)


def make_llm_class(rec: Recorder, kind: str = "pytorch") -> type:
    class LLM:
        def __init__(self, model: str, tokenizer: Any = None, tensor_parallel_size: int = 1, **kwargs: Any):
            all_kwargs = {"model": model, "tokenizer": tokenizer, "tensor_parallel_size": tensor_parallel_size, **kwargs}
            bad = [k for k in kwargs if k not in rec.args_fields]
            if bad:  # BaseLlmArgs is a pydantic model with extra="forbid"
                raise ValueError(f"{type(self).__name__} got invalid argument: {bad[0]}")
            if kind == "legacy" and not (Path(model) / "config.json").is_file():
                raise ValueError("not an engine dir")
            rec.inits.append({"kind": kind, **all_kwargs})
            self.kv = kwargs.get("kv_cache_config") or KvCacheConfig()
            self.max_input_len = kwargs.get("max_input_len", 1024)
            self.seen: list[list[int]] = []

        def generate(self, inputs: Any, sampling_params: Any = None, use_tqdm: bool = True) -> Any:
            unbatched = not isinstance(inputs, list) or isinstance(inputs[0], int)
            batch = [inputs] if unbatched else inputs
            rec.calls.append((batch, sampling_params))
            outs = []
            for i, inp in enumerate(batch):
                sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                ids = inp["prompt_token_ids"] if isinstance(inp, dict) else list(inp)
                if len(ids) > self.max_input_len:
                    raise ValueError("prompt longer than max_input_len")
                outs.append(self._one(list(ids), sp))
            return outs[0] if unbatched else outs

        def _reused(self, ids: list[int]) -> int:
            # Paged KV blocks of 4 tokens: a shared prefix is not recomputed when reuse is on.
            best = 0
            for prev in self.seen:
                n = 0
                while n < min(len(prev), len(ids)) and prev[n] == ids[n]:
                    n += 1
                best = max(best, (n // 4) * 4)
            return min(best, len(ids) - 1)

        def _one(self, ids: list[int], sp: SamplingParams) -> RequestOutput:
            skip = self._reused(ids) if self.kv.enable_block_reuse else 0
            self.seen.append(ids)
            rows = torch.stack([fake_logits(ids[: t + 1]) for t in range(skip, len(ids))])
            gen = self._generate_tokens(ids, sp)
            comp = CompletionOutput(0, token_ids=gen[0], finish_reason=gen[1], stop_reason=gen[2])
            comp.text = TOK.decode(comp.token_ids) if sp.detokenize else ""
            if sp.prompt_logprobs:
                lp = torch.log_softmax(rows.float(), -1)
                targets = ids[1 + skip:] + comp.token_ids[:1]
                entries = []
                for t in range(lp.shape[0]):
                    vals, idx = torch.topk(lp[t], sp.prompt_logprobs)
                    d = {int(j): Logprob(float(v), r + 1) for r, (v, j) in enumerate(zip(vals, idx, strict=True))}
                    if rec.append_target and targets[t] not in d:
                        tl = float(lp[t, targets[t]])
                        d[targets[t]] = Logprob(tl, int((lp[t] > tl).sum()) + 1)
                    entries.append(d)
                comp.prompt_logprobs = entries
            ctx = rows if sp.return_context_logits else None
            return RequestOutput(ids, [comp], ctx)

        def _generate_tokens(self, ids: list[int], sp: SamplingParams) -> tuple[list[int], str, Any]:
            assert sp.top_k == 1, "quantgate asks for greedy decoding"
            planned = rec.script.get(tuple(ids))
            out: list[int] = []
            stops = [TOK.encode(s) for s in ([sp.stop] if isinstance(sp.stop, str) else sp.stop or [])]
            for step in range(sp.max_tokens):
                t = planned[step] if planned is not None and step < len(planned) else int(fake_logits(ids + out).argmax())
                out.append(t)
                if t == sp.end_id or t in (sp.stop_token_ids or []):
                    return out, "stop", None if t == sp.end_id else t
                for s, words in zip([sp.stop] if isinstance(sp.stop, str) else sp.stop or [], stops, strict=True):
                    if rec.honor_stop and out[-len(words):] == words:
                        return out[: -len(words)], "stop", s
            return out, "length", None

        def shutdown(self) -> None:
            rec.shutdowns += 1

    return LLM


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch):
    """Install a stand-in `tensorrt_llm`; returns a factory(version, append_target, honor_stop)."""

    def install(version: str = "1.3.0rc11", append_target: bool = True, honor_stop: bool = True) -> Recorder:
        rec = Recorder(version, append_target, honor_stop)
        pkg = types.ModuleType("tensorrt_llm")
        pkg.__version__ = version
        pkg.LLM = make_llm_class(rec)
        pkg.SamplingParams = SamplingParams
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llmapi.KvCacheConfig = KvCacheConfig
        llmapi.LLM = pkg.LLM
        args = type("TorchLlmArgs", (), {})
        args.model_fields = rec.args_fields
        llmapi.TorchLlmArgs = args
        engine_mod = types.ModuleType("tensorrt_llm._tensorrt_engine")
        engine_mod.LLM = make_llm_class(rec, "legacy")
        pkg.llmapi = llmapi
        monkeypatch.setitem(sys.modules, "tensorrt_llm", pkg)
        monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
        monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", engine_mod)
        monkeypatch.setattr(trt, "_load_tokenizer", lambda path: TOK)
        return rec

    return install


def make_checkpoint(tmp_path: Path, fmt: str = "fp8", kv_fp8: bool = False) -> Checkpoint:
    d = tmp_path / "run" / "checkpoint"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": V, "eos_token_id": 0}))
    algo = get_format(fmt).quant_algo
    if algo:
        q = {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv_fp8 else None}
        (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": q}))
    return Checkpoint(path=str(d), format=fmt, quant_algo=algo, dtype="float16", size_bytes=0)


def spec(**kw: Any) -> EngineSpec:
    base = {"backend": "tensorrt-llm", "max_batch_size": 4, "max_input_len": 64, "max_seq_len": 96}
    return EngineSpec(**{**base, **kw})


def seqs(n: int, seed: int = 0, lo: int = 6, hi: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


# ---- constructor arguments ---------------------------------------------------------------------------


def test_constructor_arguments_pytorch_path(standin, tmp_path):
    rec = standin()
    ckpt = make_checkpoint(tmp_path, "fp8", kv_fp8=True)
    eng = trt.TensorRTLLMEngine.load(ckpt, spec(tensor_parallel_size=2, kv_cache_free_gpu_memory_fraction=0.5))
    (init,) = rec.inits
    kv = init.pop("kv_cache_config")
    assert init == {
        "kind": "pytorch", "model": ckpt.path, "tokenizer": ckpt.path, "tensor_parallel_size": 2,
        "max_batch_size": 4, "max_input_len": 64, "max_seq_len": 96, "max_num_tokens": 256,
    }
    assert kv == KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.5, dtype="fp8")
    info = eng.info()
    assert info.backend == "tensorrt-llm"
    assert info.settings["trtllm_path"] == "pytorch" and info.settings["trtllm_version"] == "1.3.0rc11"
    assert info.settings["kv_cache_dtype"] == "fp8" and info.settings["enable_block_reuse"] is False


def test_kv_cache_dtype_auto_without_kv_quant_and_max_num_tokens_floor(standin, tmp_path):
    rec = standin()
    trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path, "int4_awq"), spec(max_batch_size=1, max_input_len=64))
    assert rec.inits[0]["kv_cache_config"].dtype == "auto"
    assert rec.inits[0]["max_num_tokens"] == 64  # never below max_input_len
    with pytest.raises(StageError, match="max_num_tokens"):
        trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path / "b", "fp8"), spec(max_num_tokens=32))


def test_arguments_the_installed_version_lacks_are_dropped(standin, tmp_path):
    rec = standin("1.0.0")
    del rec.args_fields["max_input_len"]
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    assert "max_input_len" not in rec.inits[0]
    assert eng.info().settings["dropped_args"] == ["max_input_len"]


# ---- scoring: alignment ----------------------------------------------------------------------------


def test_prompt_logprobs_alignment_matches_the_model(standin, tmp_path):
    rec = standin("1.3.0rc11", append_target=True)
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    assert eng.score_mode == "prompt_logprobs"
    reqs = [ScoreRequest(s, start) for s, start in zip(seqs(6), [1, 2, 3, 5, 1, 4], strict=True)]
    out = eng.score(reqs, top_k=3)
    for req, res in zip(reqs, out, strict=True):
        assert res.logprobs == pytest.approx(reference_logprobs(req.token_ids, req.start), abs=1e-5)
        ref_greedy = [int(fake_logits(req.token_ids[:t]).argmax()) == req.token_ids[t] for t in range(req.start, len(req.token_ids))]
        assert res.greedy == ref_greedy
        ref_top = [torch.topk(torch.log_softmax(fake_logits(req.token_ids[:t]), -1), 3).indices.tolist() for t in range(req.start, len(req.token_ids))]
        assert res.top_ids == ref_top
    # Every score came from prompt_logprobs: no fallback to context logits hid a misreading.
    assert len(rec.calls) == 2
    for _, params in rec.calls:
        assert params.max_tokens == 1 and params.prompt_logprobs == 3 and not params.return_context_logits
    assert all(isinstance(p, dict) and "prompt_token_ids" in p for p in rec.calls[0][0])


def test_off_by_one_reading_would_fail_on_a_crafted_sequence():
    tokens = [10, 11, 12, 13]
    # Entry i predicts tokens[i + 1]; it also holds tokens[i] (a likely self-repeat) with another value.
    plp = [{tokens[i + 1]: Logprob(-0.1 * (i + 1), 1), tokens[i]: Logprob(-7.0 - i, 4)} for i in range(3)]
    plp.append({20: Logprob(-0.01, 1)})  # predicts the first generated token
    res = trt.parse_prompt_logprobs(tokens, 1, plp)
    assert res.logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert res.greedy == [True, True, True]
    # The lm-eval 0.4.12 reading (entry t for token t) gives another answer on the same data.
    off_by_one = [plp[t][tokens[t]].logprob for t in range(1, 4) if tokens[t] in plp[t]]
    assert off_by_one != pytest.approx(res.logprobs)
    assert trt.parse_prompt_logprobs(tokens, 3, plp).logprobs == pytest.approx([-0.3])


def test_short_prompt_logprobs_is_an_error_not_a_shift():
    with pytest.raises(StageError, match="different prompt"):
        trt.parse_prompt_logprobs([1, 2, 3, 4], 1, [{2: Logprob(-1.0, 1)}])


def test_greedy_flags_come_from_rank():
    plp = [{5: Logprob(-0.5, 1), 6: Logprob(-1.5, 2)}, {7: Logprob(-0.2, 1), 8: Logprob(-3.0, 9)}]
    res = trt.parse_prompt_logprobs([4, 6, 8], 1, plp)
    assert res.greedy == [False, False] and res.logprobs == pytest.approx([-1.5, -3.0])
    res = trt.parse_prompt_logprobs([4, 5, 7], 1, plp)
    assert res.greedy == [True, True]
    # No rank (older outputs): compare against the best logprob present.
    norank = [{5: Logprob(-0.5), 6: Logprob(-1.5)}]
    assert trt.parse_prompt_logprobs([4, 5], 1, norank).greedy == [True]
    assert trt.parse_prompt_logprobs([4, 6], 1, norank).greedy == [False]


def test_top_k_excludes_the_appended_target():
    entry = {3: Logprob(-0.3, 2), 9: Logprob(-0.1, 1), 4: Logprob(-0.9, 3), 17: Logprob(-6.0, 40)}
    res = trt.parse_prompt_logprobs([1, 17], 1, [entry], top_k=3)
    assert res.top_ids == [[9, 3, 4]] and res.top_logprobs == [pytest.approx([-0.1, -0.3, -0.9])]
    assert res.logprobs == [-6.0] and res.greedy == [False]


def test_old_versions_score_from_context_logits(standin, tmp_path):
    rec = standin("1.2.0", append_target=False)
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    assert eng.score_mode == "context_logits"
    reqs = [ScoreRequest(s, 2) for s in seqs(5, seed=3)]
    out = eng.score(reqs, top_k=2)
    for req, res in zip(reqs, out, strict=True):
        assert res.logprobs == pytest.approx(reference_logprobs(req.token_ids, 2), abs=1e-5)
        assert len(res.top_ids) == len(req.token_ids) - 2
    assert all(p.return_context_logits and p.prompt_logprobs is None for _, p in rec.calls)


def test_missing_target_falls_back_to_context_logits(standin, tmp_path):
    rec = standin("1.3.0rc11", append_target=False)  # a build that returns the top-k only
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    reqs = [ScoreRequest(s, 1) for s in seqs(3, seed=5, lo=12, hi=16)]
    out = eng.score(reqs)  # top-1 only: most targets are missing
    for req, res in zip(reqs, out, strict=True):
        assert res.logprobs == pytest.approx(reference_logprobs(req.token_ids, 1), abs=1e-5)
    assert rec.calls[0][1].prompt_logprobs == 1 and rec.calls[-1][1].return_context_logits


def test_block_reuse_is_disabled_and_a_reused_prefix_is_detected(standin, tmp_path, monkeypatch):
    rec = standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    assert rec.inits[0]["kv_cache_config"].enable_block_reuse is False
    shared = [5, 6, 7, 8, 9, 10, 11, 12]
    reqs = [ScoreRequest(shared + [13, 14], 8), ScoreRequest(shared + [15, 16], 8)]
    out = eng.score(reqs)  # with reuse off, a shared prefix changes nothing
    assert out[1].logprobs == pytest.approx(reference_logprobs(reqs[1].token_ids, 8), abs=1e-5)
    # Were reuse on, the second request would come back short: refused, not silently shifted.
    monkeypatch.setattr(trt, "kv_cache_kwargs", lambda s, d: {"enable_block_reuse": True, "free_gpu_memory_fraction": 0.9})
    eng2 = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path / "r"), spec())
    with pytest.raises(StageError, match="block reuse"):
        eng2.score(reqs)


def test_score_rejects_overlong_sequences_and_bad_start(standin, tmp_path):
    standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec(max_input_len=8, max_seq_len=16))
    with pytest.raises(StageError, match="max_input_len=8"):
        eng.score([ScoreRequest(list(range(2, 12)), 1)])
    with pytest.raises(ValueError):
        eng.score([ScoreRequest([2, 3], 0)])


# ---- batching and generation ------------------------------------------------------------------------


def test_batches_by_max_batch_size_and_keeps_order(standin, tmp_path):
    rec = standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec(max_batch_size=4))
    prompts = seqs(10, seed=7)
    gens = eng.generate(prompts, max_new_tokens=3)
    assert [len(b) for b, _ in rec.calls] == [4, 4, 2]
    assert [b["prompt_token_ids"] for batch, _ in rec.calls for b in batch] == prompts
    for p, g in zip(prompts, gens, strict=True):  # greedy continuation of that very prompt
        want: list[int] = []
        for _ in range(3):
            t = int(fake_logits(p + want).argmax())
            if t == 0:
                break
            want.append(t)
        assert g.token_ids == want
    rec.calls.clear()
    eng.score([ScoreRequest(s, 1) for s in seqs(9)])
    assert [len(b) for b, _ in rec.calls] == [4, 4, 1]


def test_generate_sampling_params_eos_and_length(standin, tmp_path):
    rec = standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec(max_input_len=64, max_seq_len=70))
    p1, p2 = TOK.encode("say hi"), TOK.encode("count")
    rec.script[tuple(p1)] = TOK.encode("hi") + [0]
    rec.script[tuple(p2)] = TOK.encode("one two three")
    g1, g2 = eng.generate([p1, p2], max_new_tokens=8)
    assert (g1.text, g1.token_ids, g1.finish_reason) == ("hi", TOK.encode("hi"), "eos")
    assert (g2.text, g2.finish_reason) == ("one two ", "length")
    params = rec.calls[0][1]
    assert [p.max_tokens for p in params] == [8, 8]
    assert params[0].top_k == 1 and params[0].end_id == 0 and params[0].pad_id == 1
    long_prompt = list(range(2, 30)) * 2 + [2, 3, 4, 5, 6]  # 61 tokens: 9 left under max_seq_len=70
    eng.generate([long_prompt], max_new_tokens=48)
    assert rec.calls[-1][1][0].max_tokens == 9


def test_generate_stop_strings(standin, tmp_path):
    rec = standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    p = TOK.encode("q")
    rec.script[tuple(p)] = TOK.encode("paris.\nnext question")
    (g,) = eng.generate([p], max_new_tokens=30, stop=["\n"])
    assert rec.calls[0][1][0].stop == ["\n"]
    assert (g.text, g.token_ids, g.finish_reason) == ("paris.", TOK.encode("paris."), "stop")


def test_stop_strings_the_engine_misses_are_trimmed(standin, tmp_path):
    rec = standin(honor_stop=False)  # token-level matching missed it (e.g. merged into a bigger token)
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())
    p = TOK.encode("q")
    rec.script[tuple(p)] = TOK.encode("paris. next question")
    (g,) = eng.generate([p], max_new_tokens=30, stop=[". n"])
    assert (g.text, g.token_ids, g.finish_reason) == ("paris", TOK.encode("paris"), "stop")


def test_generate_rejects_prompts_that_do_not_fit(standin, tmp_path):
    standin()
    eng = trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec(max_input_len=8, max_seq_len=8))
    with pytest.raises(StageError, match="max_input_len=8"):
        eng.generate([list(range(2, 12))], 4)
    with pytest.raises(StageError, match="no room"):
        eng.generate([list(range(2, 10))], 4)


def test_close_shuts_the_llm_down(standin, tmp_path):
    rec = standin()
    with trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec()):
        pass
    assert rec.shutdowns == 1


# ---- legacy path -----------------------------------------------------------------------------------


def test_path_choice_by_format():
    assert trt.resolve_trtllm_path("auto", get_format("int8_sq")) == "legacy"
    assert trt.resolve_trtllm_path("auto", get_format("fp8")) == "pytorch"
    assert trt.resolve_trtllm_path("legacy", get_format("fp8")) == "legacy"
    with pytest.raises(StageError, match="support matrix"):
        trt.resolve_trtllm_path("pytorch", get_format("int8_sq"))
    assert trt.resolve_score_mode("auto", "1.3.0rc11", "legacy") == "context_logits"
    assert trt.resolve_score_mode("auto", "1.3.0rc10", "pytorch") == "context_logits"
    assert trt.resolve_score_mode("auto", "1.3.0", "pytorch") == "prompt_logprobs"
    assert trt.resolve_score_mode("context_logits", "1.4.0", "pytorch") == "context_logits"


def test_build_command_line(tmp_path):
    s = spec(max_batch_size=8, max_input_len=2048, max_seq_len=2304, tensor_parallel_size=2)
    cmd = legacy.build_command(tmp_path / "ckpt", tmp_path / "eng", s, get_format("int8_sq"), executable=["trtllm-build"])
    assert cmd == [
        "trtllm-build", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "eng"),
        "--max_batch_size", "8", "--max_input_len", "2048", "--max_seq_len", "2304",
        "--max_num_tokens", "16384", "--max_beam_width", "1", "--gemm_plugin", "disable",
        "--use_paged_context_fmha", "enable", "--kv_cache_type", "paged", "--gather_context_logits",
        "--workers", "2",
    ]
    cmd = legacy.build_command("c", "e", spec(trtllm_gemm_plugin="float16"), get_format("int8_sq"), executable=["x"])
    assert cmd[cmd.index("--gemm_plugin") + 1] == "float16"
    cmd = legacy.build_command("c", "e", spec(), get_format("int4_awq"), executable=["x"])
    assert cmd[cmd.index("--gemm_plugin") + 1] == "auto"


def test_run_build_logs_and_reports_failure(tmp_path):
    log_path = tmp_path / "build.log"
    legacy.run_build([sys.executable, "-c", "print('engine built')"], log_path)
    assert "engine built" in log_path.read_text()
    with pytest.raises(StageError, match="exit 3.*boom"):
        legacy.run_build([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log_path)
    with pytest.raises(StageError, match="not found"):
        legacy.run_build([str(tmp_path / "no-such-trtllm-build")], log_path)


FAKE_BUILD = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--output_dir") + 1])
ckpt = Path(args[args.index("--checkpoint_dir") + 1])
assert (ckpt / "config.json").is_file() and "--gather_context_logits" in args
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"build_config": {"max_batch_size": int(args[args.index("--max_batch_size") + 1])}}))
(out / "rank0.engine").write_bytes(b"engine")
n = Path(str(out) + ".count"); n.write_text(str(int(n.read_text()) + 1 if n.exists() else 1))
"""


def test_int8_sq_loads_through_the_legacy_path(standin, tmp_path, monkeypatch):
    rec = standin("1.2.0", append_target=False)
    ckpt = make_checkpoint(tmp_path, "int8_sq")
    paths = legacy.legacy_paths(ckpt.dir)
    assert paths.checkpoint_dir.parent == ckpt.dir.parent and paths.engine_dir != ckpt.dir
    with pytest.raises(StageError, match="no TRT-LLM checkpoint"):
        trt.TensorRTLLMEngine.load(ckpt, spec())
    paths.checkpoint_dir.mkdir()
    (paths.checkpoint_dir / "config.json").write_text("{}")
    script = tmp_path / "fake_build.py"
    script.write_text(FAKE_BUILD)
    monkeypatch.setattr(legacy, "trtllm_build_executable", lambda: [sys.executable, str(script)])
    eng = trt.TensorRTLLMEngine.load(ckpt, spec())
    (init,) = rec.inits
    assert init["kind"] == "legacy" and init["model"] == str(paths.engine_dir) and init["tokenizer"] == ckpt.path
    assert init["kv_cache_config"] == KvCacheConfig(enable_block_reuse=False, free_gpu_memory_fraction=0.85)
    assert eng.score_mode == "context_logits" and eng.info().settings["gemm_plugin"] == "disable"
    req = ScoreRequest(seqs(1)[0], 1)
    assert eng.score([req])[0].logprobs == pytest.approx(reference_logprobs(req.token_ids, 1), abs=1e-5)
    # Same spec again: the stamped engine is reused; another spec rebuilds.
    trt.TensorRTLLMEngine.load(ckpt, spec())
    assert Path(str(paths.engine_dir) + ".count").read_text() == "1"
    trt.TensorRTLLMEngine.load(ckpt, spec(max_batch_size=2))
    assert Path(str(paths.engine_dir) + ".count").read_text() == "2"


def test_legacy_runtime_missing_is_a_clear_error(standin, tmp_path, monkeypatch):
    standin("1.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", None)  # import raises ImportError
    ckpt = make_checkpoint(tmp_path, "int8_sq")
    paths = legacy.legacy_paths(ckpt.dir)
    paths.checkpoint_dir.mkdir()
    (paths.checkpoint_dir / "config.json").write_text("{}")
    script = tmp_path / "fake_build.py"
    script.write_text(FAKE_BUILD)
    monkeypatch.setattr(legacy, "trtllm_build_executable", lambda: [sys.executable, str(script)])
    with pytest.raises(StageError, match="1.0-1.2.x line"):
        trt.TensorRTLLMEngine.load(ckpt, spec())


def test_export_legacy_checkpoint_rejects_tp_zero(tmp_path):
    with pytest.raises(ValueError, match=">= 1"):
        legacy.export_legacy_checkpoint(object(), "llama", "float16", tmp_path, tp=0)


def test_missing_tensorrt_llm_is_a_stage_error_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    with pytest.raises(StageError, match="pypi.nvidia.com"):
        trt.TensorRTLLMEngine.load(make_checkpoint(tmp_path), spec())


def test_modules_import_without_tensorrt_llm():
    code = (
        "import sys; import quantgate.engines.tensorrt_llm, quantgate.engines.trtllm_legacy, quantgate.preflight; "
        "assert 'tensorrt_llm' not in sys.modules; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_standin_mirrors_the_real_field_names():
    # Guard against the stand-in drifting from what the module docstrings cite.
    assert {f.name for f in dataclasses.fields(CompletionOutput)} >= {"token_ids", "text", "prompt_logprobs", "finish_reason", "stop_reason"}
    assert {f.name for f in dataclasses.fields(SamplingParams)} >= {"max_tokens", "prompt_logprobs", "return_context_logits", "end_id", "stop", "top_k"}
