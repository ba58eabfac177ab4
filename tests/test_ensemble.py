"""Rank ensembles and their fit on queried architectures (the default objective of search.nas):
the formulas by hand, and the fit's behaviour on pools where the right answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import kendalltau

from slimline.search.ensemble import (
    PRIOR,
    RankEnsemble,
    candidate_ensembles,
    fit_ensemble,
    percentile_ranks,
    tau_b_rows,
)


def test_percentile_ranks_are_mid_rank_cdfs():
    # values 1, 2, 2, 4 within themselves: (0 + .5) / 4, (1 + 1) / 4 twice, (3 + .5) / 4
    np.testing.assert_allclose(percentile_ranks([1, 2, 2, 4]), [0.125, 0.5, 0.5, 0.875])
    # within another reference; None and NaN stay NaN; -inf below everything
    ranks = percentile_ranks([0, 3, None, math.nan, -math.inf], reference=[1, 2, 3, 4])
    np.testing.assert_allclose(ranks[:2], [0.0, 0.625])
    assert np.isnan(ranks[2:4]).all() and ranks[4] == 0.0
    assert np.isnan(percentile_ranks([1.0], reference=[None])).all()


def test_rank_ensemble_is_the_weighted_mean_of_available_ranks():
    ensemble = RankEnsemble.of("a", "b", weights=[3.0, 1.0])
    ranks = {"a": np.array([0.2, math.nan, math.nan]), "b": np.array([0.6, 0.4, math.nan])}
    combined = ensemble.combine(ranks)
    assert combined[0] == pytest.approx((3 * 0.2 + 0.6) / 4)
    assert combined[1] == pytest.approx(0.4)  # a is missing there: b alone
    assert np.isnan(combined[2])
    assert ensemble.label == "3*a+1*b" and RankEnsemble.of("a", "b").label == "a+b"
    with pytest.raises(KeyError, match="needs proxy scores for \\['b'\\]"):
        ensemble.combine({"a": ranks["a"]})
    with pytest.raises(ValueError, match="one positive weight each"):
        RankEnsemble.of("a", weights=[0.0])


def test_tau_b_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(5, 9)).astype(float)  # many ties
    y = rng.normal(size=(5, 9))
    y[1, :4] = 0.0
    expected = [kendalltau(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(tau_b_rows(x, y), expected)


def test_candidates_keep_params_in_every_ensemble_and_put_it_first():
    labels = [c.label for c in candidate_ensembles(["params", "flops", "naswot"])]
    assert labels[0] == PRIOR.label == "params"
    assert labels == ["params", "params+flops", "params+naswot", "params+flops+naswot"]
    assert [c.label for c in candidate_ensembles(["snip", "synflow"])] == ["snip",
                                                                            "snip+synflow"]


def _pool(seed: int, count: int = 300):
    """Quality ``q``; ``params`` tracks it loosely, ``good`` tightly, ``bad`` not at all. The
    observed accuracy is ``q`` plus query noise."""
    rng = np.random.default_rng(seed)
    quality = rng.normal(size=count)
    scores = {"params": quality + 1.2 * rng.normal(size=count),
              "good": quality + 0.2 * rng.normal(size=count),
              "bad": rng.normal(size=count)}
    observed = quality + 0.3 * rng.normal(size=count)
    return {k: percentile_ranks(v) for k, v in scores.items()}, observed, quality


def test_fit_keeps_the_prior_without_evidence():
    ranks, observed, _ = _pool(0)
    prior = RankEnsemble.of("params")
    two = fit_ensemble({k: v[:2] for k, v in ranks.items()}, observed[:2], prior=prior)
    assert two.chosen == prior and two.queried == 2


def test_fit_does_not_switch_to_a_slightly_worse_member():
    """A member a little worse than #params beats it on about a third of 15-query samples;
    the bootstrap confidence must keep #params nearly always (plain argmax would not)."""
    prior = RankEnsemble.of("params")
    kept = {0.0: 0, 0.9: 0}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        quality = rng.normal(size=300)
        ranks = {"params": percentile_ranks(quality + 1.0 * rng.normal(size=300)),
                 "close": percentile_ranks(quality + 1.2 * rng.normal(size=300))}
        observed = quality + 0.3 * rng.normal(size=300)
        for start in range(0, 300, 15):
            window = slice(start, start + 15)
            for confidence in kept:
                fit = fit_ensemble({k: v[window] for k, v in ranks.items()}, observed[window],
                                   candidates=[prior, RankEnsemble.of("close")], prior=prior,
                                   confidence=confidence, seed=start)
                kept[confidence] += fit.chosen == prior
    assert kept[0.9] >= 95 and kept[0.0] <= 80  # of 100 query sets


def test_fit_moves_to_a_clearly_better_member_and_gains_tau():
    """The claim of the default objective in miniature: with 20 queries the fit leaves #params
    for a member that ranks much better, so its tau over the whole pool is higher on average,
    and never picks the noise member."""
    prior = RankEnsemble.of("params")
    gains, chosen = [], []
    for seed in range(10):
        ranks, observed, quality = _pool(seed)
        picks = np.random.default_rng(seed).choice(300, 20, replace=False)
        fit = fit_ensemble({k: v[picks] for k, v in ranks.items()}, observed[picks],
                           candidates=candidate_ensembles(["params", "good", "bad"]),
                           prior=prior, seed=seed)
        chosen.append(fit.chosen.label)
        tau = kendalltau(fit.chosen.combine(ranks), quality).statistic
        gains.append(tau - kendalltau(ranks["params"], quality).statistic)
        assert fit.win_rates and all(0.0 <= r <= 1.0 for r in fit.win_rates.values())
    assert "params+bad" not in chosen
    assert sum(label != "params" for label in chosen) >= 7
    assert np.mean(gains) > 0.1
