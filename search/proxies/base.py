"""The proxy interface: inputs, the Proxy base class, the registry and ``score_architecture``.

A proxy scores an untrained model from one fixed mini-batch; **higher is always better** (each
proxy documents how its paper's quantity maps to that). ``score_architecture`` is the entry
point for searches: it builds a fresh, identically seeded model for every proxy, so proxies
that change weights (synflow's ``|theta|``, zen's Gaussian re-init) never affect each other,
and it restores grad mode, default dtype and the global RNG afterwards.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimline.registry import Registry

__all__ = [
    "Proxy",
    "ProxyError",
    "ProxyInputs",
    "get_proxy",
    "list_proxies",
    "register_proxy",
    "score_architecture",
]


@dataclass
class ProxyInputs:
    """One mini-batch from the dataset, fixed for a whole search (all architectures see it)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    teacher: nn.Module | None = None  # trained teacher, for the DisWOT proxies

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] < 2:
            raise ValueError(
                f"ProxyInputs needs x and y with the same batch size >= 2, got "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )


class ProxyError(ValueError):
    """A proxy cannot score a model; the message names the proxy and the model's problem."""

    def __init__(self, proxy: str, model: nn.Module | str, problem: str):
        self.proxy = proxy
        kind = model if isinstance(model, str) else type(model).__name__
        super().__init__(f"proxy {proxy!r} cannot score {kind}: {problem}")


class Proxy(ABC):
    """A training-free score. Subclasses set ``name`` and implement :meth:`compute`."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False

    def applicable(self, model: nn.Module) -> bool:
        """Whether this proxy is defined for ``model``'s family (checked before scoring)."""
        return True

    def why_not_applicable(self, model: nn.Module) -> str:
        return "the model family is not supported"

    @abstractmethod
    def compute(self, model: nn.Module, inputs: ProxyInputs) -> float:
        """The raw score of ``model`` on ``inputs`` (the proxy's own formula)."""

    def score(self, model: nn.Module, inputs: ProxyInputs) -> float:
        """Score ``model`` (higher = better). Raises :class:`ProxyError` when the proxy does not
        apply, the teacher is missing, or the score is NaN."""
        if self.needs_teacher and inputs.teacher is None:
            raise ProxyError(self.name, model, "it needs a teacher (ProxyInputs.teacher is None)")
        if not self.applicable(model):
            raise ProxyError(self.name, model, self.why_not_applicable(model))
        with preserved_global_state():
            value = float(self.compute(model, inputs))
        model.zero_grad(set_to_none=True)
        if math.isnan(value):
            raise ProxyError(self.name, model, "the score is NaN (degenerate activations?)")
        return value


PROXIES: Registry[type[Proxy]] = Registry("proxy")


def register_proxy(cls: type[Proxy]) -> type[Proxy]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    PROXIES.register(cls.name)(cls)
    return cls


def get_proxy(name: str) -> Proxy:
    """A fresh instance of the proxy called ``name`` (unknown names suggest the closest)."""
    return PROXIES.get(name)()


def list_proxies(pattern: str = "*") -> list[str]:
    return PROXIES.names(pattern)


@contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore grad mode and the default dtype however the body exits."""
    grad_enabled, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad_enabled)
        torch.set_default_dtype(dtype)


def score_architecture(
    build: Callable[[], nn.Module],
    names: Sequence[str],
    inputs: ProxyInputs,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Score one architecture with every proxy in ``names``.

    Each proxy gets its own model from ``build()`` right after ``torch.manual_seed(seed)``, so
    all proxies see the same initial weights and none sees another's changes. The global RNG,
    grad mode and default dtype are as before afterwards. Errors are :class:`ProxyError`.
    """
    proxies = [get_proxy(name) for name in names]
    scores: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), preserved_global_state():
        for proxy in proxies:
            torch.manual_seed(seed)
            model = build()
            scores[proxy.name] = proxy.score(model, inputs)
    return scores


# ---- helpers shared by the proxy modules ----------------------------------------------------

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """Conv and Linear layers: the "prunable" layers whose weights the gradient proxies sum
    over (as in Abdelfattah et al., 2021). Recurrent weights are added by :func:`scored_weights`."""
    return [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]


def scored_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of Conv/Linear layers plus the input/recurrent matrices of RNN modules."""
    weights = [m.weight for m in weight_layers(model)]
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            weights += [p for n, p in module.named_parameters() if n.startswith("weight_")]
    return weights


def cross_entropy_backward(model: nn.Module, inputs: ProxyInputs) -> torch.Tensor:
    """Zero grads, one forward + cross-entropy backward in train mode; returns the loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    from slimline.search.features import logits_of

    with torch.enable_grad():
        loss = F.cross_entropy(logits_of(model(inputs.x)), inputs.y)
        loss.backward()
    return loss.detach()


def correlation_eigen_score(rows: torch.Tensor, k: float = 1e-5) -> float:
    """``-sum_i [log(lambda_i + k) + 1 / (lambda_i + k)]`` over the eigenvalues of the
    correlation matrix of ``rows`` (one row per sample): Mellor et al. (2020, v1) eq. 2, also
    the hidden-covariance score of Serianni & Kalita (2023). Maximal when the rows are
    uncorrelated (all eigenvalues 1). Float64; tiny negative eigenvalues from rounding are
    clamped to 0."""
    flat = rows.detach().reshape(rows.shape[0], -1).to(torch.float64)
    corr = torch.corrcoef(flat)
    if not torch.isfinite(corr).all():
        return math.nan  # a constant row has no correlation: reported as NaN -> ProxyError
    eigenvalues = torch.linalg.eigvalsh(corr).clamp_min(0.0)
    return float(-(torch.log(eigenvalues + k) + 1.0 / (eigenvalues + k)).sum())
