"""Statistics and text metrics shared by every room: bootstrap confidence intervals, distinct-n, copied n-grams,
Bradley-Terry ratings, the length-controlled win rate, rank correlation, detectable effect sizes, and the number
format of console lines and report cells.

A leaf: it imports only numpy, the standard library, and scipy, statsmodels and choix inside the functions that use
them, so any module of the package may use it. Every function is pure; the doctests run in the test suite
(``tests/test_package.py``), and ``tests/test_stats.py`` checks each function on real values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------- intervals


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0,
                 digits: int = 5) -> tuple[float, float] | None:
    """The 95% bias-corrected and accelerated (BCa) bootstrap confidence interval of the mean of ``values``.

    BCa (Efron, 1987, "Better Bootstrap Confidence Intervals", JASA 82(397): 171-185) as
    ``scipy.stats.bootstrap(method="BCa")`` computes it: the percentile interval of ``resamples`` resampled
    means, its ends moved by the bias correction (the share of resampled means below the sample mean) and the
    acceleration (the skewness of the jackknife means). Where BCa is undefined (nearly degenerate data: the
    jackknife gives 0/0 and scipy warns and returns NaN) the plain percentile interval is returned instead.

    Args:
        values: ``[N]`` the sample (floats, any units; the interval has the same units).
        resamples: bootstrap resamples (``<= 0``: no interval).
        seed: seeds ``numpy.random.default_rng``, so the same values give the same interval.
        digits: decimals the two ends are rounded to.

    Returns:
        ``(low, high)``; ``(v, v)`` when every value is ``v``; ``None`` for fewer than 2 values or no resample.

    >>> bootstrap_ci([0.1, 0.4, 0.35, 0.8, 0.2], 1000, 0)
    (0.2, 0.66)
    >>> bootstrap_ci([0.5, 0.5, 0.5]), bootstrap_ci([1.0]), bootstrap_ci([1.0, 2.0], resamples=0)
    ((0.5, 0.5), None, None)
    """
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2 or resamples <= 0:
        return None
    if np.all(data == data[0]):
        return (round(float(data[0]), digits),) * 2
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns (and gives NaN) on nearly degenerate data: percentile then
            ci = bootstrap((data,), np.mean, n_resamples=resamples, confidence_level=0.95, method=method,
                           rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return round(float(ci.low), digits), round(float(ci.high), digits)


# ------------------------------------------------------------------------------------------ text metrics


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """The ``n``-grams of ``tokens`` in order, as tuples (``len(tokens) - n + 1`` of them; none when shorter).

    >>> ngrams("a b c".split(), 2), ngrams([1], 2)
    ([('a', 'b'), ('b', 'c')], [])
    """
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Iterable[Sequence[Hashable]], n: int) -> float | None:
    """distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models",
    arXiv 1510.03055): distinct n-grams / all n-grams, over every sequence of ``sequences`` (a corpus; pass
    ``[tokens]`` for one text). Tokens are anything hashable: token ids or words; n-grams never span two
    sequences.

    Args:
        sequences: ``[S][T_s]`` token sequences.
        n: the n-gram length, >= 1.

    Returns:
        A fraction in (0, 1]; ``None`` when the sequences hold no n-gram.

    Raises:
        ValueError: ``n < 1``.

    >>> distinct_n([[1, 2, 1, 2]], 2), distinct_n([[1, 2], [1, 2]], 1), distinct_n(["a b a b a".split()], 2)
    (0.6666666666666666, 0.5, 0.5)
    >>> distinct_n([["a"]], 2) is None
    True
    """
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, not {n}")
    grams = [g for seq in sequences for g in ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else None


def copied_mask(context: Sequence[Hashable], answer: Sequence[Hashable], n: int) -> list[bool]:
    """Which tokens of ``answer`` lie inside an ``n``-gram that also occurs in ``context`` (the copy rule of the
    judge's likelihood signal, of the evaluation's and of the report's copied fractions).

    Args:
        context: ``[C]`` tokens (ids or words) the answer could copy from.
        answer: ``[T]`` tokens of the same kind.
        n: the n-gram length; ``n <= 0`` marks nothing.

    Returns:
        ``[T]`` bools, True for a copied token.

    >>> copied_mask([1, 2, 3, 4], [9, 2, 3, 4, 9], 3)
    [False, True, True, True, False]
    """
    mask = [False] * len(answer)
    if n <= 0 or len(context) < n:
        return mask
    grams = set(ngrams(context, n))
    for i, gram in enumerate(ngrams(answer, n)):
        if gram in grams:
            mask[i:i + n] = [True] * n
    return mask


def copied_fraction(context: Sequence[Hashable], answer: Sequence[Hashable], n: int = 3, *,
                    float32: bool = False) -> float | None:
    """The fraction of ``answer``'s tokens that :func:`copied_mask` marks as copied from ``context``.

    Args:
        context, answer, n: as for :func:`copied_mask`.
        float32: divide in single precision (``float32(copied) / float32(T)``, what ``torch.Tensor.mean`` of a
            float32 mask gives): the evaluation's ``eval.jsonl`` rows hold that value, and it can differ from
            the double-precision fraction in the 5th decimal they are rounded to.

    Returns:
        A fraction in [0, 1]; ``None`` for an empty answer.

    >>> copied_fraction("what is dark matter made of".split(), "dark matter made of axions".split())
    0.8
    >>> copied_fraction([1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], float32=True), copied_fraction([1], [])
    (0.3333333432674408, None)
    """
    if not answer:
        return None
    copied = sum(copied_mask(context, answer, n))
    if float32:
        return float(np.float32(copied) / np.float32(len(answer)))
    return copied / len(answer)


# ---------------------------------------------------------------------------------------------- ratings


def bradley_terry(n_items: int, comparisons: Sequence[tuple[int, int, Hashable]], resamples: int = 1000,
                  seed: int = 0, alpha: float = 0.01) -> tuple[list[float], list[tuple[float, float] | None]]:
    """Bradley-Terry log-strengths (Bradley & Terry, 1952, "Rank Analysis of Incomplete Block Designs",
    Biometrika 39: 324-345) of ``n_items`` from pairwise outcomes, fitted by ``choix.ilsr_pairwise`` (iterative
    Luce spectral ranking, Maystre & Grossglauser, 2015; ``alpha``: its regularization, which keeps an item that
    wins every comparison finite), with 95% percentile bootstrap CIs that resample the GROUPS (e.g. topics) with
    replacement, since comparisons within a group share it.

    Args:
        n_items: how many items are rated.
        comparisons: ``[M]`` ``(winner, loser, group)``: item indices in ``[0, n_items)``.
        resamples: bootstrap resamples (``<= 0``: no interval).

    Returns:
        ``([n_items] log-strengths, item 0 fixed at 0: P(i beats j) = 1 / (1 + exp(s_j - s_i)); [n_items]
        (lo, hi) or None)``.

    >>> s, ci = bradley_terry(2, [(1, 0, "a"), (1, 0, "b"), (0, 1, "c")], resamples=0)
    >>> s[0], s[1] > 0, ci
    (0.0, True, [None, None])
    """
    import choix

    def fit(pairs: list[tuple[int, int]]) -> np.ndarray:
        params = choix.ilsr_pairwise(n_items, pairs, alpha=alpha)
        return params - params[0]

    strengths = fit([(w, l_) for w, l_, _ in comparisons])
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for w, l_, g in comparisons:
        groups.setdefault(g, []).append((w, l_))
    keys = list(groups)
    if resamples <= 0 or len(keys) < 2:
        return [round(float(x), 6) for x in strengths], [None] * n_items
    rng = np.random.default_rng(seed)
    draws = np.array([fit([p for k in rng.choice(len(keys), len(keys)) for p in groups[keys[k]]])
                      for _ in range(resamples)])
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    return ([round(float(x), 6) for x in strengths],
            [(round(float(a), 6), round(float(b), 6)) for a, b in zip(lo, hi, strict=True)])

# ------------------------------------------------------------------------------- verdicts and agreement


def length_controlled_win_rate(outcomes: Sequence[float], length_diff: Sequence[float], resamples: int = 1000,
                               seed: int = 0, digits: int = 5
                               ) -> tuple[float | None, tuple[float, float] | None]:
    """The length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple
    Way to Debias Automatic Evaluators", section 3): a logistic GLM of the outcome on the normalized length
    difference, ``logit P(win) = theta_0 + theta_1 * tanh(dlen / sd(dlen))``, fitted by ``statsmodels.api.Logit``
    (maximum likelihood; a tie is the fractional outcome 0.5, a quasi-likelihood fit with the estimates of the
    Binomial GLM at a third of its cost), and the win rate it predicts
    at equal lengths, ``sigmoid(theta_0)``; with a 95% percentile bootstrap CI over the pairs (each resample
    refitted).

    Args:
        outcomes: ``[N]`` each pair's result for the model compared, in [0, 1]: 1 win, 0.5 tie, 0 loss, or the
            judge's probability that it is better (AlpacaEval 2's preference).
        length_diff: ``[N]`` its answer's length minus the other's (tokens).
        resamples: bootstrap resamples (``<= 0``: no interval).

    Returns:
        ``(rate, (low, high))``; ``(None, None)`` for fewer than 2 pairs or a fit that does not converge (the
        outcome is perfectly separated by length: no length-free rate exists); the rate itself when every outcome
        is the same.

    >>> length_controlled_win_rate([1, 0, 1, 0.5, 1, 0], [10, 12, -5, 0, 3, -8], resamples=0)
    (0.57387, None)
    >>> length_controlled_win_rate([1, 1, 0, 0], [5, 3, -2, -4], resamples=0)  # longer always wins: separated
    (None, None)
    """
    y, d = np.asarray(outcomes, dtype=float), np.asarray(length_diff, dtype=float)
    if len(y) < 2:
        return None, None
    rate = _lc_fit(y, d)
    if rate is None or resamples <= 0:
        return (None if rate is None else round(rate, digits)), None
    rng = np.random.default_rng(seed)
    draws = [_lc_fit(y[k], d[k]) for k in rng.integers(0, len(y), (resamples, len(y)))]
    kept = np.array([x for x in draws if x is not None])
    if len(kept) < resamples / 2:
        return round(rate, digits), None
    lo, hi = np.percentile(kept, [2.5, 97.5])
    return round(rate, digits), (round(float(lo), digits), round(float(hi), digits))


def _lc_fit(y: np.ndarray, d: np.ndarray) -> float | None:
    """``sigmoid(theta_0)`` of :func:`length_controlled_win_rate`'s GLM on one sample (``None``: no convergence)."""
    import statsmodels.api as sm

    if np.all(y == y[0]):
        return float(y[0])
    sd = float(d.std())
    x = np.column_stack([np.ones_like(d)] + ([np.tanh(d / sd)] if sd > 0 else []))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels warns on fractional outcomes and on (near) separation
        try:
            fit = sm.Logit(y, x).fit(disp=0)
        except Exception:  # noqa: BLE001 - statsmodels raises PerfectSeparationError and LinAlgError alike
            return None
    theta0 = float(fit.params[0])
    if not fit.mle_retvals.get("converged", False) or not math.isfinite(theta0) or abs(theta0) > 30:
        return None
    return 1.0 / (1.0 + math.exp(-theta0))


