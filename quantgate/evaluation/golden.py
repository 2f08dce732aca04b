"""Golden prompts: greedy outputs of baseline and candidate, compared token by token.

Each side generates greedily; then it is teacher-forced along the BASELINE's output (the baseline
along its own) and keeps the top-k log-probs at every position. `compare_golden` is pure: exact
match, first divergence, prefix/token agreement, top-1 agreement and KL(baseline || candidate).

KL from top-k lists (an approximation, documented here and in the report): at each position the
ids that appear in BOTH sides' top-k lists keep their own probabilities; every other id -- those
in only one list (unknown on the other side) and the rest of the vocabulary -- is pooled into one
tail bucket whose mass is 1 - sum(known probabilities) on each side. KL on this common coarser
partition is a LOWER bound of the true KL (coarsening never increases KL), and exact when the
top-k lists hold (nearly) all the mass -- the usual case for a confident next-token distribution.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.engines.base import EngineLimits, Generation, ScoreRequest
from quantgate.errors import StageError
from quantgate.evaluation.results import GoldenOutput, GoldenRecord, GoldenSummary

if TYPE_CHECKING:
    from quantgate.engines.base import Engine
    from quantgate.recipe import EvaluationSpec

log = logging.getLogger(__name__)

TAIL_FLOOR = 1e-10  # a tail the candidate thinks empty still gets this mass: KL stays finite


# ---- prompts -----------------------------------------------------------------------------------


def load_golden(path: Path) -> list[dict[str, str]]:
    items, seen = [], set()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            gid, prompt = str(rec["id"]), str(rec["prompt"])
        except (ValueError, KeyError, TypeError) as err:
            raise StageError("evaluate", f"{path}:{n}: expected a JSON object with 'id' and 'prompt' ({err})") from err
        if gid in seen:
            raise StageError("evaluate", f"{path}:{n}: duplicate golden id {gid!r}")
        seen.add(gid)
        items.append({"id": gid, "prompt": prompt})
    return items


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Chat models get their chat template (one user turn + generation prompt); others plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(text, add_special_tokens=False))  # the template has its specials
    return list(tokenizer.encode(prompt))


def _golden_prompts(spec: EvaluationSpec) -> list[dict[str, str]]:
    from quantgate.evaluation.suites import load_suite

    suite = load_suite(spec.suite)
    if suite.golden is None:
        raise StageError("evaluate", f"suite {suite.name!r} has no golden prompts (golden: in suite.yaml); set evaluation.golden.enabled=false")
    return load_golden(suite.golden)


# ---- running -------------------------------------------------------------------------------------


# Changes which prompts share a generation batch (so, in principle, rounding): part of the baseline key.
GOLDEN_BATCHING = "token-budget/1"


def golden_rows(limits: EngineLimits, prompt_lens: Sequence[int], max_new_tokens: int) -> int:
    """Rows per golden generation batch. Golden prompts are short, so a batch may hold more rows
    than max_batch_size within the tokens of one full batch (max_batch_size x max_seq_len, what the
    memory plan provides for), never fewer. Decode steps on a CPU cost about the same for 8 or 24
    rows (reading the weights dominates): bench/golden_batch.py."""
    if not prompt_lens:
        return limits.max_batch_size
    return limits.rows_within_batch_tokens(len(prompt_lens), max(prompt_lens) + max_new_tokens)


def run_golden(engine: Engine, spec: EvaluationSpec, *, reference: list[GoldenOutput] | None, generate: bool = True) -> list[GoldenOutput]:
    """Greedy outputs of every golden prompt, teacher-forced along `reference` (None: own output).
    generate=False (needs `reference`): teacher-forced scores only; each output is the
    reference's, as nothing was generated."""
    from tqdm import tqdm

    prompts = _golden_prompts(spec)
    ref_by_id = {r.id: r for r in reference} if reference is not None else None
    if ref_by_id is not None and set(ref_by_id) != {p["id"] for p in prompts}:
        raise StageError("evaluate", "golden prompts differ from the baseline's (suite changed?); rebuild the baseline")
    ids = [encode_prompt(engine.tokenizer, p["prompt"]) for p in prompts]
    gcfg = spec.golden
    t0 = time.perf_counter()
    if not generate and ref_by_id is None:
        raise ValueError("run_golden(generate=False) needs a reference")
    gens: list[Generation] = []
    if generate:
        step = golden_rows(engine.limits, [len(i) for i in ids], gcfg.max_new_tokens)
        bar = tqdm(total=len(ids), desc="golden: generate", disable=not _progress(), leave=False)
        for b in range(0, len(ids), step):
            gens += engine.generate(ids[b : b + step], gcfg.max_new_tokens, max_rows=step)
            bar.update(min(step, len(ids) - b))
        bar.close()
    else:
        gens = [Generation(list(ref_by_id[p["id"]].output_ids), ref_by_id[p["id"]].output_text, "reference") for p in prompts]  # type: ignore[index]
    t_gen = time.perf_counter() - t0

    outputs: list[GoldenOutput] = []
    requests, owners = [], []
    for p, pid, g in zip(prompts, ids, gens, strict=True):
        out = GoldenOutput(id=p["id"], prompt=p["prompt"], prompt_ids=pid, output_ids=list(g.token_ids), output_text=g.text)
        along = out.output_ids
        if ref_by_id is not None:
            ref = ref_by_id[p["id"]]
            if ref.prompt_ids != pid:
                raise StageError("evaluate", f"golden prompt {p['id']!r} tokenizes differently from the baseline: the tokenizers differ")
            along = ref.output_ids
        if along:
            requests.append(ScoreRequest(pid + along, len(pid)))
            owners.append(out)
        outputs.append(out)
    t1 = time.perf_counter()
    scored = engine.score(requests, top_k=gcfg.top_k) if requests else []
    for out, res in zip(owners, scored, strict=True):
        out.ref_token_logprobs = list(res.logprobs)
        out.ref_top_ids = [list(x) for x in res.top_ids or []]
        out.ref_top_logprobs = [list(x) for x in res.top_logprobs or []]
    n_tok = sum(len(o.output_ids) for o in outputs)
    if generate:
        log.info("golden: %d prompts, %d tokens generated in %.1f s (%.1f tokens/s), teacher-forced scoring %.1f s",
                 len(outputs), n_tok, t_gen, n_tok / t_gen if t_gen else 0.0, time.perf_counter() - t1)
    else:
        log.info("golden: %d prompts, teacher-forced along the reference's %d tokens in %.1f s", len(outputs), n_tok, time.perf_counter() - t1)
    return outputs


