"""Paired statistics for the gate: pure functions over per-item arrays (numpy + scipy only).

Conventions used everywhere in this module:

* **Worsening** is signed so that positive = the candidate is worse, in the metric's own units:
  `baseline - candidate` for higher-is-better metrics (accuracy), `candidate - baseline` for
  lower-is-better ones (perplexity, bits per byte).
* `confidence` is the level of a **one-sided** bound (0.95 -> alpha = 0.05). Intervals returned
  here are two-sided at level `2 * confidence - 1`, so `low` is the one-sided lower bound and
  `high` the one-sided upper bound at `confidence`. A non-inferiority check at margin m passes
  when `high < m`; a drop is significant when `low > 0`. Both are one-sided tests at alpha.
* Bootstraps take an explicit seed and build their own `numpy.random.Generator`, so the same
  inputs always give the same interval.

Methods:

* Binary per-item scores (accuracy): flip counts b (right->wrong) and c (wrong->right), McNemar's
  exact test (binomial on the b + c discordant pairs), and Tango's (1998) asymptotic score interval
  for the paired difference, which keeps its coverage when discordant pairs are few (and is never
  degenerate: with b = c = 0 it still gives +-z^2/(n+z^2)), unlike Wald or a percentile bootstrap.
* Non-binary per-item scores: paired bootstrap of the mean difference, paired t-test p-value.
* Corpus metrics (word/byte/token perplexity, bits per byte) from per-document (loglikelihood,
  words, bytes, tokens): paired bootstrap over documents of the absolute and relative worsening,
  paired t-test p-value on per-document log-likelihood differences.
* Power: minimum detectable drop (MDD) for the paired design (Connor 1987) and the unpaired
  two-proportion design used by TensorRT-LLM's accuracy CI; items needed to resolve a margin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ArrayLike = Sequence[float] | np.ndarray

CORPUS_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "perplexity")


@dataclass(frozen=True)
class PairedEstimate:
    """One paired comparison: point estimate, interval, test and power of the worsening."""

    method: str
    n: int
    baseline: float
    candidate: float
    worsening: float  # positive = candidate worse, metric units
    low: float  # one-sided lower bound at `confidence`
    high: float  # one-sided upper bound at `confidence`
    rel_worsening: float  # worsening / |baseline|; +-inf when the baseline is 0
    rel_low: float
    rel_high: float
    p_value: float  # two-sided test of "no difference"
    flips_bad: int  # items where the candidate got worse (right->wrong, or lower loglikelihood)
    flips_good: int
    se: float  # standard error of the worsening (metric units)
    mdd: float  # minimum detectable worsening at this n, alpha = 1 - confidence and `power`: (z_a + z_b) se
    confidence: float


# ---- small helpers ---------------------------------------------------------------------------


def z_of(confidence: float) -> float:
    """Standard-normal quantile of a one-sided level (0.95 -> 1.645)."""
    return float(stats.norm.ppf(confidence))


def _rel(x: float, base: float) -> float:
    # Relative change against |baseline|; a zero baseline makes any change infinite.
    if base != 0:
        return x / abs(base)
    return 0.0 if x == 0 else math.copysign(math.inf, x)


def _check_confidence(confidence: float, power: float | None = None) -> None:
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    if power is not None and not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}")


def _paired_arrays(base: ArrayLike, cand: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(base, dtype=float)
    c = np.asarray(cand, dtype=float)
    if b.shape != c.shape or b.ndim != 1:
        raise ValueError(f"paired arrays must be 1-D and the same length, got {b.shape} and {c.shape}")
    if b.size == 0:
        raise ValueError("no items to compare")
    if not (np.isfinite(b).all() and np.isfinite(c).all()):
        raise ValueError("non-finite per-item values")
    return b, c


def is_binary(values: ArrayLike) -> bool:
    v = np.asarray(values, dtype=float)
    return bool(np.isin(v, (0.0, 1.0)).all())


# ---- paired binary: flips, McNemar, Tango --------------------------------------------------


def flip_counts(base: ArrayLike, cand: ArrayLike) -> tuple[int, int, int]:
    """(b, c, n): b = right->wrong (1 then 0), c = wrong->right (0 then 1), n = pairs."""
    bb, cc = _paired_arrays(base, cand)
    if not (is_binary(bb) and is_binary(cc)):
        raise ValueError("flip counts need 0/1 per-item scores")
    return int(np.sum((bb == 1) & (cc == 0))), int(np.sum((bb == 0) & (cc == 1))), int(bb.size)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b successes in b + c trials at 1/2."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def mcnemar_exact_p_one_sided(b: int, c: int) -> float:
    """One-sided exact p-value for "the candidate is worse" (b > c under H1)."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="greater").pvalue)


