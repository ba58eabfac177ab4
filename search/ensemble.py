"""Rank ensembles of zero-cost proxies, fitted on a few queried architectures.

No proxy ranks trained networks well on every task (bench/RESULTS.md: snip is the best proxy on
one table and half as good as #params on the next), but a few short trainings can tell which
one works *here*. A :class:`RankEnsemble` averages its members' percentile ranks (scale-free,
so #params and a log-determinant combine without normalisation constants)::

    r_m(a)  = (#{b in R : p_m(b) < p_m(a)} + 0.5 #{b in R : p_m(b) = p_m(a)}) / |R|
    s_w(a)  = sum_m w_m r_m(a) / sum_m w_m        (members missing on ``a`` left out)

over a reference pool ``R`` of architectures of the space (the mid-rank empirical CDF; for a
table, ``R`` is the table itself). :func:`fit_ensemble` chooses among a small family of
candidates (:func:`candidate_ensembles`: #params alone, #params paired with each other member,
all members) by Kendall's tau against the accuracies of ``K`` queried architectures, but
leaves the prior (#params) only for a candidate that beats it in at least 90% of paired
bootstrap resamples of the queries. A short training's accuracy is a noisy
answer, and on some tables every proxy is far below #params, so a plain argmax over ``K``
queries would often trade #params for a worse ranking; with the confidence rule the fit moves
only when the queries show a clear gain (bench/RESULTS.md, "Default objective").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_MEMBERS",
    "PRIOR",
    "EnsembleFit",
    "RankEnsemble",
    "candidate_ensembles",
    "fit_ensemble",
    "percentile_ranks",
    "tau_b_rows",
]

# #params, FLOPs and naswot (the size baselines and the activation proxy the issue names),
# snip and synflow (the best gradient proxies on the MNIST-1D tables) and attention confidence
# (transformers only: it sees the head count, which #params does not; with #params it reaches
# the seed-to-seed ceiling on digits-vit). Members that do not apply to a space are left out.
DEFAULT_MEMBERS = ("params", "flops", "naswot", "snip", "synflow", "attention_confidence")
CONFIDENCE = 0.9
RESAMPLES = 500


def _array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def percentile_ranks(values: Sequence[float | None],
                     reference: Sequence[float | None] | None = None) -> np.ndarray:
    """Mid-rank empirical CDF of each value within ``reference`` (default: ``values``), in
    ``[0, 1]``; ``None``/NaN stay NaN (the member does not score that architecture) and
    ``-inf`` ranks below everything."""
    x = _array(values)
    ref = _array(values if reference is None else reference)
    ref = np.sort(ref[~np.isnan(ref)])
    out = np.full(x.shape, math.nan)
    if ref.size == 0:
        return out
    ok = ~np.isnan(x)
    below = np.searchsorted(ref, x[ok], side="left")
    upto = np.searchsorted(ref, x[ok], side="right")
    out[ok] = (below + 0.5 * (upto - below)) / ref.size
    return out


@dataclass(frozen=True)
class RankEnsemble:
    """``s_w`` of the module docstring: a weighted mean of member percentile ranks."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, *members: str, weights: Sequence[float] | None = None) -> RankEnsemble:
        values = [1.0] * len(members) if weights is None else list(weights)
        if len(values) != len(members) or not members or any(w <= 0 for w in values):
            raise ValueError(f"an ensemble needs members and one positive weight each, got "
                             f"{members} / {weights}")
        return cls(tuple(zip(members, (float(w) for w in values))))

    @property
    def members(self) -> list[str]:
        return [m for m, _ in self.weights]

    @property
    def label(self) -> str:
        if len({w for _, w in self.weights}) == 1:
            return "+".join(self.members)
        return "+".join(f"{w:g}*{m}" for m, w in self.weights)

    def combine(self, ranks: Mapping[str, Sequence[float]]) -> np.ndarray:
        """The ensemble score of each architecture from its members' percentile ranks; members
        missing (NaN) on an architecture are left out of its mean, all missing gives NaN."""
        missing = [m for m in self.members if m not in ranks]
        if missing:
            raise KeyError(f"ensemble {self.label!r} needs proxy scores for {missing}")
        stack = np.stack([np.asarray(ranks[m], dtype=np.float64) for m in self.members])
        weights = np.array([w for _, w in self.weights])[:, None] * ~np.isnan(stack)
        total = weights.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mixed = np.nansum(stack * weights, axis=0) / total
        return np.where(total > 0, mixed, math.nan)

    def score_table(self, scores: Mapping[str, Sequence[float | None]],
                    reference: Mapping[str, Sequence[float | None]] | None = None
                    ) -> np.ndarray:
        """Ensemble scores of raw proxy ``scores`` ranked within ``reference`` (default: the
        scored architectures themselves)."""
        ref = scores if reference is None else reference
        return self.combine({m: percentile_ranks(scores[m], ref[m]) for m in self.members})

    def to_dict(self) -> dict[str, float]:
        return dict(self.weights)


PRIOR = RankEnsemble.of("params")