def _progress() -> bool:
    return os.environ.get("QUANTGATE_PROGRESS", "1") != "0"


# ---- comparison (pure) -------------------------------------------------------------------------


def kl_topk(p_ids: list[int], p_logprobs: list[float], q_ids: list[int], q_logprobs: list[float]) -> float:
    """A lower bound of KL(p || q) from the two top-k lists, on the partition {each id both list,
    B = p's ids that q does not list, R = the rest}. q lists its k most likely ids, so q puts at
    most |B| x (its smallest listed probability) on B; the bound is the least KL any q consistent
    with that can have. (Merging B into R instead gives 0 when the lists share nothing: two
    models that agree on nothing would read as identical.)"""
    q = dict(zip(q_ids, q_logprobs, strict=True))
    kl, p_known, q_known, p_unseen, n_unseen = 0.0, 0.0, 0.0, 0.0, 0
    for i, lp in zip(p_ids, p_logprobs, strict=True):
        lq = q.get(i)
        if lq is None:
            p_unseen += math.exp(lp)
            n_unseen += 1
            continue
        pi = math.exp(lp)
        kl += pi * (lp - lq)
        p_known += pi
        q_known += math.exp(lq)
    p_rest = max(1.0 - p_known - p_unseen, 0.0)
    q_free = max(1.0 - q_known, TAIL_FLOOR)  # q's mass on B and R together
    p_free = p_unseen + p_rest
    if p_free > 0.0:
        # KL on {B, R} is convex in q_B; its minimum is at q's split proportional to p's,
        # unless that puts more on B than q's list allows.
        q_b = q_free * p_unseen / p_free
        if n_unseen and q_logprobs:
            q_b = min(q_b, n_unseen * math.exp(min(q_logprobs)))
        q_r = max(q_free - q_b, TAIL_FLOOR)
        if p_unseen > 0.0:
            kl += p_unseen * math.log(p_unseen / max(q_b, TAIL_FLOOR))
        if p_rest > 0.0:
            kl += p_rest * math.log(p_rest / q_r)
    return max(kl, 0.0)  # rounding can leave -1e-12


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_one(base: GoldenOutput, cand: GoldenOutput) -> tuple[GoldenRecord, list[float], list[bool]]:
    if base.prompt_ids != cand.prompt_ids:
        raise ValueError(f"golden {base.id!r}: baseline and candidate saw different prompt tokens")
    a, b = base.output_ids, cand.output_ids
    fd = first_divergence(a, b)
    # share of the baseline's tokens reproduced before the first difference
    prefix = (fd if fd is not None else len(a)) / len(a) if a else float(fd is None)
    longest = max(len(a), len(b))
    token_agr = sum(x == y for x, y in zip(a, b, strict=False)) / longest if longest else 1.0
    # Both sides are scored teacher-forced along the baseline's output: one top-k list per token.
    # Fewer positions (an engine without top-k scoring, a truncated record) would make KL 0 and
    # top-1 agreement 1 over nothing, so it is an error, not agreement.
    n = len(a)
    if not (len(base.ref_top_ids) == len(cand.ref_top_ids) == n):
        raise ValueError(f"golden {base.id!r}: top-k lists at {len(base.ref_top_ids)} baseline / {len(cand.ref_top_ids)} "
                         f"candidate positions for {n} reference tokens: the engine did not score every position")
    kls = [
        kl_topk(base.ref_top_ids[t], base.ref_top_logprobs[t], cand.ref_top_ids[t], cand.ref_top_logprobs[t])
        for t in range(n)
    ]
    top1 = [bool(base.ref_top_ids[t]) and bool(cand.ref_top_ids[t]) and base.ref_top_ids[t][0] == cand.ref_top_ids[t][0] for t in range(n)]
    rec = GoldenRecord(
        id=base.id,
        prompt=base.prompt,
        baseline_text=base.output_text,
        candidate_text=cand.output_text,
        exact_match=a == b,
        first_divergence=fd,
        prefix_agreement=prefix,
        token_agreement=token_agr,
        mean_kl=sum(kls) / n if n else 0.0,
        top1_agreement=sum(top1) / n if n else 1.0,
        n_tokens=len(a),
        n_positions=n,
    )
    return rec, kls, top1


