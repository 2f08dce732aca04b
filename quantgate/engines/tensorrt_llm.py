"""The `tensorrt-llm` backend: NVIDIA TensorRT-LLM's LLM API on the exported checkpoint.

Written against TensorRT-LLM's public source (NVIDIA/TensorRT-LLM, 1.0.0rc4 through 2026 main) and
tested only at its API boundary with a stand-in module: TensorRT-LLM cannot be installed where this
was written, so none of this has run against the real library. `tensorrt_llm` is imported inside
`TensorRTLLMEngine.load` only, never at module import.

Two paths (`engine.trtllm_path`):
- **pytorch** (default): `tensorrt_llm.LLM(model=<unified HF checkpoint>)`. The PyTorch backend reads
  `hf_quant_config.json` (quant_algo, kv_cache_quant_algo) itself. The only path on TRT-LLM main.
- **legacy** (INT8 SmoothQuant, which the PyTorch backend cannot run): TRT-LLM checkpoint +
  `trtllm-build` engine, run with `tensorrt_llm._tensorrt_engine.LLM` (see `trtllm_legacy.py`).

API facts relied on (file paths in NVIDIA/TensorRT-LLM):
- `LLM(model, tokenizer, tensor_parallel_size, **kwargs)`; kwargs are `TorchLlmArgs` fields, and
  `BaseLlmArgs` holds `max_batch_size`, `max_input_len`, `max_seq_len`, `max_num_tokens`,
  `kv_cache_config` (`tensorrt_llm/llmapi/llm_args.py`, 1.0-1.3). Unknown kwargs are rejected
  ("got invalid argument", issue #7752), so we drop fields the installed version lacks.
- `KvCacheConfig(free_gpu_memory_fraction, enable_block_reuse, dtype)`; `dtype` is a PyTorch-backend
  field ("auto" | "fp8"). Block reuse must be OFF for scoring: with prefix reuse, shared-prefix
  requests only return logits for the recomputed suffix (ModelOpt `modelopt.deploy.llm.generate`
  docs; lm-eval's trtllm backend disables it for the same reason).
- `LLM.generate(inputs, sampling_params=..., use_tqdm=...)`: `inputs` is a list of prompts; a prompt
  may be `{"prompt_token_ids": [...]}` (`tensorrt_llm/inputs/data.py` TokensPrompt). A bare
  `list[int]` is taken as ONE prompt (`llmapi/llm.py`: `isinstance(inputs[0], int)`), so we always
  pass dicts. `sampling_params` may be a list, one per prompt.
- Output: `RequestOutput.outputs[0]` is a `CompletionOutput` with `token_ids`, `text`,
  `finish_reason` ('stop' | 'length' | ...), `stop_reason` (the stop string or token id; None when
  the end id finished it) and `prompt_logprobs: list[dict[int, Logprob(logprob, rank)]]`;
  `RequestOutput.context_logits` is a `[prompt_len, vocab]` tensor (`tensorrt_llm/executor/result.py`).

ALIGNMENT of `prompt_logprobs` (the lm-eval 0.4.12 off-by-one, fixed in ModelOpt PR #2066):
entry `i` is the distribution computed from context-logits row `i`, i.e. after reading
`prompt[: i + 1]`; it predicts `prompt[i + 1]`. There is no leading `None` (unlike vLLM), and the
list has `len(prompt)` entries, the last predicting the first generated token. Source:
`tensorrt_llm/executor/base_worker.py::_compute_pytorch_prompt_logprobs` computes them with
targets `prompt_token_ids[1:] + first_generated_token` (2026 main); in 1.0.0rc4
`executor/result.py::compute_logprobs` takes the top-k of each `context_logits` row with no target.
Since PR #11235 (TRTLLM-10852, merged 2026-02) the target token is always present, appended with its
true rank when outside the top-k; ModelOpt's `examples/llm_eval/README.md` dates working
loglikelihood tasks to TRT-LLM >= 1.3.0rc11. Older versions return the top-k only, so for them we
score from `context_logits` (row `t - 1` predicts token `t`), and a missing target at run time
falls back to the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.engines.base import (
    Engine,
    EngineInfo,
    EngineLimits,
    Generation,
    ScoreRequest,
    ScoreResult,
    trim_at_stop,
)
from quantgate.errors import StageError

if TYPE_CHECKING:
    from quantgate.artifacts import Checkpoint
    from quantgate.formats import FormatSpec
    from quantgate.recipe import EngineSpec

log = logging.getLogger(__name__)

BACKEND = "tensorrt-llm"
INSTALL_HINT = (
    "pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com "
    "(Linux, NVIDIA GPU, CUDA 12/13; see docs/tensorrt-llm.md)"
)
# First version whose prompt_logprobs always carry the prompt token (ModelOpt llm_eval README).
PROMPT_LOGPROBS_MIN_VERSION = "1.3.0rc11"
# Context logits are [prompt_len, vocab] float32 per request: bound one scoring call's total.
CONTEXT_LOGITS_BUDGET_BYTES = 2 << 30
MAX_NUM_TOKENS_CAP = 16384  # ModelOpt's old build script: min(B * I, 16384)


# ---- pure helpers (tested without TensorRT-LLM) -------------------------------------------------


def version_at_least(version: str, minimum: str) -> bool:
    """PEP 440 comparison; an unparseable version counts as new (source builds say '1.3.0.dev')."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return True