def candidate_ensembles(members: Sequence[str] = DEFAULT_MEMBERS, *, anchor: str = "params",
                        singles: bool = False) -> list[RankEnsemble]:
    """The family :func:`fit_ensemble` chooses from: the ``anchor`` (#params) alone, the anchor
    paired with each other member, and all members together (anchor first: it wins ties). No
    other member alone: on our tables a single proxy chosen on 10-20 noisy queries lost to
    #params on two tables, while every pair that keeps #params stayed at or above it
    (bench/RESULTS.md, "Default objective"; ``singles=True`` adds them back, for that
    comparison). Without the anchor among ``members`` the first member anchors."""
    members = list(members)
    if not members:
        raise ValueError("an ensemble family needs at least one member")
    anchor = anchor if anchor in members else members[0]
    found = [RankEnsemble.of(anchor)]
    found += [RankEnsemble.of(anchor, m) for m in members if m != anchor]
    if singles:
        found += [RankEnsemble.of(m) for m in members if m != anchor]
    if len(members) > 2:
        found.append(RankEnsemble.of(anchor, *(m for m in members if m != anchor)))
    return found


def tau_b_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row pair ``(x[r], y[r])`` (shape ``(rows, n)``), vectorised over
    the ``n (n - 1) / 2`` pairs: ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` with ``n1``, ``n2`` the
    pairs tied in ``x`` and in ``y`` (Kendall 1945). NaN where a row is constant."""
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    upper = np.triu(np.ones(x.shape[1:] * 2, dtype=bool), 1)
    concordance = (sx * sy)[:, upper].sum(axis=1)
    untied_x = (sx[:, upper] != 0).sum(axis=1)
    untied_y = (sy[:, upper] != 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return concordance / np.sqrt(untied_x * untied_y)


@dataclass
class EnsembleFit:
    """What :func:`fit_ensemble` chose and why: every candidate's tau on the queries and how
    often it beat the prior over bootstrap resamples of them."""

    chosen: RankEnsemble
    queried: int
    confidence: float
    taus: dict[str, float | None] = field(default_factory=dict)
    win_rates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"chosen": self.chosen.label, "weights": self.chosen.to_dict(),
                "queried": self.queried, "confidence": self.confidence,
                "taus": dict(self.taus), "win_rates": dict(self.win_rates)}


def fit_ensemble(ranks: Mapping[str, Sequence[float]], observed: Sequence[float], *,
                 candidates: Sequence[RankEnsemble] | None = None,
                 prior: RankEnsemble = PRIOR, confidence: float | None = None,
                 resamples: int = RESAMPLES, seed: int = 0) -> EnsembleFit:
    """Choose the candidate that ranks the ``observed`` accuracies of the queried architectures
    best (``ranks[m][i]``: member ``m``'s percentile rank of queried architecture ``i`` within
    the reference pool), but only over a candidate whose tau beats the prior's in at least
    ``confidence`` of ``resamples`` paired bootstrap resamples of the queries (Efron &
    Tibshirani 1993; paired, so two candidates that rank alike are compared on the same
    draws). Otherwise, and with fewer than 3 queries, the prior is kept."""
    from slimline.search.groundtruth_data import kendall_tau

    confidence = CONFIDENCE if confidence is None else confidence
    pool = list(candidates) if candidates is not None else candidate_ensembles(
        [m for m in DEFAULT_MEMBERS if m in ranks] or list(ranks))
    usable = [c for c in pool if all(m in ranks for m in c.members)]
    if prior not in usable:
        usable.insert(0, prior)
    y = np.asarray(observed, dtype=np.float64)
    combined = {c.label: c.combine(ranks) for c in usable}
    keep = ~np.isnan(y) & ~np.isnan(combined[prior.label])
    # A candidate must score every architecture the prior scores (naswot alone cannot rank the
    # GRUs of a CNN + GRU space), so all are compared on the same queries.
    usable = [c for c in usable if not np.isnan(combined[c.label][keep]).any()]
    count = int(keep.sum())
    taus: dict[str, float | None] = {
        c.label: (kendall_tau(combined[c.label][keep], y[keep]) if count > 2 else None)
        for c in usable}
    fit = EnsembleFit(prior, count, confidence, taus)
    if count < 3 or taus[prior.label] is None:
        return fit
    draws = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    y_draws = y[keep][draws]
    prior_draws = tau_b_rows(combined[prior.label][keep][draws], y_draws)
    best_tau = float(taus[prior.label])
    for candidate in usable:
        if candidate == prior or taus[candidate.label] is None:
            continue
        own = tau_b_rows(combined[candidate.label][keep][draws], y_draws)
        valid = ~np.isnan(own) & ~np.isnan(prior_draws)
        rate = float((own[valid] > prior_draws[valid]).mean()) if valid.any() else 0.0
        fit.win_rates[candidate.label] = rate
        if rate >= confidence and float(taus[candidate.label]) > best_tau:
            fit.chosen, best_tau = candidate, float(taus[candidate.label])
    return fit
