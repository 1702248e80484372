"""Statistics and text metrics shared by every room: bootstrap confidence intervals, distinct-n, copied n-grams,
and the number format of console lines and report cells.

A leaf: it imports only numpy, scipy (inside :func:`bootstrap_ci`) and the standard library, so any module of the
package may use it. Every function is pure; the doctests run in the test suite (``tests/test_package.py``), and
``tests/test_stats.py`` checks each function on real values.
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