def resolve_trtllm_path(requested: str, fmt: FormatSpec) -> str:
    """'auto' | 'pytorch' | 'legacy' -> 'pytorch' | 'legacy' for this format."""
    if requested == "auto":
        return "pytorch" if fmt.trtllm_pytorch_backend else "legacy"
    if requested == "pytorch" and not fmt.trtllm_pytorch_backend:
        raise StageError(
            "engine",
            f"format {fmt.name!r} ({fmt.quant_algo}) is not in the TensorRT-LLM PyTorch backend's "
            "support matrix; use engine.trtllm_path=legacy (TRT-LLM <= 1.2 with trtllm-build) or auto",
        )
    return requested


def resolve_score_mode(requested: str, version: str, path: str) -> str:
    """How scores are read: 'prompt_logprobs' or 'context_logits' (see the module docstring)."""
    if path == "legacy":
        # The TensorRT backend's prompt logprobs never append the prompt token (result.py
        # compute_logprobs is called without prompt ids there); its context logits are exact.
        return "context_logits"
    if requested != "auto":
        return requested
    return "prompt_logprobs" if version_at_least(version, PROMPT_LOGPROBS_MIN_VERSION) else "context_logits"


def resolve_max_num_tokens(spec: EngineSpec) -> int:
    """Tokens one engine step may hold. Without chunked prefill a whole prompt must fit."""
    if spec.max_num_tokens is not None:
        if spec.max_num_tokens < spec.max_input_len:
            raise StageError(
                "engine",
                f"engine.max_num_tokens={spec.max_num_tokens} is below engine.max_input_len="
                f"{spec.max_input_len}; a prompt of max_input_len tokens would not fit one step",
            )
        return spec.max_num_tokens
    return max(spec.max_input_len, min(spec.max_batch_size * spec.max_input_len, MAX_NUM_TOKENS_CAP))


def kv_cache_dtype(hf_quant_config: dict[str, Any] | None) -> str:
    """KvCacheConfig.dtype: 'fp8' only when the export carries FP8 KV scales, else 'auto'."""
    q = (hf_quant_config or {}).get("quantization", {})
    return "fp8" if str(q.get("kv_cache_quant_algo") or "").upper() == "FP8" else "auto"


def pytorch_llm_kwargs(checkpoint_dir: Path, spec: EngineSpec) -> dict[str, Any]:
    """Arguments of `tensorrt_llm.LLM` for the PyTorch path, except `kv_cache_config`."""
    return {
        "model": str(checkpoint_dir),
        "tokenizer": str(checkpoint_dir),
        "tensor_parallel_size": spec.tensor_parallel_size,
        "max_batch_size": spec.max_batch_size,
        "max_input_len": spec.max_input_len,
        "max_seq_len": spec.max_seq_len,
        "max_num_tokens": resolve_max_num_tokens(spec),
    }


def kv_cache_kwargs(spec: EngineSpec, dtype: str | None) -> dict[str, Any]:
    """Arguments of `KvCacheConfig`. dtype None: do not pass it (TensorRT backend: baked at build)."""
    kw: dict[str, Any] = {
        "free_gpu_memory_fraction": spec.kv_cache_free_gpu_memory_fraction,
        "enable_block_reuse": False,  # scoring needs every prompt position's logits
    }
    if dtype is not None:
        kw["dtype"] = dtype
    return kw


