"""Neuron Merging and the plain baseline: data-free channel pruning of prune sites.

Kim, Kim, Kim & Cha, 2020, "Neuron Merging: Compensating for Pruned Neurons" (NeurIPS). Each
pruned filter is merged into the *one* kept filter most like it, and the next layer absorbs it
(``W_{l+1}[:, k] += S * W_{l+1}[:, j]``). With a BatchNorm, channel ``c`` computes ``z_c =
R_c . x + K_c`` (``R`` the BN-folded filter, ``K`` the folded bias, see
:class:`~slimline.compress.prune.datafree_sites.ChannelFilters`). If ``R_j = S R_k`` with ``S > 0`` and
``K_j = S K_k`` then ``relu(z_j) = S relu(z_k)`` exactly, so (the paper's batch-normalization variant):

* similarity ``cos(R_j, R_k)`` and scale ``S = ||R_j|| / ||R_k||`` (norm ratio of the folded
  filters, i.e. ``||W_j|| / ||W_k||`` times the BN factor ratio ``(gamma_j / sigma_j) /
  (gamma_k / sigma_k)``);
* bias distance ``|K_j - S K_k| / S`` (what the merge gets wrong, in units of ``z_k``),
  min-max normalised over the candidates;
* the kept filter minimising ``lam * (1 - cos) + (1 - lam) * bias distance`` is chosen, and the
  merge is skipped when its cosine similarity is below ``threshold``.

Cosines on the folded filters ``R`` (not the raw conv weights) make the sign of ``gamma`` count:
a kept channel with the opposite BN sign is anti-parallel, and can never absorb with ``S > 0``.
The paper tunes ``threshold`` and ``lam`` per network; our defaults (0.1, 0.85) are not tuned.

:func:`prune_sites` prunes every site of a model with ``compensation="merge"`` (this method) or
``"none"`` (the plain baseline: the same channels removed, nothing repaired). UDFC's pruning
(a least-squares combination of all kept filters) is :func:`slimline.compress.quant.udfc.udfc_compress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from slimline.compress.prune.datafree_sites import (
    ChannelFilters,
    Criterion,
    PruneSite,
    SiteTotals,
    absorb_channels,
    channel_filters,
    compensate_mean,
    find_prune_sites,
    remove_site_channels,
    select_channels,
    site_record,
)
from slimline.compress.prune.layer_chains import forward_layer_order

__all__ = ["DataFreePruneResult", "merge_scales", "prune_sites", "select_site_channels"]


def merge_scales(
    filters: ChannelFilters, removed: torch.Tensor, *, threshold: float = 0.1, lam: float = 0.85
) -> torch.Tensor:
    """(len(removed), kept) merge matrix: row ``j`` holds ``S`` at its chosen kept channel
    (kept channels in increasing index order), or zeros where no kept filter is similar enough."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    channels = filters.weight.shape[0]
    keep = torch.ones(channels, dtype=torch.bool)
    keep[removed] = False
    kept = torch.nonzero(keep).flatten()
    folded = filters.scale[:, None] * filters.weight
    norms = folded.norm(dim=1)
    scales = torch.zeros(len(removed), len(kept), dtype=torch.float64)
    for row, j in enumerate(removed.tolist()):
        if norms[j] == 0:
            continue  # an all-zero filter outputs a constant; nothing to merge
        candidate_norms = norms[kept]
        valid = candidate_norms > 0
        if not bool(valid.any()):
            continue
        safe = torch.where(valid, candidate_norms, torch.ones_like(candidate_norms))
        cosine = (folded[kept] @ folded[j]) / (safe * norms[j])
        ratio = norms[j] / safe
        distance = (filters.shift[j] - ratio * filters.shift[kept]).abs() / ratio
        spread = distance[valid].max() - distance[valid].min()
        normalised = (
            (distance - distance[valid].min()) / spread
            if spread > 0
            else (torch.zeros_like(distance))
        )
        score = lam * (1 - cosine) + (1 - lam) * normalised
        score = torch.where(valid, score, torch.full_like(score, float("inf")))
        best = int(torch.argmin(score))
        if cosine[best] < threshold:
            continue
        scales[row, best] = ratio[best]
    return scales


def select_site_channels(
    model: nn.Module, sites: list[PruneSite], ratio: float, criterion: Criterion
) -> dict[str, torch.Tensor]:
    """The channels each site loses, chosen on ``model`` as given, before any site is repaired.

    A consumer can itself be a site (a plain conv chain): once an earlier site was absorbed into
    it (or rescaled by UDFC's ``s~``), its filter norms differ per method, and ranking them then
    would prune different channels for plain, Neuron Merging and UDFC. Ranking all sites up front
    on the trained weights removes the same channels whatever the repair (as Neuron Merging's
    official code does: it ranks the original parameters, not the merged ones).
    """
    return {
        site.name: select_channels(channel_filters(model, site), ratio, criterion, site.name)
        for site in sites
    }


@dataclass
class DataFreePruneResult(SiteTotals):
    """Per site: channels before/after, the consumer, how many pruned channels were merged."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def prune_sites(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    *,
    criterion: Literal["l1", "l2"] = "l1",
    compensation: Literal["merge", "none"] = "merge",
    threshold: float = 0.1,
    lam: float = 0.85,
    mean_correction: bool = False,
    masks: dict[str, torch.Tensor] | None = None,
) -> DataFreePruneResult:
    """Remove ``ratio`` of each prune site's channels (smallest filter L1/L2 norm of the model as
    given, :func:`select_site_channels`), in place and in forward order, merging them into kept ones (``"merge"``) or not at all (``"none"``).
    ``mean_correction`` also restores the consumer's mean input from BN statistics
    (:func:`~slimline.compress.prune.datafree_sites.compensate_mean`; not part of either method).
    ``masks`` (keep-masks by parameter name) are sliced along with the weights.

    Raises:
        ValueError: a bad ratio or criterion; LayerChainError / StructuredPruningError when the
            model cannot be traced or pruned (naming the model or the site).
    """
    if compensation not in ("merge", "none"):
        raise ValueError(f"compensation must be 'merge' or 'none', got {compensation!r}")
    model.eval()
    result = DataFreePruneResult()
    if ratio == 0:
        return result
    search = find_prune_sites(model, example_input)
    result.skipped.update(search.skipped)
    by_layer = {site.name: site for site in search.sites}
    removed_by_site = select_site_channels(model, search.sites, ratio, criterion)
    for name in forward_layer_order(model):
        site = by_layer.get(name)
        if site is None:
            continue
        filters = channel_filters(model, site)
        removed = removed_by_site[name]
        kept = len(filters.scale) - len(removed)
        scales = torch.zeros(len(removed), kept, dtype=torch.float64)
        if compensation == "merge" and len(removed):
            scales = merge_scales(filters, removed, threshold=threshold, lam=lam)
            absorb_channels(model, site, removed, scales)
        if mean_correction:
            compensate_mean(model, site, removed, scales)
        merged = int((scales != 0).any(1).sum())
        remove_site_channels(search, site, removed, masks)
        result.sites[site.name] = {**site_record(site, filters, removed), "merged": merged}
    return result