def summary_from_records(records: list[GoldenRecord]) -> GoldenSummary:
    """The aggregates `compare_golden` reports, rebuilt from per-prompt records alone: KL and top-1
    agreement weighted by each record's teacher-forced positions (n_positions; n_tokens for
    records stored before that field existed), the rest averaged over prompts."""
    n = len(records)
    weights = [r.n_positions if r.n_positions is not None else r.n_tokens for r in records]
    total = sum(weights)
    return GoldenSummary(
        records=list(records),
        exact_match_rate=sum(r.exact_match for r in records) / n if n else 1.0,
        mean_prefix_agreement=sum(r.prefix_agreement for r in records) / n if n else 1.0,
        mean_token_agreement=sum(r.token_agreement for r in records) / n if n else 1.0,
        mean_kl=sum(r.mean_kl * w for r, w in zip(records, weights, strict=True)) / total if total else 0.0,
        top1_agreement=sum(r.top1_agreement * w for r, w in zip(records, weights, strict=True)) / total if total else 1.0,
    )


def compare_golden(baseline: list[GoldenOutput], candidate: list[GoldenOutput]) -> GoldenSummary:
    """Per-prompt and overall agreement. Aggregate KL and top-1 agreement are averaged over all
    teacher-forced positions (token-weighted); the other aggregates over prompts."""
    cand = {c.id: c for c in candidate}
    missing = [b.id for b in baseline if b.id not in cand]
    if missing or len(cand) != len(baseline):
        raise ValueError(f"golden outputs do not pair up (missing in candidate: {missing[:5]})")
    records, all_kl, all_top1 = [], [], []
    for b in baseline:
        rec, kls, top1 = compare_one(b, cand[b.id])
        records.append(rec)
        all_kl += kls
        all_top1 += top1
    n = len(records)
    return GoldenSummary(
        records=records,
        exact_match_rate=sum(r.exact_match for r in records) / n if n else 1.0,
        mean_prefix_agreement=sum(r.prefix_agreement for r in records) / n if n else 1.0,
        mean_token_agreement=sum(r.token_agreement for r in records) / n if n else 1.0,
        mean_kl=sum(all_kl) / len(all_kl) if all_kl else 0.0,
        top1_agreement=sum(all_top1) / len(all_top1) if all_top1 else 1.0,
    )


# ---- reports ------------------------------------------------------------------------------------