def _tango_q(b: float, c: float, n: float, delta: np.ndarray) -> np.ndarray:
    # Restricted MLE of p21 (the wrong->right cell) under H0: p12 - p21 = delta (Tango 1998, eq. 4),
    # from the quadratic 2n q^2 - B q - c delta (1 - delta) = 0.
    big_b = b + c - (2 * n - b + c) * delta
    disc = np.maximum(big_b**2 + 8 * n * c * delta * (1 - delta), 0.0)
    return np.maximum((big_b + np.sqrt(disc)) / (4 * n), 0.0)


def tango_score_statistic(b: ArrayLike, c: ArrayLike, n: ArrayLike, delta: ArrayLike) -> np.ndarray:
    """Tango's score statistic for H0: (b - c)/n = delta. Vectorized over all arguments.

    Decreasing in delta; the one-sided non-inferiority test "worsening < m" at alpha rejects
    (i.e. passes) exactly when T(m) < -z_(1-alpha), which equals "upper bound < m".
    """
    b_, c_, n_, d_ = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (b, c, n, delta)))
    q = _tango_q(b_, c_, n_, d_)
    var = n_ * (2 * q + d_ * (1 - d_))
    num = b_ - c_ - n_ * d_
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / np.sqrt(var)
    # A zero variance happens only at the edges: 0/0 means the data sit exactly at delta.
    t = np.where(var > 0, t, np.where(num == 0, 0.0, np.copysign(np.inf, num)))
    return t


def tango_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango score interval for (b - c)/n; each bound is one-sided at `confidence`."""
    _check_confidence(confidence)
    if n <= 0 or b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c and b + c <= n > 0, got b={b} c={c} n={n}")
    z = z_of(confidence)
    est = (b - c) / n
    eps = 1e-12

    def f(delta: float, target: float) -> float:
        return float(tango_score_statistic(b, c, n, delta)) - target

    low = -1.0 if est <= -1 + eps else optimize.brentq(f, -1 + eps, est, args=(z,), xtol=1e-12)
    high = 1.0 if est >= 1 - eps else optimize.brentq(f, est, 1 - eps, args=(-z,), xtol=1e-12)
    return float(low), float(high)


def wald_paired_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Plain Wald interval for (b - c)/n (for comparison only: too narrow with few discordants)."""
    z = z_of(confidence)
    d = (b - c) / n
    se = math.sqrt(max((b + c) / n - d * d, 0.0) / n)
    return d - z * se, d + z * se


# ---- power and sample size -------------------------------------------------------------------


def mdd_paired(n: int, discordance: float, confidence: float = 0.95, power: float = 0.8) -> float:
    """Minimum detectable drop of a paired binary design (Connor 1987, normal approximation).

    Smallest true drop d such that a one-sided test at alpha = 1 - confidence detects it with
    `power`, when a share `discordance` of items flips (either way):
    sqrt(n) d = z_a sqrt(psi) + z_b sqrt(psi - d^2). The same number is (to first order) the
    smallest non-inferiority margin this sample passes with `power` when the true drop is 0.
    Returns inf when no drop is detectable (even d = psi, every flip a bad one, is not).
    """
    _check_confidence(confidence, power)
    if n <= 0:
        raise ValueError("n must be positive")
    psi = float(discordance)
    if not 0 <= psi <= 1:
        raise ValueError(f"discordance must be in [0, 1], got {psi}")
    if psi == 0:
        return math.inf
    za, zb = z_of(confidence), z_of(power)

    def g(d: float) -> float:
        return math.sqrt(n) * d - za * math.sqrt(psi) - zb * math.sqrt(max(psi - d * d, 0.0))

    if g(psi) < 0:
        return math.inf
    return float(optimize.brentq(g, 0.0, psi, xtol=1e-12))


def mdd_unpaired(n: int, p: float = 0.5, confidence: float = 0.95, power: float = 0.8) -> float:
    """Minimum detectable drop of two independent samples of n items each at accuracy p.

    theta = (z_a + z_b) sqrt(2 p (1 - p) / n): TensorRT-LLM's accuracy-CI formula (sigma = 0.5 at
    p = 0.5). Shown next to the paired MDD to say what pairing buys.
    """
    _check_confidence(confidence, power)
    return (z_of(confidence) + z_of(power)) * math.sqrt(2 * p * (1 - p) / n)


