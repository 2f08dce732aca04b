"""Known-answer tests of quantgate.stats against scipy and closed forms, plus simulations of the
non-inferiority check's false-pass rate at the margin."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as sps

from quantgate import stats


def _pairs(b: int, c: int, n: int, acc: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """0/1 arrays with exactly b right->wrong and c wrong->right flips."""
    base = np.zeros(n)
    base[: int(acc * n)] = 1
    cand = base.copy()
    cand[np.flatnonzero(base == 1)[:b]] = 0
    cand[np.flatnonzero(base == 0)[:c]] = 1
    return base, cand


# ---- McNemar -------------------------------------------------------------------------------


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (12, 5), (150, 86), (7, 7), (1, 20)])
def test_mcnemar_exact_matches_scipy_binomtest_and_closed_form(b, c):
    p = stats.mcnemar_exact_p(b, c)
    if b + c == 0:
        assert p == 1.0
        return
    assert p == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    # Closed form of the two-sided exact McNemar test: 2 * P(X <= min(b, c)), capped at 1.
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    assert p == pytest.approx(min(1.0, 2 * tail), rel=1e-9)
    assert stats.mcnemar_exact_p_one_sided(b, c) == pytest.approx(
        sps.binomtest(b, m, 0.5, alternative="greater").pvalue, rel=1e-12
    )


def test_mcnemar_textbook_value():
    # Agresti's presidential-approval table (794, 150, 86, 570): McNemar z^2 = 17.36; the exact
    # p-value is of the same order as the chi-square one (~3e-5).
    p = stats.mcnemar_exact_p(150, 86)
    chi2_p = sps.chi2.sf((150 - 86) ** 2 / (150 + 86), 1)
    assert chi2_p == pytest.approx(3.09e-5, rel=0.02)
    assert 1e-5 < p < 1e-4


def test_flip_counts():
    base, cand = _pairs(7, 3, 100)
    assert stats.flip_counts(base, cand) == (7, 3, 100)
    with pytest.raises(ValueError):
        stats.flip_counts([0.5, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        stats.flip_counts([1.0, float("nan")], [1.0, 1.0])


# ---- Tango score interval --------------------------------------------------------------------


def test_tango_known_answer_bentur():
    # Bentur et al. (2009) airway data, n = [[1, 1], [7, 12]], as used for the Tango interval in
    # Fagerland, Lydersen & Laake (2014): estimate -0.286, 95 % CI -0.517 to -0.026.
    low, high = stats.tango_interval(1, 7, 21, confidence=0.975)
    assert low == pytest.approx(-0.5172, abs=5e-4)
    assert high == pytest.approx(-0.0260, abs=5e-4)


def _score_stat_numerical(b: int, c: int, n: int, delta: float) -> float:
    """Score statistic with the restricted MLE found numerically (independent of Tango's closed form)."""
    nc = n - b - c

    def negll(q: float) -> float:
        p12, p21 = q + delta, q
        rest = 1 - p12 - p21
        return -(b * math.log(p12) + c * math.log(p21) + nc * math.log(rest))

    lo = max(0.0, -delta) + 1e-12
    hi = (1 - delta) / 2 - 1e-12
    q = optimize.minimize_scalar(negll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-14}).x
    return (b - c - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.parametrize("b,c,n", [(40, 20, 160), (1, 7, 21), (12, 30, 500), (3, 1, 1000)])
def test_tango_bounds_solve_the_score_equation(b, c, n):
    conf = 0.95
    z = sps.norm.ppf(conf)
    low, high = stats.tango_interval(b, c, n, conf)
    assert low < (b - c) / n < high
    assert _score_stat_numerical(b, c, n, low) == pytest.approx(z, abs=2e-4)
    assert _score_stat_numerical(b, c, n, high) == pytest.approx(-z, abs=2e-4)
    # The vectorized statistic agrees with the numerical MLE away from the bounds, too.
    for d in (low / 2 + high / 2, (b - c) / n + 0.01):
        assert float(stats.tango_score_statistic(b, c, n, d)) == pytest.approx(
            _score_stat_numerical(b, c, n, d), abs=1e-5
        )


def test_tango_without_discordant_pairs_is_not_degenerate():
    # With b = c = 0 the bound is z^2 / (n + z^2) (a score-interval "rule of three"), not 0.
    n, conf = 50, 0.95
    z = sps.norm.ppf(conf)
    low, high = stats.tango_interval(0, 0, n, conf)
    assert high == pytest.approx(z**2 / (n + z**2), rel=1e-6)
    assert low == pytest.approx(-high, rel=1e-6)
    assert stats.tango_interval(10, 0, 10, conf)[1] == 1.0


def test_wald_interval_closed_form():
    low, high = stats.wald_paired_interval(30, 10, 400, 0.975)
    d, psi = 20 / 400, 40 / 400
    se = math.sqrt((psi - d * d) / 400)
    assert (low, high) == pytest.approx((d - 1.959964 * se, d + 1.959964 * se), rel=1e-5)


def test_paired_binary_direction_and_fields():
    base, cand = _pairs(9, 2, 300)
    up = stats.paired_binary(base, cand, higher_is_better=True)
    assert (up.flips_bad, up.flips_good, up.n) == (9, 2, 300)
    assert up.worsening == pytest.approx(7 / 300)
    assert up.baseline - up.candidate == pytest.approx(up.worsening)
    assert up.p_value == pytest.approx(sps.binomtest(9, 11, 0.5).pvalue)
    assert up.rel_worsening == pytest.approx(up.worsening / up.baseline)
    down = stats.paired_binary(base, cand, higher_is_better=False)  # an error-rate-like metric
    assert down.worsening == pytest.approx(-up.worsening)
    assert (down.flips_bad, down.flips_good) == (2, 9)


# ---- bootstrap and t-test --------------------------------------------------------------------


def test_paired_bootstrap_is_seeded_and_close_to_tango():
    rng = np.random.default_rng(3)
    base = (rng.random(2000) < 0.6).astype(float)
    cand = base.copy()
    flip = rng.random(2000) < 0.08
    cand[flip] = 1 - cand[flip]
    a = stats.paired_bootstrap_mean(base, cand, samples=1000, seed=7)
    b = stats.paired_bootstrap_mean(base, cand, samples=1000, seed=7)
    c = stats.paired_bootstrap_mean(base, cand, samples=1000, seed=8)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    t = stats.paired_binary(base, cand)
    assert a.worsening == pytest.approx(t.worsening)
    assert a.high == pytest.approx(t.high, abs=0.004)
    assert a.low == pytest.approx(t.low, abs=0.004)
    assert a.p_value == pytest.approx(sps.ttest_rel(base, cand).pvalue, rel=1e-12)


def test_paired_bootstrap_non_binary_scores():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    cand = np.clip(base - 0.05 + rng.normal(0, 0.05, 400), 0, 1)
    est = stats.paired_bootstrap_mean(base, cand, samples=500, seed=0)
    diff = base - cand
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert est.worsening == pytest.approx(diff.mean())
    assert est.se == pytest.approx(se, rel=0.15)
    assert est.low > 0


# ---- corpus metrics -------------------------------------------------------------------------


def test_corpus_metrics_known_answers():
    ll = [-100.0, -250.0, -50.0]
    words, nbytes, tokens = [20, 60, 20], [100, 300, 100], [30, 80, 25]
    assert stats.corpus_metric(ll, words, nbytes, tokens, "word_perplexity") == pytest.approx(math.exp(400 / 100))
    assert stats.corpus_metric(ll, words, nbytes, tokens, "byte_perplexity") == pytest.approx(math.exp(400 / 500))
    assert stats.corpus_metric(ll, words, nbytes, tokens, "bits_per_byte") == pytest.approx(400 / 500 / math.log(2))
    assert stats.corpus_metric(ll, words, nbytes, tokens, "token_perplexity") == pytest.approx(math.exp(400 / 135))
    with pytest.raises(ValueError):
        stats.corpus_metric(ll, None, nbytes, tokens, "word_perplexity")
    with pytest.raises(ValueError):
        stats.corpus_metric(ll, words, nbytes, tokens, "rouge")


def _docs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    words = rng.integers(100, 600, n)
    ll = -words * rng.normal(3.0, 0.3, n)
    return ll, words


def test_paired_corpus_direction_seed_and_pvalue():
    ll, words = _docs(80)
    rng = np.random.default_rng(1)
    worse = ll * 1.02 + rng.normal(0, 2, ll.size)  # lower loglikelihood -> higher perplexity
    est = stats.paired_corpus(ll, worse, "word_perplexity", base_words=words, cand_words=words, samples=800, seed=5)
    again = stats.paired_corpus(ll, worse, "word_perplexity", base_words=words, cand_words=words, samples=800, seed=5)
    assert est == again
    assert est.candidate > est.baseline and est.worsening > 0 and est.low > 0
    assert est.baseline == pytest.approx(math.exp(-ll.sum() / words.sum()))
    assert est.rel_worsening == pytest.approx(est.candidate / est.baseline - 1)
    assert est.p_value == pytest.approx(sps.ttest_rel(ll, worse).pvalue, rel=1e-12)
    assert est.flips_bad > est.flips_good
    same = stats.paired_corpus(ll, ll, "bits_per_byte", base_bytes=words * 5, cand_bytes=words * 5, samples=200)
    assert (same.worsening, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


# ---- power ---------------------------------------------------------------------------------


def test_mdd_unpaired_matches_trtllm_mmlu():
    # TensorRT-LLM accuracy CI: MMLU, n = 4096, alpha 0.05, beta 0.2, sigma 50 on 0-100 -> 2.75 pp.
    assert 100 * stats.mdd_unpaired(4096, 0.5, 0.95, 0.8) == pytest.approx(2.75, abs=0.01)
    assert stats.items_needed_unpaired(stats.mdd_unpaired(4096)) == pytest.approx(4096, abs=1)


@pytest.mark.parametrize("n,psi", [(200, 0.1), (1000, 0.05), (4096, 0.2)])
def test_mdd_paired_solves_connor_and_beats_unpaired(n, psi):
    d = stats.mdd_paired(n, psi)
    za, zb = sps.norm.ppf(0.95), sps.norm.ppf(0.8)
    assert math.sqrt(n) * d == pytest.approx(za * math.sqrt(psi) + zb * math.sqrt(psi - d * d), rel=1e-9)
    assert d < stats.mdd_unpaired(n)
    assert stats.items_needed_paired(d, psi) == pytest.approx(n, rel=0.05)
    assert stats.items_needed_paired(0.02, psi, drop=0.03) is None


def test_mdd_paired_edges_and_detection_sample_size():
    assert stats.mdd_paired(100, 0.02) == math.inf  # even "every flip bad" is not detectable
    assert stats.mdd_paired(100, 0.0) == math.inf
    d = stats.mdd_paired(1000, 0.1)
    # Connor's n for H0: drop 0 vs a true drop d is the inverse of the MDD.
    assert stats.items_needed_to_detect(d, 0.1) == pytest.approx(1000, abs=1)
    assert stats.items_needed_to_detect(0.0, 0.1) is None


def test_items_to_resolve_dispatch():
    base = np.r_[np.ones(600), np.zeros(400)]
    cand = base.copy()
    cand[:30] = 0
    cand[600:610] = 1
    est = stats.paired_binary(base, cand)  # drop 0.02, discordance 0.04
    assert stats.items_to_resolve(est, 0.03) == stats.items_needed_paired(0.03, 0.04, 0.02)
    assert stats.items_to_resolve(est, 0.01) == stats.items_needed_to_detect(0.02, 0.04)
    boot = stats.paired_bootstrap_mean(base, cand, samples=300)
    assert stats.items_to_resolve(boot, 0.03) == stats.items_needed_from_se(1000, boot.se, 0.01)


def test_items_needed_from_se_scales_as_inverse_square():
    n1 = stats.items_needed_from_se(100, 0.02, 0.01)
    n2 = stats.items_needed_from_se(100, 0.02, 0.005)
    assert n2 == pytest.approx(4 * n1, rel=0.01)
    assert stats.items_needed_from_se(100, 0.02, 0.0) is None


def test_power_table_shape():
    rows = stats.power_table()
    assert [r["n"] for r in rows] == [100, 200, 500, 1000, 4096]
    assert all(r["paired@0.1"] < r["unpaired@p=0.5"] for r in rows)


# ---- simulations: false-pass rate of the non-inferiority check at the margin -----------------


def test_false_pass_rate_at_margin_binary_is_about_alpha():
    """True drop exactly at the margin: the check must pass about alpha of the time (not more)."""
    rng = np.random.default_rng(12345)
    n, psi, margin, conf, reps = 400, 0.10, 0.03, 0.95, 200_000
    p_bad, p_good = (psi + margin) / 2, (psi - margin) / 2
    counts = rng.multinomial(n, [p_bad, p_good, 1 - psi], size=reps)
    b, c = counts[:, 0], counts[:, 1]
    # "upper bound < margin" is exactly "T(margin) < -z" for the (decreasing) score statistic.
    passed = stats.tango_score_statistic(b, c, n, margin) < -sps.norm.ppf(conf)
    rate = passed.mean()
    assert 0.035 < rate < 0.065, rate
    # ...and the scalar interval the gate uses agrees with the vectorized test.
    for i in range(0, 2000, 97):
        assert (stats.tango_interval(int(b[i]), int(c[i]), n, conf)[1] < margin) == bool(passed[i])


def test_false_pass_rate_at_margin_corpus_bootstrap():
    """Perplexity check: relative worsening truly at the margin; bootstrap passes ~alpha."""
    rng = np.random.default_rng(7)
    n_docs, reps, margin = 120, 300, 0.02
    words = rng.integers(100, 600, n_docs)
    passes = 0
    for _ in range(reps):
        nll = rng.normal(3.0, 0.3, n_docs)
        base = -words * nll
        # Per-word NLL up by log(1 + margin) on average, with per-document noise.
        cand = -words * (nll + math.log1p(margin) + rng.normal(0, 0.02, n_docs))
        est = stats.paired_corpus(base, cand, "word_perplexity", base_words=words, cand_words=words,
                                  samples=400, seed=int(rng.integers(1 << 31)))
        passes += est.rel_high < margin
    rate = passes / reps
    # alpha 0.05; the simulation s.e. is ~0.013 and the percentile bootstrap runs slightly liberal
    # at ~120 documents (0.062 over 1000 repetitions).
    assert 0.01 < rate < 0.12, rate
