"""Element-wise weight importance scores behind one contract (Torch-Pruning style).

An :class:`Importance` is called with one weight tensor or a mapping ``name -> weight`` and
returns scores of the same shape(s); **higher means more important**. Scores of different
layers are meant to be compared: pruning the globally lowest scores *is* the allocation a
method implies (global magnitude, LAMP, DIMAP). Every score here is monotone in ``|w|`` inside a
layer, so they differ only in how layers (or modules) are weighed against each other.

* :class:`MagnitudeImportance` — ``|w|^p`` (Han et al. 2015); ``normalizer="lamp"`` turns it
  into LAMP (composition, not a copy).
* :class:`LAMPImportance` — Lee et al., "Layer-adaptive Sparsity for the Magnitude-based
  Pruning", ICLR 2021 (the LAMP score).
* :class:`DIMAPImportance` — He & Zhou, "Data-independent Module-aware Pruning for Hierarchical
  Vision Transformers", ICLR 2024, Eq. 10 ranked within modules (one threshold per module).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn as nn


def check_finite(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the first weight with NaN or inf entries."""
    for name, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise ValueError(f"layer {name!r} has NaN or inf weights; cannot rank them")


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry (Lee et al. 2021).

    ``score(w) = w^2 / sum of v^2 over the weights v of the same tensor with |v| >= |w|``.
    The paper indexes weights in ascending order and sums over indices ``>= u``, which, for
    tied magnitudes, gives tied weights different scores depending on their position; here the
    sum includes *all* ties, so equal weights score equally (identical when there are no ties).
    The largest weight scores 1; an all-zero tensor scores 0 everywhere.
    """
    squared = weight.detach().double().pow(2).flatten()
    if squared.numel() == 0:
        return squared.view_as(weight)
    values, order = torch.sort(squared)
    # Sum of everything from each sorted position upwards, then extended over equal values.
    suffix = values.flip(0).cumsum(0).flip(0)
    first_of_value = torch.searchsorted(values, values, right=False)
    denominator = suffix[first_of_value]
    sorted_scores = torch.where(
        denominator > 0, values / denominator.clamp_min(1e-300), torch.zeros_like(values)
    )
    scores = torch.empty_like(squared)
    scores[order] = sorted_scores
    return scores.view_as(weight).to(torch.float64)


class Importance:
    """``__call__(weight) -> scores`` or ``__call__({name: weight}) -> {name: scores}``."""

    @overload
    def __call__(self, weights: torch.Tensor) -> torch.Tensor: ...

    @overload
    def __call__(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def __call__(self, weights):
        if isinstance(weights, torch.Tensor):
            return self.score({"weight": weights})["weight"]
        named = {name: w.detach() for name, w in weights.items()}
        check_finite(named)
        return self.score(named)

    def score(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scores for all tensors at once (override for cross-layer normalisation)."""
        return {name: self.score_tensor(w) for name, w in weights.items()}

    def score_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-weight scores of one tensor; a subclass overrides this or :meth:`score`."""
        raise TypeError(f"{type(self).__name__} overrides neither score_tensor nor score")


class MagnitudeImportance(Importance):
    """``|w|^p`` (p = 1: L1, p = 2: L2), optionally normalised per layer.

    ``normalizer="lamp"`` divides by the squared magnitudes of the layer's larger weights
    (LAMP); ``"max"`` divides by the layer's largest ``|w|^p``.
    """

    def __init__(self, p: int = 1, normalizer: Literal["lamp", "max"] | None = None):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        if normalizer not in (None, "lamp", "max"):
            raise ValueError(f"normalizer must be None, 'lamp' or 'max', got {normalizer!r}")
        self.p, self.normalizer = p, normalizer

    def score_tensor(self, weight: torch.Tensor) -> torch.Tensor:
        if self.normalizer == "lamp":
            return lamp_scores(weight)
        scores = weight.detach().abs().double().pow(self.p)
        if self.normalizer == "max":
            peak = scores.max() if scores.numel() else scores.new_tensor(0.0)
            return scores / peak if peak > 0 else scores
        return scores


class LAMPImportance(MagnitudeImportance):
    """LAMP (Lee et al. 2021): a global threshold on these scores is the LAMP allocation."""

    def __init__(self) -> None:
        super().__init__(p=2, normalizer="lamp")


@dataclass(frozen=True)
class ModuleRule:
    """A DIMAP module: the prunable weights whose name matches ``regex`` (searched) or whose
    layer type is ``op`` (class name, e.g. ``"Linear"``). Exactly one of the two is set."""

    name: str
    regex: str | None = None
    op: str | None = None

    def __post_init__(self) -> None:
        if (self.regex is None) == (self.op is None):
            raise ValueError(f"module {self.name!r} needs exactly one of 'regex' or 'op'")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(
                    f"module {self.name!r}: invalid regex {self.regex!r}: {exc}"
                ) from None

    def matches(self, parameter_name: str, layer: nn.Module | None) -> bool:
        if self.regex is not None:
            return re.search(self.regex, parameter_name) is not None
        return layer is not None and type(layer).__name__ == self.op


# Patch embedding, norms and the classifier match none of these, so they stay dense (DIMAP's
# auxiliary module, kept unpruned in the paper).
VIT_MODULES = (
    ModuleRule("qkv", regex=r"attn\.(q|k|v|qkv)\.weight$"),
    ModuleRule("proj", regex=r"attn\.proj\.weight$"),
    ModuleRule("mlp", regex=r"mlp\.fc[12]\.weight$"),
)

# The same three modules in the attention layouts users bring: slimline's zoo ViT; Hugging Face
# BERT/RoBERTa/ViT (``attention.self.query`` / ``attention.attention.query``,
# ``attention.output.dense``, ``intermediate.dense`` + the block's ``output.dense``), GPT-2
# (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``/``mlp.c_proj``), Llama-style
# (``self_attn.q_proj`` ... ``o_proj``, ``mlp.gate/up/down_proj``; transformers 5's ViT
# names them ``attention.q_proj`` ... ``o_proj``) and torch's own
# ``nn.TransformerEncoderLayer`` (``self_attn.in_proj_weight``, ``out_proj``, ``linear1/2``).
# First rule wins, so the attention output projection is claimed before the FFN's
# ``output.dense`` rule can see it.
TRANSFORMER_MODULES = (
    ModuleRule("qkv", regex=r"((attn\.(q|k|v|qkv)|attention\.(self|attention)\.(query|key|value)|"
                            r"attn\.c_attn|(attn|attention|self_attn)\.(q|k|v|qkv)_proj)\.weight|"
                            r"self_attn\.(in|q|k|v)_proj_weight)$"),
    ModuleRule("proj", regex=r"(attn\.proj|attention\.output\.dense|attn\.c_proj|"
                             r"(attn|attention|self_attn)\.(out_proj|o_proj))\.weight$"),
    ModuleRule("mlp", regex=r"(mlp\.fc[12]|intermediate\.dense|output\.dense|mlp\.c_(fc|proj)|"
                            r"mlp\.(gate|up|down)_proj|linear[12])\.weight$"),
)


def assign_modules(
    model: nn.Module, names: Sequence[str], rules: Sequence[ModuleRule]
) -> dict[str, str]:
    """``parameter name -> module name`` for every name a rule matches (first rule wins).

    Names no rule matches are left out (the caller keeps them dense). Raises ``ValueError`` if a
    rule matches none of ``names``, listing what it could have matched.
    """
    layers = dict(model.named_modules())
    assignment: dict[str, str] = {}
    for rule in rules:
        matched = [
            n
            for n in names
            if n not in assignment
            and rule.matches(n, layers.get(n.rsplit(".", 1)[0] if "." in n else ""))
        ]
        if not matched:
            what = f"regex {rule.regex!r}" if rule.regex is not None else f"op {rule.op!r}"
            shown = ", ".join(list(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"module {rule.name!r} ({what}) matches no prunable weight "
                f"(candidates: {shown or 'none'})"
            )
        assignment.update(dict.fromkeys(matched, rule.name))
    return assignment


class DIMAPImportance(Importance):
    """Module-aware DIMAP scores (He & Zhou 2024).

    Inside a layer the metric is Eq. 10, ``w^2 / sum of the layer's squared weights >= |w|``
    (the relative Frobenius distortion of removing ``w`` once the smaller weights are gone, the
    same quantity as :func:`lamp_scores`). Weights are compared only within their module
    (e.g. all q/k/v layers of every block), with one threshold per module so each module loses
    the same fraction. To let one global threshold do that, the returned score of a weight is
    its Eq. 10 rank within its module divided by the module size, in ``(0, 1]``.
    ``module_of`` maps every scored weight name to its module.
    """

    def __init__(self, module_of: Mapping[str, str]):
        self.module_of = dict(module_of)

    def eq10_scores(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The raw Eq. 10 metric per weight (no module ranking)."""
        return {name: lamp_scores(w) for name, w in weights.items()}

    def score(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unknown = [n for n in weights if n not in self.module_of]
        if unknown:
            raise ValueError(f"{unknown[0]!r} belongs to no DIMAP module")
        raw = self.eq10_scores(weights)
        scores: dict[str, torch.Tensor] = {}
        for module in dict.fromkeys(self.module_of[n] for n in weights):
            members = [n for n in weights if self.module_of[n] == module]
            flat = torch.cat([raw[n].flatten() for n in members])
            ranks = torch.empty_like(flat)
            ranks[torch.argsort(flat, stable=True)] = torch.arange(
                1, flat.numel() + 1, dtype=flat.dtype
            )
            # Ties keep their original order, so the ranking and the Eq. 10 order agree.
            quantile = ranks / flat.numel()
            offset = 0
            for n in members:
                scores[n] = quantile[offset : offset + weights[n].numel()].view_as(weights[n])
                offset += weights[n].numel()
        return scores

    def module_thresholds(
        self, weights: Mapping[str, torch.Tensor], pruned: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        """Per module, the largest Eq. 10 score among pruned weights (``pruned``: bool masks,
        True = removed): everything at or below it in that module is pruned."""
        raw = self.eq10_scores({n: w.detach() for n, w in weights.items()})
        thresholds: dict[str, float] = {}
        for name, scores in raw.items():
            module = self.module_of[name]
            removed = scores[pruned[name]]
            if removed.numel():
                thresholds[module] = max(thresholds.get(module, 0.0), float(removed.max()))
        return thresholds


def make_importance(name: str, *, module_of: Mapping[str, str] | None = None) -> Importance:
    """Importance by recipe name: ``magnitude`` (L1), ``l2``, ``lamp`` or ``dimap``."""
    if name == "magnitude":
        return MagnitudeImportance(p=1)
    if name == "l2":
        return MagnitudeImportance(p=2)
    if name == "lamp":
        return LAMPImportance()
    if name == "dimap":
        if module_of is None:
            raise ValueError("dimap needs a module assignment (see assign_modules)")
        return DIMAPImportance(module_of)
    raise ValueError(f"unknown importance {name!r}; use magnitude, l2, lamp or dimap")