def _connor_n(null: float, alt: float, discordance: float, confidence: float, power: float) -> int | None:
    # Pairs for a one-sided test of H0: drop = null against a true drop `alt` (Connor 1987). The
    # discordance can be no smaller than the drop it carries, hence max(psi, |d|).
    gap = abs(null - alt)
    if gap <= 0:
        return None
    za, zb = z_of(confidence), z_of(power)
    var0 = max(max(discordance, abs(null)) - null**2, 1e-12)
    var1 = max(max(discordance, abs(alt)) - alt**2, 1e-12)
    return math.ceil(((za * math.sqrt(var0) + zb * math.sqrt(var1)) / gap) ** 2)


def items_needed_paired(
    margin: float, discordance: float, drop: float = 0.0, confidence: float = 0.95, power: float = 0.8
) -> int | None:
    """Paired items for a non-inferiority test at `margin` to pass with `power` if the true drop is
    `drop` (< margin), a share `discordance` of items flipping. None if drop >= margin."""
    _check_confidence(confidence, power)
    if drop >= margin:
        return None
    return _connor_n(margin, drop, discordance, confidence, power)


def items_needed_to_detect(drop: float, discordance: float, confidence: float = 0.95, power: float = 0.8) -> int | None:
    """Paired items for a one-sided test to show a true `drop` > 0 is real (lower bound > 0)."""
    _check_confidence(confidence, power)
    if drop <= 0:
        return None
    return _connor_n(0.0, drop, discordance, confidence, power)


def items_needed_unpaired(margin: float, p: float = 0.5, confidence: float = 0.95, power: float = 0.8) -> int:
    """Items per arm for the unpaired design to detect `margin` (inverse of `mdd_unpaired`)."""
    _check_confidence(confidence, power)
    return math.ceil(2 * p * (1 - p) * ((z_of(confidence) + z_of(power)) / margin) ** 2)


def items_needed_from_se(n: int, se: float, gap: float, confidence: float = 0.95, power: float = 0.8) -> int | None:
    """Items for a one-sided test to resolve `gap` with `power`, scaling the observed standard error
    as 1/sqrt(n). Used for any method (score interval or bootstrap). None if unresolvable."""
    _check_confidence(confidence, power)
    if gap <= 0 or not math.isfinite(gap) or not math.isfinite(se):
        return None
    if se <= 0:
        return n
    k = (z_of(confidence) + z_of(power)) * se / gap
    return max(1, math.ceil(n * k * k))


def items_to_resolve(est: PairedEstimate, margin: float, power: float = 0.8) -> int | None:
    """Items that would take a check out of INCONCLUSIVE with `power`, if the observed worsening
    is the truth: below the margin, items for the upper bound to fall under it; at or over the
    margin, items for the lower bound to rise above 0. Connor's paired formula for 0/1 items
    (observed discordance, at least one pair), else the standard error scaled as 1/sqrt(n)."""
    w = est.worsening
    if est.method.startswith("tango"):
        psi = max((est.flips_bad + est.flips_good) / est.n, 1.0 / est.n)
        if w < margin:
            return items_needed_paired(margin, psi, w, est.confidence, power)
        return items_needed_to_detect(w, psi, est.confidence, power)
    gap = margin - w if w < margin else w
    return items_needed_from_se(est.n, est.se, gap, est.confidence, power)


# ---- paired comparisons ----------------------------------------------------------------------


def paired_binary(
    base: ArrayLike, cand: ArrayLike, *, higher_is_better: bool = True,
    confidence: float = 0.95, power: float = 0.8,
) -> PairedEstimate:
    """Paired 0/1 scores (accuracy): Tango interval, exact McNemar p, flip counts, Connor MDD."""
    _check_confidence(confidence, power)
    bb, cc = _paired_arrays(base, cand)
    right_wrong, wrong_right, n = flip_counts(bb, cc)
    # "bad" flips are the ones that worsen the metric in its own direction.
    bad, good = (right_wrong, wrong_right) if higher_is_better else (wrong_right, right_wrong)
    worsening = (bad - good) / n
    low, high = tango_interval(bad, good, n, confidence)
    base_v, cand_v = float(bb.mean()), float(cc.mean())
    # The score interval's half-width sets the s.e. (and so the MDD): unlike the observed
    # discordance it stays honest on small samples with few or no flips.
    se = (high - low) / (2 * z_of(confidence))
    return PairedEstimate(
        method="tango-score/mcnemar-exact", n=n, baseline=base_v, candidate=cand_v,
        worsening=worsening, low=low, high=high,
        rel_worsening=_rel(worsening, base_v), rel_low=_rel(low, base_v), rel_high=_rel(high, base_v),
        p_value=mcnemar_exact_p(bad, good), flips_bad=bad, flips_good=good, se=se,
        mdd=(z_of(confidence) + z_of(power)) * se, confidence=confidence,
    )