def _split_at_divergence(a: str, b: str) -> tuple[str, str, str]:
    """(common prefix, rest of a, rest of b) by characters: where a reader sees them part."""
    i = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        i += 1
    return a[:i], a[i:], b[i:]


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so the text cannot close it."""
    longest, cur = 0, 0
    for ch in text:
        cur = cur + 1 if ch == "`" else 0
        longest = max(longest, cur)
    run = max(3, longest + 1)
    return "`" * run


def golden_diff_markdown(summary: GoldenSummary) -> str:
    s = summary
    lines = [
        "## Golden prompts: baseline vs candidate",
        "",
        f"{sum(r.exact_match for r in s.records)}/{len(s.records)} identical outputs · exact match {s.exact_match_rate:.1%} · "
        f"prefix agreement {s.mean_prefix_agreement:.1%} · token agreement {s.mean_token_agreement:.1%} · "
        f"top-1 agreement {s.top1_agreement:.1%} · mean KL {s.mean_kl:.4f} nats",
        "",
        "| id | exact | first divergence | prefix agr. | token agr. | top-1 agr. | mean KL | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s.records:
        fd = "—" if r.first_divergence is None else str(r.first_divergence)
        rid = r.id.replace("|", "\\|")
        lines.append(
            f"| {rid} | {'yes' if r.exact_match else '**no**'} | {fd} | {r.prefix_agreement:.0%} | {r.token_agreement:.0%} | "
            f"{r.top1_agreement:.0%} | {r.mean_kl:.4f} | {r.n_tokens} |"
        )
    diverged = [r for r in s.records if not r.exact_match]
    if diverged:
        lines += ["", "### Outputs that differ", "", "`⟦` marks where the texts part."]
    for r in diverged:
        common, rest_b, rest_c = _split_at_divergence(r.baseline_text, r.candidate_text)
        b_text, c_text = common + "⟦" + rest_b, common + "⟦" + rest_c
        fence = _fence(r.prompt + b_text + c_text)
        lines += [
            "",
            f"#### {r.id} (diverges at token {r.first_divergence}, KL {r.mean_kl:.4f})",
            "",
            "Prompt:", fence + "text", r.prompt, fence,
            "Baseline:", fence + "text", b_text, fence,
            "Candidate:", fence + "text", c_text, fence,
        ]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;width:100%;margin-bottom:1.5rem}
th,td{border:1px solid #ccc;padding:.4rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3}
td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em;width:36%}
tr.same td.id{border-left:4px solid #3a3}
tr.diff td.id{border-left:4px solid #d33}
mark.b{background:#cde3ff}
mark.c{background:#ffd0d0}
.metrics{font-size:.85em;color:#555;white-space:nowrap}
"""


def golden_diff_html(summary: GoldenSummary, title: str = "Golden prompts: baseline vs candidate") -> str:
    """A self-contained page: aggregates, then per prompt the baseline and candidate side by side
    with the text after the point where they part highlighted. All text is HTML-escaped."""
    e = html.escape
    s = summary
    head = (
        f"<p>{sum(r.exact_match for r in s.records)}/{len(s.records)} identical outputs · exact match {s.exact_match_rate:.1%} · "
        f"prefix agreement {s.mean_prefix_agreement:.1%} · token agreement {s.mean_token_agreement:.1%} · "
        f"top-1 agreement {s.top1_agreement:.1%} · mean KL(baseline‖candidate) {s.mean_kl:.4f} nats</p>"
    )
    rows = []
    for r in s.records:
        common, rest_b, rest_c = _split_at_divergence(r.baseline_text, r.candidate_text)
        b_html = e(common) + (f'<mark class="b">{e(rest_b)}</mark>' if rest_b else "")
        c_html = e(common) + (f'<mark class="c">{e(rest_c)}</mark>' if rest_c else "")
        fd = "identical" if r.first_divergence is None else f"diverges at token {r.first_divergence}"
        metrics = (
            f"{fd}<br>prefix {r.prefix_agreement:.0%} · tokens {r.token_agreement:.0%}<br>"
            f"top-1 {r.top1_agreement:.0%} · KL {r.mean_kl:.4f}<br>{r.n_tokens} tokens"
        )
        rows.append(
            f'<tr class="{"same" if r.exact_match else "diff"}"><td class="id">{e(r.id)}<div class="metrics">{metrics}</div></td>'
            f'<td class="text">{e(r.prompt)}</td><td class="text">{b_html}</td><td class="text">{c_html}</td></tr>'
        )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1>{head}"
        "<table><thead><tr><th>prompt id</th><th>prompt</th><th>baseline</th><th>candidate</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>\n"
    )
