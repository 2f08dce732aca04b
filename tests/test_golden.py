"""Golden-prompt comparison: crafted outputs with known answers, top-k KL vs a direct computation,
report escaping, and a real run on the tiny model."""

from __future__ import annotations

import math
import random

import pytest

from quantgate.evaluation.golden import (
    compare_golden,
    first_divergence,
    golden_diff_html,
    golden_diff_markdown,
    kl_topk,
)
from quantgate.evaluation.results import GoldenOutput


def _dist(rng: random.Random, n: int, temp: float = 1.0) -> list[float]:
    logits = [rng.gauss(0, 3) / temp for _ in range(n)]
    m = max(logits)
    z = math.log(sum(math.exp(x - m) for x in logits)) + m
    return [x - z for x in logits]  # log-probs


def _topk(logprobs: list[float], k: int) -> tuple[list[int], list[float]]:
    ids = sorted(range(len(logprobs)), key=lambda i: -logprobs[i])[:k]
    return ids, [logprobs[i] for i in ids]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(math.exp(a) * (a - b) for a, b in zip(p, q, strict=True))


def _out(gid: str, output: list[int], dists: list[list[float]], k: int, text: str | None = None) -> GoldenOutput:
    tops = [_topk(d, k) for d in dists]
    return GoldenOutput(
        id=gid, prompt=f"prompt {gid}", prompt_ids=[1, 2, 3], output_ids=output,
        output_text=text if text is not None else " ".join(map(str, output)),
        ref_top_ids=[t[0] for t in tops], ref_top_logprobs=[t[1] for t in tops],
        ref_token_logprobs=[d[o] for d, o in zip(dists, output, strict=False)],
    )


def test_identical_outputs():
    rng = random.Random(0)
    dists = [_dist(rng, 50) for _ in range(6)]
    b = _out("a", [4, 8, 15, 16, 23, 42], dists, k=10)
    s = compare_golden([b], [b.model_copy(deep=True)])
    r = s.records[0]
    assert r.exact_match and r.first_divergence is None
    assert r.prefix_agreement == 1.0 and r.token_agreement == 1.0 and r.top1_agreement == 1.0
    assert r.mean_kl == pytest.approx(0.0, abs=1e-12)
    assert s.exact_match_rate == 1.0 and s.mean_kl == pytest.approx(0.0, abs=1e-12)


def test_known_divergence():
    assert first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # a prefix diverges where it ends
    assert first_divergence([1, 2], [1, 2]) is None
    rng = random.Random(1)
    dists = [_dist(rng, 30) for _ in range(4)]
    base = _out("x", [1, 2, 3, 4], dists, k=30)
    cand = _out("x", [1, 2, 9, 4], dists, k=30)
    r = compare_golden([base], [cand]).records[0]
    assert not r.exact_match
    assert r.first_divergence == 2
    assert r.prefix_agreement == pytest.approx(0.5)
    assert r.token_agreement == pytest.approx(0.75)
    assert r.n_tokens == 4
    shorter = _out("x", [1, 2, 3], dists, k=30)  # its own output is shorter; it is scored along the baseline's 4 tokens
    r2 = compare_golden([base], [shorter]).records[0]
    assert r2.first_divergence == 3 and r2.prefix_agreement == pytest.approx(0.75)
    # A candidate scored at fewer positions than the baseline's tokens (no top-k from its engine,
    # a truncated record) is an error, not KL 0 / top-1 agreement 1 over nothing.
    for unscored in (_out("x", [1, 2, 3, 4], [], k=30), _out("x", [1, 2, 3, 4], dists[:3], k=30)):
        with pytest.raises(ValueError, match="did not score every position"):
            compare_golden([base], [unscored])


def test_kl_matches_direct_computation():
    rng = random.Random(2)
    for _ in range(20):
        p, q = _dist(rng, 40), _dist(rng, 40)
        # the whole vocabulary in the "top-k": exact
        assert kl_topk(*_topk(p, 40), *_topk(q, 40)) == pytest.approx(_kl(p, q), rel=1e-9, abs=1e-12)
        # truncated lists: a lower bound of the true KL, at least the common-partition value
        # (shared ids + one bucket for everything else)
        pi, pl = _topk(p, 8)
        qi, ql = _topk(q, 8)
        common = set(pi) & set(qi)
        pt = 1 - sum(math.exp(p[i]) for i in common)
        qt = 1 - sum(math.exp(q[i]) for i in common)
        coarse = sum(math.exp(p[i]) * (p[i] - q[i]) for i in common) + (pt * math.log(pt / qt) if pt > 0 else 0.0)
        got = kl_topk(pi, pl, qi, ql)
        assert coarse - 1e-12 <= got <= _kl(p, q) + 1e-12


def test_kl_of_top_k_lists_that_share_nothing_is_not_zero():
    """Two distributions that put their mass on different ids: the common-partition value is 0
    (one bucket holds everything); the bound must still see them apart."""
    vocab = 200
    p = [math.log(0.9 / 10)] * 10 + [math.log(0.1 / (vocab - 10))] * (vocab - 10)
    q = [math.log(0.1 / (vocab - 10))] * 10 + [math.log(0.1 / (vocab - 10))] * 90 + [math.log(0.9 / 100)] * 100
    q = [x - math.log(sum(math.exp(y) for y in q)) for x in q]
    pi, pl = _topk(p, 10)
    qi, ql = _topk(q, 10)
    assert not set(pi) & set(qi)
    got = kl_topk(pi, pl, qi, ql)
    assert 1.0 < got <= _kl(p, q) + 1e-12