def rank_correlation(x: Sequence[float], y: Sequence[float], resamples: int = 1000, seed: int = 0,
                     digits: int = 4) -> tuple[float | None, tuple[float, float] | None]:
    """Spearman's rank correlation of paired ``x`` and ``y`` (``scipy.stats.spearmanr``) with a 95% percentile
    bootstrap CI over the pairs (``scipy.stats.bootstrap``, ``paired=True``).

    Returns:
        ``(rho, (low, high))``; ``(None, None)`` for fewer than 3 pairs or a constant side (no ranking).

    >>> rank_correlation([1, 2, 3, 4], [10, 20, 30, 45], resamples=0), rank_correlation([1, 1, 1], [1, 2, 3])
    ((1.0, None), (None, None))
    """
    from scipy.stats import bootstrap, spearmanr

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return None, None
    rho = float(spearmanr(a, b).statistic)
    if resamples <= 0:
        return round(rho, digits), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample with a constant side gives NaN: dropped below
        res = bootstrap((a, b), lambda u, v: spearmanr(u, v).statistic, paired=True, vectorized=False,
                        n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution[np.isfinite(res.bootstrap_distribution)]
    if len(dist) < resamples / 2:
        return round(rho, digits), None
    lo, hi = np.percentile(dist, [2.5, 97.5])
    return round(rho, digits), (round(float(lo), digits), round(float(hi), digits))


def detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest mean paired difference a two-sided one-sample t-test on ``n`` pairs detects with ``power`` at
    level ``alpha``, given the differences' standard deviation ``sd`` (in ``sd``'s units): Cohen's d from
    ``statsmodels.stats.power.TTestPower().solve_power`` times ``sd`` (Cohen 1988, "Statistical Power Analysis
    for the Behavioral Sciences", ch. 2). ``None`` for ``n < 2`` or ``sd`` not finite.

    >>> round(detectable_effect(1.0, 80), 3), round(detectable_effect(1.0, 8), 3), detectable_effect(1.0, 1)
    (0.317, 1.156, None)
    """
    from statsmodels.stats.power import TTestPower

    if n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.atleast_1d(d)[0]) * sd


# ---------------------------------------------------------------------------------------------- format


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a console line or a report cell: floats to ``digits`` decimals, ``n/a`` for a missing one
    (``None`` or NaN), anything else as ``str``.

    >>> fmt(0.12345), fmt(0.128674), fmt(None), fmt(float("nan")), fmt(3), fmt(0.5, 0), fmt(2.0, 1)
    ('0.123', '0.129', 'n/a', 'n/a', '3', '0', '2.0')
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