def _bootstrap_indices(rng: np.random.Generator, n: int, samples: int, chunk: int):
    # Chunked so memory stays ~chunk * n ints whatever the number of resamples.
    done = 0
    while done < samples:
        k = min(chunk, samples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _ttest_p(base: np.ndarray, cand: np.ndarray) -> float:
    diff = cand - base
    if np.all(diff == diff[0]):  # constant differences: t undefined
        return 1.0 if diff[0] == 0 else 0.0
    if diff.size < 2:
        return 1.0
    return float(stats.ttest_rel(base, cand).pvalue)


def _quantiles(x: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(x, [1 - confidence, confidence])
    return float(lo), float(hi)


def paired_bootstrap_mean(
    base: ArrayLike, cand: ArrayLike, *, higher_is_better: bool = True, confidence: float = 0.95,
    power: float = 0.8, samples: int = 2000, seed: int = 0,
) -> PairedEstimate:
    """Paired bootstrap (percentile) of the mean difference, for per-item scores that are not 0/1
    (or as a cross-check of the binary method). p-value from the paired t-test."""
    _check_confidence(confidence, power)
    bb, cc = _paired_arrays(base, cand)
    n = bb.size
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(seed)
    base_r, cand_r = [], []
    for idx in _bootstrap_indices(rng, n, samples, chunk=max(1, 2_000_000 // n)):
        base_r.append(bb[idx].mean(axis=1))
        cand_r.append(cc[idx].mean(axis=1))
    base_s, cand_s = np.concatenate(base_r), np.concatenate(cand_r)
    w_s = sign * (base_s - cand_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_s = w_s / np.abs(base_s)
    base_v, cand_v = float(bb.mean()), float(cc.mean())
    worsening = sign * (base_v - cand_v)
    low, high = _quantiles(w_s, confidence)
    rel_low, rel_high = _rel_quantiles(rel_s, low, high, base_v, confidence)
    se = float(w_s.std(ddof=1))
    diff = sign * (bb - cc)
    return PairedEstimate(
        method="paired-bootstrap/paired-t", n=n, baseline=base_v, candidate=cand_v,
        worsening=worsening, low=low, high=high, rel_worsening=_rel(worsening, base_v),
        rel_low=rel_low, rel_high=rel_high, p_value=_ttest_p(bb, cc),
        flips_bad=int(np.sum(diff > 0)), flips_good=int(np.sum(diff < 0)), se=se,
        mdd=(z_of(confidence) + z_of(power)) * se, confidence=confidence,
    )


def _rel_quantiles(rel_s: np.ndarray, low: float, high: float, base_v: float, confidence: float) -> tuple[float, float]:
    # Bootstrap replicates with a zero baseline give +-inf/nan relatives; fall back to the fixed base.
    if np.isfinite(rel_s).all():
        return _quantiles(rel_s, confidence)
    return _rel(low, base_v), _rel(high, base_v)


def corpus_metric(
    loglikelihood: ArrayLike, words: ArrayLike | None, nbytes: ArrayLike | None,
    tokens: ArrayLike | None, metric: str,
) -> float:
    """Corpus-level metric from per-document sums, as lm-eval computes it (weighted by length)."""
    ll = float(np.sum(np.asarray(loglikelihood, dtype=float)))
    denom = _denominator(words, nbytes, tokens, metric)
    return float(_corpus_from_sums(np.asarray(ll), np.asarray(float(np.sum(denom))), metric))


def _denominator(words, nbytes, tokens, metric: str) -> np.ndarray:
    if metric == "word_perplexity":
        src, what = words, "words"
    elif metric in ("byte_perplexity", "bits_per_byte"):
        src, what = nbytes, "bytes"
    elif metric in ("token_perplexity", "perplexity"):
        src, what = tokens, "tokens"
    else:
        raise ValueError(f"unknown corpus metric {metric!r}; known: {', '.join(CORPUS_METRICS)}")
    if src is None:
        raise ValueError(f"{metric} needs per-document {what}")
    arr = np.asarray(src, dtype=float)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"invalid per-document {what}")
    return arr


def _corpus_from_sums(ll_sum: np.ndarray, denom_sum: np.ndarray, metric: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        nll = -ll_sum / denom_sum
        if metric == "bits_per_byte":
            return nll / math.log(2)
        return np.exp(nll)


def paired_corpus(
    base_ll: ArrayLike, cand_ll: ArrayLike, metric: str, *,
    base_words: ArrayLike | None = None, cand_words: ArrayLike | None = None,
    base_bytes: ArrayLike | None = None, cand_bytes: ArrayLike | None = None,
    base_tokens: ArrayLike | None = None, cand_tokens: ArrayLike | None = None,
    higher_is_better: bool = False, confidence: float = 0.95, power: float = 0.8,
    samples: int = 2000, seed: int = 0,
) -> PairedEstimate:
    """Perplexity-type metric: paired bootstrap over documents of its absolute and relative
    worsening (both sides resampled with the same indices); p-value from the paired t-test on
    per-document log-likelihoods (a zero mean difference means equal perplexity when the
    documents' lengths agree)."""
    _check_confidence(confidence, power)
    lb, lc = _paired_arrays(base_ll, cand_ll)
    n = lb.size
    db = _denominator(base_words, base_bytes, base_tokens, metric)
    dc = _denominator(cand_words, cand_bytes, cand_tokens, metric)
    if db.shape != lb.shape or dc.shape != lc.shape:
        raise ValueError("lengths must have one entry per document")
    if db.sum() <= 0 or dc.sum() <= 0:
        raise ValueError(f"{metric}: total length is zero")
    sign = 1.0 if higher_is_better else -1.0
    base_v = float(_corpus_from_sums(np.asarray(lb.sum()), np.asarray(db.sum()), metric))
    cand_v = float(_corpus_from_sums(np.asarray(lc.sum()), np.asarray(dc.sum()), metric))
    rng = np.random.default_rng(seed)
    base_r, cand_r = [], []
    for idx in _bootstrap_indices(rng, n, samples, chunk=max(1, 2_000_000 // n)):
        base_r.append(_corpus_from_sums(lb[idx].sum(1), db[idx].sum(1), metric))
        cand_r.append(_corpus_from_sums(lc[idx].sum(1), dc[idx].sum(1), metric))
    base_s, cand_s = np.concatenate(base_r), np.concatenate(cand_r)
    ok = np.isfinite(base_s) & np.isfinite(cand_s)  # resamples of only empty documents
    base_s, cand_s = base_s[ok], cand_s[ok]
    if base_s.size < 2:
        raise ValueError("bootstrap produced no finite replicates")
    w_s = sign * (base_s - cand_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_s = w_s / np.abs(base_s)
    worsening = sign * (base_v - cand_v)
    low, high = _quantiles(w_s, confidence)
    rel_low, rel_high = _rel_quantiles(rel_s, low, high, base_v, confidence)
    se = float(w_s.std(ddof=1))
    # A per-document loglikelihood drop is a "bad flip" for a lower-is-better metric.
    d_ll = lc - lb
    bad, good = (int(np.sum(d_ll < 0)), int(np.sum(d_ll > 0)))
    if higher_is_better:
        bad, good = good, bad
    return PairedEstimate(
        method="paired-bootstrap/paired-t", n=n, baseline=base_v, candidate=cand_v,
        worsening=worsening, low=low, high=high, rel_worsening=_rel(worsening, base_v),
        rel_low=rel_low, rel_high=rel_high, p_value=_ttest_p(lb, lc),
        flips_bad=bad, flips_good=good, se=se, mdd=(z_of(confidence) + z_of(power)) * se,
        confidence=confidence,
    )


def power_table(
    ns: Sequence[int] = (100, 200, 500, 1000, 4096),
    discordances: Sequence[float] = (0.02, 0.05, 0.10, 0.20),
    p_unpaired: float = 0.5, confidence: float = 0.95, power: float = 0.8,
) -> list[dict[str, float]]:
    """Rows of MDD (paired at each discordance rate, unpaired at accuracy p) for docs/gate.md."""
    rows = []
    for n in ns:
        row: dict[str, float] = {"n": n}
        for psi in discordances:
            row[f"paired@{psi:g}"] = mdd_paired(n, psi, confidence, power)
        row[f"unpaired@p={p_unpaired:g}"] = mdd_unpaired(n, p_unpaired, confidence, power)
        rows.append(row)
    return rows