def test_summary_kl_is_position_weighted():
    rng = random.Random(3)
    p1 = [_dist(rng, 20) for _ in range(3)]
    q1 = [_dist(rng, 20) for _ in range(3)]
    p2 = [_dist(rng, 20)]
    base = [_out("a", [0, 1, 2], p1, 20), _out("b", [5], p2, 20)]
    cand = [_out("a", [0, 1, 2], q1, 20), _out("b", [5], p2, 20)]
    s = compare_golden(base, cand)
    direct = [_kl(p, q) for p, q in zip(p1, q1, strict=True)] + [0.0]
    assert s.mean_kl == pytest.approx(sum(direct) / 4, rel=1e-9)
    assert s.records[0].mean_kl == pytest.approx(sum(direct[:3]) / 3, rel=1e-9)
    with pytest.raises(ValueError):
        compare_golden(base, cand[:1])


def test_summary_rebuilt_from_records_matches():
    """`quantgate gate` re-derives the aggregates from the per-prompt records (issue 10)."""
    from quantgate.evaluation.golden import summary_from_records

    rng = random.Random(5)
    p = [_dist(rng, 20) for _ in range(4)]
    q = [_dist(rng, 20) for _ in range(4)]
    base = [_out("a", [0, 1, 2], p[:3], 20), _out("b", [5], p[3:], 20), _out("c", [], [], 20)]
    cand = [_out("a", [0, 1, 3], q[:3], 20), _out("b", [5], q[3:], 20), _out("c", [], [], 20)]
    s = compare_golden(base, cand)
    assert [r.n_positions for r in s.records] == [3, 1, 0]
    again = summary_from_records(s.records)
    for f in ("exact_match_rate", "mean_prefix_agreement", "mean_token_agreement", "mean_kl", "top1_agreement"):
        assert getattr(again, f) == pytest.approx(getattr(s, f), rel=1e-12), f


def test_reports_escape_and_highlight():
    rng = random.Random(4)
    d = [_dist(rng, 10) for _ in range(3)]
    base = _out("<id&1>", [1, 2, 3], d, 10, text="<script>alert(1)</script> same ``` end")
    cand = _out("<id&1>", [1, 2, 4], d, 10, text="<script>alert(1)</script> diff")
    s = compare_golden([base], [cand])
    page = golden_diff_html(s)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;id&amp;1&gt;" in page
    assert '<mark class="b">same ``` end</mark>' in page and '<mark class="c">diff</mark>' in page
    md = golden_diff_markdown(s)
    assert "diverges at token 2" in md
    assert "````text" in md  # fence longer than the ``` inside the output


def test_run_golden_on_tiny_model(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine
    from quantgate.evaluation.golden import encode_prompt, run_golden
    from quantgate.recipe import EvaluationSpec

    suite = tmp_path / "g"
    suite.mkdir()
    (suite / "suite.yaml").write_text("name: g\ngolden: golden.jsonl\ntasks: {}\n")
    (suite / "golden.jsonl").write_text('{"id": "p1", "prompt": "The for statement"}\n{"id": "p2", "prompt": "Explain classes."}\n')
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = TorchEngine.from_model(model, tok, EngineLimits(4, 128, 160), device="cpu")
    spec = EvaluationSpec(suite=str(suite), golden={"max_new_tokens": 8, "top_k": 5})
    ids = encode_prompt(tok, "The for statement")
    assert tok.decode(ids).startswith("<|im_start|>user\n")  # chat template applied
    base = run_golden(engine, spec, reference=None)
    for g in base:
        n = len(g.output_ids)
        assert len(g.ref_top_ids) == len(g.ref_token_logprobs) == n and all(len(t) == 5 for t in g.ref_top_ids)
        # teacher-forced along its own greedy output: each generated token is the top-1
        assert [t[0] for t in g.ref_top_ids] == g.output_ids
    cand = run_golden(engine, spec, reference=base)
    s = compare_golden(base, cand)
    assert s.exact_match_rate == 1.0 and s.mean_kl < 1e-6 and s.top1_agreement == 1.0


def test_golden_rows_fill_one_batch_of_tokens():
    from quantgate.engines.base import EngineLimits
    from quantgate.evaluation.golden import golden_rows

    lim = EngineLimits(max_batch_size=8, max_input_len=2048, max_seq_len=2304)
    assert golden_rows(lim, [60] * 24, 48) == 24  # short prompts: all in one batch
    assert golden_rows(lim, [60] * 500, 48) == 8 * 2304 // 108  # capped by one batch's tokens
    assert golden_rows(lim, [2000, 10], 256) == 8  # long prompts: never below max_batch_size
    assert golden_rows(lim, [2000] * 3, 256) == 8
    assert golden_rows(lim, [], 48) == 8


def test_generate_rows_per_batch_keep_the_tokens(tiny_model_dir):
    """More rows per batch (max_rows) changes how prompts are grouped, not what is generated."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.engines.base import EngineLimits
    from quantgate.engines.torch_engine import TorchEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = TorchEngine.from_model(model, tok, EngineLimits(2, 128, 160), device="cpu")
    prompts = [tok.encode(t) for t in ("The for statement", "Explain classes to me.", "A list", "def f(x):", "while True")]
    calls: list[int] = []
    real = model.generate

    def counting(*a, **k):
        calls.append(int(k["input_ids"].shape[0]))
        return real(*a, **k)

    model.generate = counting  # type: ignore[method-assign]
    by_two = engine.generate(prompts, 10)
    assert calls == [2, 2, 1]
    calls.clear()
    at_once = engine.generate(prompts, 10, max_rows=5)
    assert calls == [5]
    assert [g.token_ids for g in at_once] == [g.token_ids for g in by_two]
    assert [g.text for g in at_once] == [g.text for g in by_two]