def filter_llm_kwargs(kwargs: dict[str, Any], args_cls: Any) -> tuple[dict[str, Any], list[str]]:
    """Drop arguments the installed LLM args class lacks (it rejects unknown ones)."""
    fields = getattr(args_cls, "model_fields", None)
    if not fields:
        return kwargs, []
    kept = {k: v for k, v in kwargs.items() if k in fields}
    return kept, sorted(set(kwargs) - set(kept))


def _is_top1(entry: dict[int, Any], token: int) -> bool:
    lp = entry[token]
    rank = getattr(lp, "rank", None)
    if rank is not None:
        return int(rank) == 1
    return lp.logprob >= max(v.logprob for v in entry.values())


def _top_k(entry: dict[int, Any], k: int) -> tuple[list[int], list[float]]:
    items = list(entry.items())
    if all(getattr(v, "rank", None) is not None for _, v in items):
        # The appended target token carries its true rank (> k when outside the top-k).
        items = sorted((kv for kv in items if kv[1].rank <= k), key=lambda kv: kv[1].rank)
    else:
        items = sorted(items, key=lambda kv: -kv[1].logprob)[:k]
    return [int(t) for t, _ in items], [float(v.logprob) for _, v in items]


def parse_prompt_logprobs(
    token_ids: Sequence[int], start: int, prompt_logprobs: Sequence[dict[int, Any]] | None, top_k: int = 0
) -> ScoreResult | None:
    """ScoreResult for token_ids[start:] from TRT-LLM prompt logprobs; None if a target is absent.

    Entry i predicts token_ids[i + 1] (module docstring), so token t is read from entry t - 1.
    """
    n = len(token_ids)
    if prompt_logprobs is None or len(prompt_logprobs) < n - 1:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise StageError(
            "engine",
            f"TensorRT-LLM returned {got} prompt logprob entries for a {n}-token prompt (expected "
            f">= {n - 1}); the engine scored a different prompt (truncated? block reuse on?)",
        )
    logprobs: list[float] = []
    greedy: list[bool] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for t in range(start, n):
        entry = prompt_logprobs[t - 1]
        if entry is None or token_ids[t] not in entry:
            return None
        logprobs.append(float(entry[token_ids[t]].logprob))
        greedy.append(_is_top1(entry, token_ids[t]))
        if top_k:
            ids, lps = _top_k(entry, top_k)
            top_ids.append(ids)
            top_lps.append(lps)
    res = ScoreResult(logprobs, greedy)
    if top_k:
        res.top_ids, res.top_logprobs = top_ids, top_lps
    return res


def score_from_context_logits(token_ids: Sequence[int], start: int, context_logits: Any, top_k: int = 0) -> ScoreResult:
    """ScoreResult from a [prompt_len, vocab] logits tensor: row t - 1 predicts token t."""
    import torch

    logits = context_logits
    if logits is None:
        raise StageError("engine", "TensorRT-LLM returned no context logits (legacy engines need --gather_context_logits)")
    if logits.dim() == 3:  # [beam, len, vocab] with beam 1 (result.py squeezes the same way)
        logits = logits[0]
    n = len(token_ids)
    if logits.shape[0] < n - 1:
        raise StageError("engine", f"TensorRT-LLM returned {logits.shape[0]} context-logit rows for a {n}-token prompt")
    lp = torch.log_softmax(logits[start - 1 : n - 1].float(), dim=-1)
    target = torch.tensor(list(token_ids[start:]), device=lp.device, dtype=torch.long)
    tok = lp.gather(1, target[:, None]).squeeze(1)
    # Rank 1 as TRT-LLM counts it: no token strictly more likely.
    greedy = tok >= lp.max(dim=-1).values
    res = ScoreResult(tok.tolist(), [bool(g) for g in greedy.tolist()])
    if top_k:
        top = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        res.top_ids, res.top_logprobs = top.indices.tolist(), top.values.tolist()
    return res


def batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def token_budget_batches(indices: Sequence[int], lengths: Sequence[int], max_batch: int, max_tokens: int | None) -> Iterator[list[int]]:
    """Batches of at most max_batch requests and (when given) max_tokens prompt tokens in total."""
    cur: list[int] = []
    used = 0
    for i in indices:
        n = lengths[i]
        if cur and (len(cur) >= max_batch or (max_tokens is not None and used + n > max_tokens)):
            yield cur
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        yield cur


