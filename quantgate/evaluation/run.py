"""One side (baseline or candidate) of the evaluation: suite tasks + golden prompts + the facts that
must match between the two sides for the gate to compare them."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from quantgate.errors import StageError
from quantgate.evaluation.results import EvalResults, GoldenOutput

if TYPE_CHECKING:
    from quantgate.engines.base import Engine
    from quantgate.recipe import EvaluationSpec

log = logging.getLogger(__name__)


def tokenizer_hash(tokenizer: Any) -> str:
    """Vocabulary + special tokens + chat template + whether encode() adds specials: what decides
    the token ids the two sides are fed."""
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "added": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "encode_probe": list(tokenizer.encode("Hello world. 123")),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def comparability(engine: Engine, spec: EvaluationSpec, task_names: list[str]) -> dict[str, str]:
    """Facts that must be equal between baseline and candidate (the gate refuses otherwise)."""
    from quantgate.evaluation.lm_eval_adapter import QuantgateLM
    from quantgate.evaluation.suites import suite_fingerprint

    info = engine.info()
    lm = QuantgateLM(engine, batch_size=spec.batch_size, show_progress=False)
    return {
        "backend": info.backend,
        "device_type": info.device.split(":", 1)[0],
        "compute_dtype": info.compute_dtype,
        "tokenizer_hash": tokenizer_hash(engine.tokenizer),
        "suite": spec.suite,
        # covers the standard tasks' data provenance and include_path tasks too
        "suite_fingerprint": suite_fingerprint(spec),
        "lm_eval_version": lm_eval_version(),
        "tasks": ",".join(sorted(task_names)),
        "evaluation": json.dumps({"limit": spec.limit, "seed": spec.seed, "batch_size": spec.batch_size}, sort_keys=True),
        "scoring": json.dumps(lm.scoring_settings(), sort_keys=True),
        "alignment": json.dumps(lm.alignment_settings(), sort_keys=True),
        "generation": json.dumps(
            {"golden": spec.golden.enabled, "max_new_tokens": spec.golden.max_new_tokens, "top_k": spec.golden.top_k, "decoding": "greedy"},
            sort_keys=True,
        ),
        "limits": json.dumps(asdict(engine.limits), sort_keys=True),
    }


def evaluate_side(
    engine: Engine, spec: EvaluationSpec, *, side: str, golden_reference: list[GoldenOutput] | None = None
) -> EvalResults:
    """Evaluate one side. The candidate's golden prompts are teacher-forced along the baseline's
    outputs, so pass the baseline's `golden` as `golden_reference` for the candidate."""
    from quantgate.evaluation.golden import run_golden
    from quantgate.evaluation.suites import evaluate_tasks

    if side not in ("baseline", "candidate"):
        raise ValueError(f"side must be 'baseline' or 'candidate', not {side!r}")
    t0 = time.perf_counter()
    tasks = evaluate_tasks(engine, spec, side=side)
    t_tasks = time.perf_counter() - t0
    errors: list[str] = []
    golden: list[GoldenOutput] = []
    t_golden = 0.0
    if spec.golden.enabled:
        if side == "candidate" and golden_reference is None:
            raise StageError("evaluate", "the candidate's golden prompts need the baseline's golden outputs as reference")
        t1 = time.perf_counter()
        try:
            golden = run_golden(engine, spec, reference=golden_reference)
        except StageError as err:
            if "has no golden prompts" not in str(err):
                raise
            errors.append(str(err))
        t_golden = time.perf_counter() - t1
    total = time.perf_counter() - t0
    toks = sum(t.tokens_scored for t in tasks.values())
    engine_s = sum(t.seconds for t in tasks.values())
    log.info(
        "%s: %d tasks, %d tokens scored in %.1f s of engine time (%.0f tokens/s); golden %.1f s; total %.1f s",
        side, len(tasks), toks, engine_s, toks / engine_s if engine_s else 0.0, t_golden, total,
    )
    timings = {f"task:{name}": t.seconds for name, t in tasks.items()}
    timings.update({"tasks": round(t_tasks, 3), "golden": round(t_golden, 3), "total": round(total, 3)})
    return EvalResults(
        side=side,  # type: ignore[arg-type]
        tasks=tasks,
        golden=golden,
        comparability=comparability(engine, spec, list(tasks)),
        errors=errors,
        timings=timings,
    )
