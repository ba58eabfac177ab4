"""The default accuracy objective of ``search.nas``: a rank ensemble fitted on short trainings.

Before the study, :func:`calibrate_ensemble` samples a reference pool of the space, scores it
with the ensemble's members (#params, FLOPs, naswot, snip, synflow by default; members that do
not apply to the space's models are left out), trains ``queries`` of the pool briefly (the
``robot`` strategy's query: val accuracy after ``query_epochs`` epochs) and fits the ensemble on
them (:func:`slimline.search.ensemble.fit_ensemble`). The study then maximises
:class:`EnsembleObjective`: the fitted ensemble of a candidate's member percentile ranks
within the reference pool. With ``queries = 0`` nothing is trained and the prior (#params) is
the objective.

Every process that rebuilds the search (the stage, ``slimline search worker``) calibrates the
same way from the same seed, so they optimise the same function on one machine type; the
fitted weights are written to ``search.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimline.search.ensemble import (
    EnsembleFit,
    RankEnsemble,
    candidate_ensembles,
    fit_ensemble,
    percentile_ranks,
)

__all__ = ["ENSEMBLE", "EnsembleObjective", "calibrate_ensemble", "short_training_accuracy"]

ENSEMBLE = "ensemble"  # the accuracy_proxy value that selects this objective


def short_training_accuracy(space: Any, arch: Any, data: Any, epochs: int, seed: int) -> float:
    """Validation accuracy of ``arch`` after ``epochs`` epochs of the default training, from
    ``torch.manual_seed(seed)`` (the query of RoBoT and of the ensemble fit)."""
    import torch

    from slimline.evaluation import accuracy, predict
    from slimline.training import TrainParams, fit

    torch.manual_seed(seed)
    model = space.build_model(arch)
    fit(model, data, TrainParams(epochs=epochs), seed=seed)
    x_val, y_val = data.split("val")
    return accuracy(predict(model, x_val), y_val)


@dataclass
class EnsembleObjective:
    """A candidate's score: the fitted ensemble of its member percentile ranks within the
    reference pool (NaN when no member scored it)."""

    ensemble: RankEnsemble
    reference: dict[str, list[float | None]]
    fit: EnsembleFit | None = None
    queried: list[str] = field(default_factory=list)
    query_accuracy: list[float] = field(default_factory=list)

    def __call__(self, scores: Mapping[str, float]) -> float:
        ranks = {m: percentile_ranks([scores.get(m)], self.reference[m])
                 for m in self.ensemble.members}
        return float(self.ensemble.combine(ranks)[0])

    def scores(self, member_scores: Mapping[str, Sequence[float | None]]) -> np.ndarray:
        """Vectorised :meth:`__call__` over many architectures' raw member scores."""
        return self.ensemble.score_table(member_scores, self.reference)

    def summary(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.label, "weights": self.ensemble.to_dict(),
                "reference_pool": len(next(iter(self.reference.values()), [])),
                "queried": list(self.queried), "query_val_accuracy": list(self.query_accuracy),
                "fit": self.fit.to_dict() if self.fit is not None else None}


def _pool_scores(space: Any, pool: Sequence[Any], members: Sequence[str], inputs: Any,
                 seed: int) -> dict[str, list[float | None]]:
    from slimline.search.proxies import ProxyError, score_architecture

    scores: dict[str, list[float | None]] = {m: [] for m in members}
    for arch in pool:
        for member in members:
            try:
                value = score_architecture(lambda a=arch: space.build_model(a), [member],
                                           inputs, seed=seed)[member]
            except ProxyError:  # NaN on this architecture: the member sits this one out
                value = math.nan
            scores[member].append(None if math.isnan(value) else value)
    return scores


def calibrate_ensemble(space: Any, inputs: Any, data: Any, members: Sequence[str], *,
                       pool_size: int, queries: int, query_epochs: int, seed: int,
                       log: Callable[[str], None] = print,
                       progress: Callable[[int, str], Any] | None = None) -> EnsembleObjective:
    """Score a reference pool, train ``queries`` of it briefly and fit the ensemble (see the
    module docstring). ``progress(total, desc)`` opens a progress bar (``ctx.progress``)."""
    if not members:
        raise ValueError("the ensemble objective needs at least one member that applies to "
                         f"space {space.name!r}")
    prior = RankEnsemble.of("params") if "params" in members else RankEnsemble.of(members[0])
    pool = space.sample(pool_size, seed=seed)
    reference = _pool_scores(space, pool, members, inputs, seed)
    if queries < 3 or len(pool) < 3:
        log(f"ensemble objective: {prior.label} (the prior; {queries} queries fit nothing)")
        return EnsembleObjective(prior, reference)
    picks = np.random.default_rng(seed).choice(len(pool), min(queries, len(pool)),
                                               replace=False)
    observed = []
    bar = progress(len(picks), "ensemble fit: short trainings") if progress else None
    for index in picks:
        observed.append(short_training_accuracy(space, pool[index], data, query_epochs, seed))
        if bar is not None:
            bar.update(1, val_acc=observed[-1])
    if bar is not None:
        bar.close()
    ranks = {m: percentile_ranks(reference[m])[picks] for m in members}
    fit = fit_ensemble(ranks, observed, candidates=candidate_ensembles(members), prior=prior,
                       seed=seed)
    log(f"ensemble objective: {fit.chosen.label} (fitted on {len(picks)} short trainings; "
        "queried tau " + ", ".join(f"{k} {v:.2f}" for k, v in fit.taus.items()
                                   if v is not None) + ")")
    return EnsembleObjective(fit.chosen, reference, fit, [pool[i].digest for i in picks],
                             observed)