def finish_reason_of(completion: Any, eos_ids: Sequence[int]) -> str:
    """TRT-LLM 'stop' covers both the end id (stop_reason None) and stop words (stop_reason set)."""
    reason = getattr(completion, "finish_reason", None)
    if reason == "stop":
        stop_reason = getattr(completion, "stop_reason", None)
        if stop_reason is None or (isinstance(stop_reason, int) and stop_reason in eos_ids):
            return "eos"
        return "stop"
    return "length"


def tokens_for_text(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """Longest prefix of ids whose decoding is a prefix of text (ids cut where a stop string began)."""
    best = 0
    for n in range(1, len(ids) + 1):
        d = tokenizer.decode(list(ids[:n]), skip_special_tokens=True)
        if len(d) <= len(text) and text.startswith(d):
            best = n
        elif len(d) > len(text):
            break
    return list(ids[:best])


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    f = checkpoint_dir / "config.json"
    if not f.is_file():
        raise StageError("engine", f"{checkpoint_dir} has no config.json; expected an exported checkpoint directory")
    return json.loads(f.read_text(encoding="utf-8"))


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _import_trtllm() -> Any:
    try:
        import tensorrt_llm
    except ImportError as err:
        raise StageError("engine", f"engine.backend=tensorrt-llm but TensorRT-LLM is not importable ({err}); {INSTALL_HINT}") from None
    return tensorrt_llm


# ---- the engine ---------------------------------------------------------------------------------


class TensorRTLLMEngine(Engine):
    backend = BACKEND

    def __init__(
        self,
        llm: Any,
        sampling_params_cls: Any,
        tokenizer: Any,
        limits: EngineLimits,
        *,
        eos_ids: Sequence[int],
        score_mode: str,
        vocab_size: int | None = None,
        compute_dtype: str = "float16",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.llm = llm
        self.SamplingParams = sampling_params_cls
        self.tokenizer = tokenizer
        self.limits = limits
        self._eos_ids = sorted(set(eos_ids))
        self.score_mode = score_mode
        self.vocab_size = vocab_size
        self.compute_dtype = compute_dtype
        self.settings = settings or {}
        self._warned_fallback = False

    @classmethod
    def load(cls, checkpoint: Checkpoint, spec: EngineSpec) -> TensorRTLLMEngine:
        from quantgate.formats import get_format

        fmt = get_format(checkpoint.format)
        path = resolve_trtllm_path(spec.trtllm_path, fmt)
        config = _read_config(checkpoint.dir)
        trtllm = _import_trtllm()
        version = str(getattr(trtllm, "__version__", "unknown"))
        tokenizer = _load_tokenizer(checkpoint.dir)
        score_mode = resolve_score_mode(spec.trtllm_score_mode, version, path)
        settings: dict[str, Any] = {
            "trtllm_version": version,
            "trtllm_path": path,
            "score_mode": score_mode,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "max_batch_size": spec.max_batch_size,
            "max_input_len": spec.max_input_len,
            "max_seq_len": spec.max_seq_len,
            "max_num_tokens": resolve_max_num_tokens(spec),
            "kv_cache_free_gpu_memory_fraction": spec.kv_cache_free_gpu_memory_fraction,
            "enable_block_reuse": False,
            "quant_algo": checkpoint.quant_algo,
        }
        if path == "pytorch":
            from tensorrt_llm import LLM, SamplingParams
            from tensorrt_llm.llmapi import KvCacheConfig

            kv_dtype = kv_cache_dtype(checkpoint.hf_quant_config())
            kwargs = pytorch_llm_kwargs(checkpoint.dir, spec)
            try:
                from tensorrt_llm.llmapi import TorchLlmArgs as args_cls
            except ImportError:
                args_cls = None
            kwargs, dropped = filter_llm_kwargs(kwargs, args_cls)
            if dropped:
                log.warning("TensorRT-LLM %s does not take %s; not passed", version, ", ".join(dropped))
            kwargs["kv_cache_config"] = KvCacheConfig(**kv_cache_kwargs(spec, kv_dtype))
            settings.update(kv_cache_dtype=kv_dtype, dropped_args=dropped)
            try:
                llm = LLM(**kwargs)
            except Exception as err:  # the LLM constructor spawns workers; keep its message
                raise StageError("engine", f"TensorRT-LLM could not load {checkpoint.dir}: {type(err).__name__}: {err}") from err
        else:
            from quantgate.engines import trtllm_legacy

            llm, SamplingParams, legacy_settings = trtllm_legacy.load_runner(checkpoint, spec, fmt)
            settings.update(legacy_settings)
        cfg_eos = config.get("eos_token_id")
        eos = set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        limits = EngineLimits(spec.max_batch_size, spec.max_input_len, spec.max_seq_len)
        return cls(
            llm, SamplingParams, tokenizer, limits,
            eos_ids=sorted(eos), score_mode=score_mode, vocab_size=config.get("vocab_size"),
            compute_dtype=checkpoint.dtype, settings=settings,
        )

    # -- identity --
    def info(self) -> EngineInfo:
        device = "cuda"
        try:
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{torch.cuda.get_device_name()}"
        except Exception:  # info must not fail on a machine without a working torch.cuda
            pass
        return EngineInfo(backend=self.backend, device=device, compute_dtype=self.compute_dtype, settings=dict(self.settings))

    # -- sampling parameters --
    def _end_ids(self) -> tuple[int | None, list[int]]:
        tok_eos = self.tokenizer.eos_token_id
        end_id = tok_eos if tok_eos is not None else (self._eos_ids[0] if self._eos_ids else None)
        return end_id, [e for e in self._eos_ids if e != end_id]

    def _greedy_params(self, max_tokens: int, **extra: Any) -> Any:
        end_id, more_eos = self._end_ids()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else end_id
        kw: dict[str, Any] = {
            "max_tokens": max_tokens,
            # top_k=1 is greedy in every 1.x (SamplingParams._greedy_decoding); temperature=0
            # is not accepted by every version.
            "top_k": 1,
            "end_id": end_id,
            "pad_id": pad_id,
        }
        if more_eos:
            kw["stop_token_ids"] = more_eos
        kw.update(extra)
        return self.SamplingParams(**kw)

    # -- scoring --
    def _check_request(self, req: ScoreRequest) -> None:
        n = len(req.token_ids)
        if req.start < 1 or req.start > n:
            raise ValueError(f"score start {req.start} outside 1..{n}")
        if n > self.limits.max_input_len:
            raise StageError("engine", f"sequence of {n} tokens exceeds engine.max_input_len={self.limits.max_input_len}; TensorRT-LLM would reject or truncate it")

    def score(self, requests: Sequence[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        for req in requests:
            self._check_request(req)
        results: list[ScoreResult | None] = [None] * len(requests)
        todo = list(range(len(requests)))
        if self.score_mode == "prompt_logprobs":
            todo = self._score_prompt_logprobs(requests, todo, top_k, results)
            if todo and not self._warned_fallback:
                log.warning("TensorRT-LLM prompt_logprobs lacked the prompt token for %d request(s); scoring them from context logits", len(todo))
                self._warned_fallback = True
        if todo:
            self._score_context_logits(requests, todo, top_k, results)
        return results  # type: ignore[return-value]

    def _prompts(self, requests: Sequence[ScoreRequest], idx: Sequence[int]) -> list[dict[str, list[int]]]:
        return [{"prompt_token_ids": list(requests[i].token_ids)} for i in idx]

    def _score_prompt_logprobs(self, requests: Sequence[ScoreRequest], idx: list[int], top_k: int, results: list[ScoreResult | None]) -> list[int]:
        params = self._greedy_params(1, prompt_logprobs=max(top_k, 1), detokenize=False)
        missing: list[int] = []
        for chunk in batches(idx, self.limits.max_batch_size):
            outs = self.llm.generate(self._prompts(requests, chunk), sampling_params=params, use_tqdm=False)
            for i, out in zip(chunk, outs, strict=True):
                comp = out.outputs[0]
                plp = getattr(comp, "prompt_logprobs", None)
                if plp is None:
                    plp = getattr(out, "prompt_logprobs", None)
                res = parse_prompt_logprobs(requests[i].token_ids, requests[i].start, plp, top_k)
                if res is None:
                    missing.append(i)
                else:
                    results[i] = res
        return missing

    def _score_context_logits(self, requests: Sequence[ScoreRequest], idx: list[int], top_k: int, results: list[ScoreResult | None]) -> None:
        params = self._greedy_params(1, return_context_logits=True, detokenize=False)
        lengths = [len(r.token_ids) for r in requests]
        budget = CONTEXT_LOGITS_BUDGET_BYTES // (4 * self.vocab_size) if self.vocab_size else None
        for chunk in token_budget_batches(idx, lengths, self.limits.max_batch_size, budget):
            outs = self.llm.generate(self._prompts(requests, chunk), sampling_params=params, use_tqdm=False)
            for i, out in zip(chunk, outs, strict=True):
                results[i] = score_from_context_logits(requests[i].token_ids, requests[i].start, getattr(out, "context_logits", None), top_k)

    # -- generation --
    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (), max_rows: int | None = None) -> list[Generation]:
        # max_rows is not used: the runtime schedules requests in flight up to its built max_batch_size.
        budgets = []
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            if len(p) > self.limits.max_input_len:
                raise StageError("engine", f"prompt of {len(p)} tokens exceeds engine.max_input_len={self.limits.max_input_len}")
            budget = min(max_new_tokens, self.limits.max_seq_len - len(p))
            if budget < 1:
                raise StageError("engine", f"prompt of {len(p)} tokens leaves no room under engine.max_seq_len={self.limits.max_seq_len}")
            budgets.append(budget)
        stop_list = [s for s in stop if s]
        cache: dict[int, Any] = {}
        out: list[Generation | None] = [None] * len(prompts)
        for chunk in batches(list(range(len(prompts))), self.limits.max_batch_size):
            params = []
            for i in chunk:
                if budgets[i] not in cache:
                    # TRT-LLM matches stop strings as token sequences (sampling_params.py _setup);
                    # text-level stops it misses are trimmed below.
                    cache[budgets[i]] = self._greedy_params(budgets[i], stop=stop_list or None)
                params.append(cache[budgets[i]])
            inputs = [{"prompt_token_ids": list(prompts[i])} for i in chunk]
            results = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
            for i, res in zip(chunk, results, strict=True):
                out[i] = self._to_generation(res.outputs[0], stop_list)
        return out  # type: ignore[return-value]

    def _to_generation(self, comp: Any, stop: Sequence[str]) -> Generation:
        ids = list(comp.token_ids or [])
        reason = finish_reason_of(comp, self._eos_ids)
        for j, t in enumerate(ids):
            if t in self._eos_ids:  # whether the end id is in token_ids varies; cut it either way
                ids, reason = ids[:j], "eos"
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = trim_at_stop(text, stop)
        if stopped:
            ids, reason = tokens_for_text(self.tokenizer, ids, text), "stop"
        return Generation(ids, text, reason)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None and hasattr(llm, "shutdown"):
            llm.shutdown()


# ---- what this backend contributes to a run (see engines/__init__.py) ---------------------------


def identity(recipe: Any) -> dict[str, Any]:
    """TensorRT-LLM's version decides the scoring method (prompt_logprobs vs context logits), the
    path decides the runtime: both key the baseline cache and the comparability facts."""
    from quantgate import formats
    from quantgate.engines.trtllm_legacy import installed_version

    version = installed_version() or "absent"
    fmt = formats.get_format(recipe.quantization.format)
    path = resolve_trtllm_path(recipe.engine.trtllm_path, fmt)
    return {"tensorrt_llm": version, "path": path, "score_mode": resolve_score_mode(recipe.engine.trtllm_score_mode, version, path)}


def extra_stages(recipe: Any) -> list[Any]:
    """INT8 SmoothQuant (or trtllm_path=legacy) runs from a trtllm-build engine: the plan gets a
    legacy checkpoint export before the unified one."""
    from quantgate import formats
    from quantgate.engines.trtllm_legacy import _legacy_export_stage

    fmt = formats.get_format(recipe.quantization.format)
    if fmt.quantized and resolve_trtllm_path(recipe.engine.trtllm_path, fmt) == "legacy":
        return [_legacy_export_stage()]
    return []


def preflight(recipe: Any, fmt: Any) -> Any:
    """This backend's checks before any work (see engines/__init__.py)."""
    from quantgate.preflight import preflight_trtllm

    return preflight_trtllm(recipe, fmt)
