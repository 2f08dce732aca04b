"""The Engine interface: load an exported checkpoint; score token log-probs; generate greedily.

Evaluation (lm-eval adapter, golden prompts) talks only to this interface, so every backend is
judged the same way. Token ids in, token ids out: tokenization happens once, in evaluation, with
the checkpoint's own tokenizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ScoreRequest:
    """Score `token_ids[start:]`, each token conditioned on all tokens before it (start >= 1)."""

    token_ids: list[int]
    start: int


@dataclass(frozen=True)
class ChoiceRequest:
    """Several continuations of ONE context (a multiple-choice item): score each continuation,
    conditioned on `context` (len >= 1). An engine may run the shared context once."""

    context: list[int]
    continuations: list[list[int]]


@dataclass
class ScoreResult:
    logprobs: list[float]
    """log p(token_ids[t] | token_ids[:t]) for t in [start, len)."""
    greedy: list[bool]
    """token_ids[t] == argmax of the distribution at t."""
    top_ids: list[list[int]] | None = None
    """Per scored position, the top-k token ids (when top_k > 0 was asked)."""
    top_logprobs: list[list[float]] | None = None


@dataclass
class Generation:
    token_ids: list[int]
    """Generated tokens only (prompt excluded), stop string / EOS trimmed."""
    text: str
    finish_reason: str = "length"  # "length" | "stop" | "eos"


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 8
    max_input_len: int = 2048
    max_seq_len: int = 2304

    def rows_within_batch_tokens(self, rows: int, tokens_per_row: int) -> int:
        """Rows per batch for `rows` sequences of up to `tokens_per_row` tokens: as many as the
        tokens of one full batch (max_batch_size x max_seq_len, what the memory plan provides for)
        hold, never fewer than max_batch_size, never more than `rows`. Generation batches of short
        sequences use it (golden prompts, shared-prefix decode): a decode step reads all weights
        once whatever the rows."""
        return max(self.max_batch_size, min(rows, self.max_batch_size * self.max_seq_len // max(tokens_per_row, 1)))


@dataclass
class EngineInfo:
    """What identifies how an engine computes (part of the comparability / cache key)."""

    backend: str
    device: str
    compute_dtype: str
    settings: dict[str, Any] = field(default_factory=dict)


class Engine(ABC):
    """A loaded checkpoint that scores and generates. Subclasses: torch, tensorrt-llm."""

    backend: str = "?"
    tokenizer: Any  # transformers.PreTrainedTokenizerBase loaded from the checkpoint directory
    limits: EngineLimits

    @abstractmethod
    def score(self, requests: Sequence[ScoreRequest], top_k: int = 0) -> list[ScoreResult]:
        """Log-probs of the requested tokens, batched internally up to limits.max_batch_size."""

    # True when score_choices runs each shared context once (the adapter counts tokens that way).
    shares_prefixes: bool = False

    def score_choices(self, requests: Sequence[ChoiceRequest]) -> list[list[ScoreResult]]:
        """Per request, one ScoreResult per continuation (issue 11). This default builds it from
        `score`: every continuation scored with its own copy of the context. Engines that can
        reuse the context (KV cache, one forward for single-token choices) override it; results
        must match this path."""
        flat = [ScoreRequest(r.context + c, len(r.context)) for r in requests for c in r.continuations]
        res = self.score(flat)
        out, k = [], 0
        for r in requests:
            out.append(res[k : k + len(r.continuations)])
            k += len(r.continuations)
        return out

    def generate_shared(
        self, prefix: list[int], suffixes: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[Generation]:
        """Greedy continuation of `prefix + suffix` for each suffix (issue 11: few-shot prompts
        share their exemplars). This default builds it from `generate`; engines that can run the
        prefix once override it, with the same results."""
        return self.generate([prefix + list(s) for s in suffixes], max_new_tokens, stop=stop)

    @abstractmethod
    def generate(
        self, prompts: Sequence[list[int]], max_new_tokens: int, stop: Sequence[str] = (), max_rows: int | None = None
    ) -> list[Generation]:
        """Greedy continuation of each prompt, stopping at EOS, a stop string or max_new_tokens.
        `max_rows`: rows per batch (None: limits.max_batch_size); a caller with short prompts may
        ask for more rows within the same tokens (evaluation/golden.py)."""

    @abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    def eos_token_ids(self) -> list[int]:
        ids = getattr(self, "_eos_ids", None)
        if ids is not None:
            return ids
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def one_time_costs(self) -> dict[str, float]:
        """Seconds spent once per engine (load, conversion, warm-up), kept out of throughput."""
        return {}

    def memory_stats(self) -> dict[str, int]:
        """Bytes the engine holds (resident GPU memory, load peak, checkpoint tensors), if known."""
        return {}

    def close(self) -> None:  # free GPU memory etc.
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def trim_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; returns (text, stopped)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
