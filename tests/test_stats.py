"""The shared statistics and text metrics (``expertchat.stats``): BCa bootstrap intervals as scipy computes them,
distinct-n, copied n-grams and their fraction, the number format of console lines and report cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import bootstrap

from expertchat.stats import bootstrap_ci, copied_fraction, copied_mask, distinct_n, fmt, ngrams

# ------------------------------------------------------------------------------------------- bootstrap_ci


def scipy_ci(values, resamples, seed, method="BCa"):
    res = bootstrap((np.asarray(values, dtype=float),), np.mean, n_resamples=resamples, confidence_level=0.95,
                    method=method, rng=np.random.default_rng(seed))
    return res.confidence_interval


def test_bootstrap_ci_is_scipys_bca_interval_rounded():
    values = np.random.default_rng(1).normal(0.3, 1.0, 40).tolist()
    low, high = scipy_ci(values, 2000, 7)
    assert bootstrap_ci(values, 2000, 7) == (round(low, 5), round(high, 5))
    assert bootstrap_ci(values, 2000, 7, digits=4) == (round(low, 4), round(high, 4))
    assert bootstrap_ci(values, 2000, 7) != tuple(round(x, 5) for x in scipy_ci(values, 2000, 7, "percentile"))


def test_bootstrap_ci_known_values_hold_the_mean_and_are_seeded():
    values = [0.1, 0.4, 0.35, 0.8, 0.2]
    assert bootstrap_ci(values, 1000, 0) == (0.2, 0.66)
    assert bootstrap_ci(values, 1000, 0) == bootstrap_ci(values, 1000, 0)
    assert bootstrap_ci(values, 1000, 1) != bootstrap_ci(values, 1000, 0)
    low, high = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0] * 10, 500, 0)
    assert low < 3.0 < high and high - low < 1.5


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 1, 20).tolist(), rng.normal(0.3, 1, 400).tolist()
    (lo_s, hi_s), (lo_l, hi_l) = bootstrap_ci(small, 1000, 0), bootstrap_ci(large, 1000, 0)
    assert lo_s < np.mean(small) < hi_s and lo_l < np.mean(large) < hi_l
    assert hi_l - lo_l < hi_s - lo_s


def test_bootstrap_ci_degenerate_cases():
    assert bootstrap_ci([]) is None and bootstrap_ci([1.0]) is None  # fewer than 2 values
    assert bootstrap_ci([1.0, 2.0], resamples=0) is None  # rate.bootstrap=0: no interval
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)  # every value equal: the value itself
    assert bootstrap_ci([0.123456, 0.123456], digits=4) == (0.1235, 0.1235)


def test_bootstrap_ci_falls_back_to_percentile_where_bca_is_undefined():
    values = [float(np.nextafter(5.5, 6.0)), 5.5, 5.5]  # one ulp apart: the jackknife's acceleration is 0/0
    with pytest.warns(Warning):  # scipy: BCa is undefined here (NaN, with a warning)
        assert not np.isfinite(scipy_ci(values, 1000, 0).low)
    low, high = scipy_ci(values, 1000, 0, "percentile")
    assert bootstrap_ci(values, 1000, 0) == (round(low, 5), round(high, 5)) == (5.5, 5.5)
    assert bootstrap_ci([0.0, 0.0, 1e-9, 0.0], 1000, 0) == (0.0, 0.0)  # nearly degenerate: finite, no NaN


# --------------------------------------------------------------------------------------------- distinct-n


def test_ngrams():
    assert ngrams([1, 2, 3], 2) == [(1, 2), (2, 3)] and ngrams([1, 2, 3], 3) == [(1, 2, 3)]
    assert ngrams([1, 2], 3) == []


def test_distinct_n_on_token_ids_and_words():
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)  # (1,2) (2,1) (1,2)
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2], [1, 2]], 1) == 0.5  # a corpus: n-grams counted over every sequence
    assert distinct_n([[1, 2], [2, 3]], 2) == 1.0  # ... never spanning two of them ((2, 2) is not one)
    assert distinct_n(["the cat saw the cat".split()], 2) == 0.75
    assert distinct_n((seq for seq in [[5, 5, 5]]), 1) == pytest.approx(1 / 3)  # any iterable of sequences


def test_distinct_n_without_ngrams_or_with_a_bad_n():
    assert distinct_n([["a"]], 2) is None and distinct_n([], 1) is None and distinct_n([[]], 1) is None
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n([[1, 2]], 0)


# ---------------------------------------------------------------------------------------------- copying


def test_copied_mask_marks_tokens_inside_copied_ngrams():
    assert copied_mask([1, 2, 3, 4], [9, 2, 3, 4, 9], 3) == [False, True, True, True, False]
    assert copied_mask([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 3) == [True] * 5  # overlapping n-grams
    assert copied_mask([1, 2, 3], [1, 2, 9, 3], 3) == [False] * 4
    assert copied_mask("is dark matter made".split(), "dark matter made of axions".split(), 3) == [True] * 3 + [
        False] * 2


def test_copied_mask_marks_nothing_when_it_cannot():
    assert copied_mask([1, 2, 3], [1, 2, 3], 0) == [False] * 3  # n = 0: off
    assert copied_mask([1, 2], [1, 2], 3) == [False, False]  # a context shorter than n
    assert copied_mask([1, 2, 3], [], 3) == []


def test_copied_fraction():
    assert copied_fraction("what is dark matter made of".split(), "dark matter made of axions".split()) == 0.8
    assert copied_fraction([1, 2, 3], [1, 2, 3, 4, 5, 6]) == 0.5
    assert copied_fraction([1, 2, 3], [4, 5]) == 0.0 and copied_fraction([1, 2, 3], []) is None
    assert copied_fraction([1, 2, 3, 4], [1, 2, 3, 4], n=2) == 1.0


@pytest.mark.parametrize(("copied", "total"), [(1, 3), (3, 320), (192, 227), (149, 233), (7, 7)])
def test_copied_fraction_in_float32_is_the_torch_mean_of_the_mask(copied, total):
    """float32=True: the value the evaluation's rows hold (the float32 mean of a torch mask), which can differ
    from the exact fraction in the 5th decimal (192/227: 0.84582 against 0.84581)."""
    import torch

    context = list(range(copied))
    answer = context + [-1 - i for i in range(total - copied)]  # the first ``copied`` tokens come from the context
    mask = copied_mask(context, answer, 1)
    assert sum(mask) == copied
    assert copied_fraction(context, answer, 1, float32=True) == float(torch.tensor(mask).float().mean())
    assert copied_fraction(context, answer, 1) == copied / total


def test_the_judges_tensor_mask_is_the_same_rule():
    from expertchat.judging.scoring import copied_mask as tensor_mask

    for context, answer, n in [([1, 2, 3, 4], [9, 2, 3, 4, 9], 3), ([1, 2, 3], [1, 2, 3], 0), ([1], [], 2)]:
        mask = tensor_mask(context, answer, n)
        assert mask.dtype.is_floating_point is False and mask.tolist() == copied_mask(context, answer, n)


# ----------------------------------------------------------------------------------------------- format


def test_fmt():
    assert (fmt(0.12345), fmt(0.128674), fmt(0.5, 0), fmt(2.0, 1)) == ("0.123", "0.129", "0", "2.0")
    assert fmt(None) == fmt(math.nan) == "n/a"
    assert (fmt(3), fmt(True), fmt("x")) == ("3", "True", "x")
    assert fmt(np.float64(0.25), 2) == "0.25"  # a numpy double is a float


def test_bradley_terry_recovers_known_strengths_with_intervals_over_groups():
    """Outcomes drawn from known log-strengths (0, 1, 2) over 300 groups: the fit lands near them, item 0 is 0, and
    each 95% interval (groups resampled) holds the truth."""
    import random

    from expertchat.stats import bradley_terry

    rng, truth, comps = random.Random(7), [0.0, 1.0, 2.0], []
    for group in range(300):
        for i in range(3):
            for j in range(i + 1, 3):
                p_i = 1 / (1 + math.exp(truth[j] - truth[i]))
                comps.append((i, j, group) if rng.random() < p_i else (j, i, group))
    strengths, cis = bradley_terry(3, comps, resamples=200, seed=1)
    assert strengths[0] == 0.0 and cis[0] == (0.0, 0.0)
    for s, ci, t in zip(strengths, cis, truth):
        assert abs(s - t) < 0.35 and ci[0] <= t <= ci[1]
    assert bradley_terry(2, [(1, 0, "a")], resamples=100)[1] == [None, None]  # one group: no interval


# ------------------------------------------------------------------------------- verdicts and agreement


def test_length_controlled_win_rate_removes_a_win_rate_that_only_length_buys():
    from expertchat.stats import length_controlled_win_rate

    rng = np.random.default_rng(0)
    d = rng.normal(25, 20, 600)  # the compared model's answers are mostly longer
    p = 1 / (1 + np.exp(-2.5 * np.tanh(d / d.std())))  # and it wins only by length: theta_0 = 0
    y = (rng.random(600) < p).astype(float)
    assert y.mean() > 0.75
    lc, ci = length_controlled_win_rate(y, d, 300, 1)
    assert abs(lc - 0.5) < 0.08 and ci[0] < 0.5 < ci[1] and ci[1] < y.mean()


def test_length_controlled_win_rate_keeps_a_real_win_rate_and_is_the_glm_fit():
    import statsmodels.api as sm

    from expertchat.stats import length_controlled_win_rate

    rng = np.random.default_rng(2)
    d = rng.normal(0, 20, 400)
    y = (rng.random(400) < 1 / (1 + np.exp(-(1.0 + 0.5 * np.tanh(d / d.std()))))).astype(float)
    y[:40] = 0.5  # ties count half
    lc, _ = length_controlled_win_rate(y, d, resamples=0)
    glm = sm.GLM(y, np.column_stack([np.ones(400), np.tanh(d / d.std())]), family=sm.families.Binomial()).fit()
    assert lc == pytest.approx(1 / (1 + math.exp(-glm.params[0])), abs=1e-4)
    assert abs(lc - 1 / (1 + math.exp(-1.0))) < 0.06
    # no length difference at all: the plain win rate
    assert length_controlled_win_rate([1, 0, 1, 1, 0.5], [0] * 5, resamples=0) == (0.7, None)
    assert length_controlled_win_rate([1.0], [3], resamples=0) == (None, None)


def test_rank_correlation_is_spearmans_with_a_paired_interval():
    from scipy.stats import spearmanr

    from expertchat.stats import rank_correlation

    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=1.0, size=60)
    rho, ci = rank_correlation(x, y, 1000, 0)
    assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-4) and ci[0] < rho < ci[1]
    assert 0.4 < rho < 0.9 and ci[1] - ci[0] < 0.5
    assert rank_correlation(x, -x, 200, 0)[0] == -1.0
    assert rank_correlation(x, rng.normal(size=60), 500, 0)[1][0] < 0.3


def test_detectable_effect_is_the_t_test_power_solution():
    from expertchat.stats import detectable_effect

    # large n: the normal approximation (z_0.975 + z_0.8) sd / sqrt(n)
    assert detectable_effect(2.0, 2000) == pytest.approx((1.959964 + 0.841621) * 2.0 / math.sqrt(2000), rel=0.01)
    assert detectable_effect(1.0, 8) > detectable_effect(1.0, 80) > detectable_effect(1.0, 800)
    assert detectable_effect(0.0, 10) == 0.0 and detectable_effect(1.0, 1) is None
