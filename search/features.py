"""Feature taps for training-free proxies: what a model computes, read with forward hooks.

Nothing here changes a model: every tap registers hooks for one forward pass and removes them
(also when the forward raises). A model may return logits, a Hugging Face ``ModelOutput`` or a
tuple (:func:`logits_of`). What is tapped:

* **classifier** — the last ``nn.Linear`` in ``model.modules()`` order (registration order),
  which for every zoo model is the head that produces the logits.
* **penultimate features** — the classifier's input, ``(b, C)``: pooled features for CNNs, the
  cls token for the ViT, the last hidden state for the GRU.
* **pre-pool feature map** — the input of the last global pooling module
  (``nn.AdaptiveAvgPool1d/2d``), i.e. the last feature map before global average pooling
  ("pre-GAP", as Zen-NAS and DisWOT define it), ``(b, C, H, W)`` or ``(b, C, L)``.
* **hidden states** — the full output sequence of the last recurrent module (``nn.RNN``,
  ``nn.GRU``, ``nn.LSTM``), returned batch-first ``(b, T, H)``.
* **attention maps** — softmax attention probabilities ``(b, heads, N, N)`` of every
  self-attention site (:mod:`slimline.search.attention_sites`: the zoo ``vit``,
  ``nn.MultiheadAttention`` and the Hugging Face BERT / ViT / GPT-2 layouts), recomputed from
  the module's inputs because most implementations compute them inline (no submodule to hook)
  or not at all (SDPA).
* **ReLU inputs** — pre-activations of every ``nn.ReLU``/``nn.ReLU6`` module (functional ReLUs
  are invisible to hooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from slimline.search.attention_sites import attention_sites

__all__ = [
    "Taps",
    "attention_modules",
    "find_classifier",
    "find_global_pool",
    "find_recurrent",
    "logits_of",
    "relu_modules",
    "tap",
]

GLOBAL_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The last ``nn.Linear`` in registration order (the zoo's heads), or None."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def find_global_pool(model: nn.Module) -> nn.Module | None:
    """The last global average pooling module, or None (e.g. the ViT, which reads a token)."""
    pools = [m for m in model.modules() if isinstance(m, GLOBAL_POOLS)]
    return pools[-1] if pools else None


def find_recurrent(model: nn.Module) -> nn.RNNBase | None:
    """The last recurrent module (``nn.RNN``/``nn.GRU``/``nn.LSTM``), or None."""
    recurrent = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    return recurrent[-1] if recurrent else None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that compute self-attention, in any recognised layout
    (:func:`slimline.search.attention_sites.attention_sites`)."""
    return [site.module for site in attention_sites(model)]


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, a ``ModelOutput``'s ``logits``, or a
    tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find logits in a model output of type {type(output).__name__} "
                     "(expected a tensor, an object with .logits, or a tuple)")


def relu_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]


@dataclass
class Taps:
    """What one tapped forward pass saw (entries stay None/empty when not requested)."""

    logits: torch.Tensor | None = None
    penultimate: torch.Tensor | None = None
    pre_pool: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    attention: list[torch.Tensor] = field(default_factory=list)
    relu_inputs: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def _hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tap(
    model: nn.Module,
    x: torch.Tensor,
    *,
    penultimate: bool = False,
    pre_pool: bool = False,
    hidden_states: bool = False,
    attention: bool = False,
    relu_inputs: bool = False,
) -> Taps:
    """Run ``model(x)`` once and return the requested taps plus the logits.

    Tensors keep their autograd graph (callers that need gradients through a tap get them).
    Raises ValueError naming the missing part when the model has nothing to tap (no
    classifier, no global pool, no recurrent or attention module, no ReLU module).
    """
    found = Taps()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    kind = type(model).__name__

    def need(module: nn.Module | None, what: str) -> nn.Module:
        if module is None:
            raise ValueError(f"{kind} has no {what}")
        return module

    if penultimate:
        head = need(find_classifier(model), "nn.Linear classifier")

        def keep_penultimate(_module, args, _output):
            found.penultimate = args[0]

        handles.append(head.register_forward_hook(keep_penultimate))
    if pre_pool:
        pool = need(find_global_pool(model), "global average pooling module (pre-GAP map)")

        def keep_pre_pool(_module, args, _output):
            found.pre_pool = args[0]

        handles.append(pool.register_forward_hook(keep_pre_pool))
    if hidden_states:
        rnn = need(find_recurrent(model), "recurrent module (nn.RNN/GRU/LSTM)")

        def keep_hidden(module, _args, output):
            sequence = output[0]
            found.hidden_states = sequence if module.batch_first else sequence.transpose(0, 1)

        handles.append(rnn.register_forward_hook(keep_hidden))
    if attention:
        sites = attention_sites(model)
        if not sites:
            raise ValueError(f"{kind} has no self-attention module in a recognised layout "
                             "(zoo vit, nn.MultiheadAttention, Hugging Face BERT/ViT/GPT-2)")

        def keeper(site):
            def keep_attention(_module, args, kwargs, _output):
                found.attention.append(site.probabilities(args, kwargs))

            return keep_attention

        handles += [s.module.register_forward_hook(keeper(s), with_kwargs=True) for s in sites]
    if relu_inputs:
        relus = relu_modules(model)
        if not relus:
            raise ValueError(f"{kind} has no nn.ReLU module (functional ReLUs cannot be tapped)")

        def keep_relu(_module, args, _output):
            found.relu_inputs.append(args[0])

        handles += [m.register_forward_hook(keep_relu) for m in relus]
    with _hooks(handles):
        found.logits = logits_of(model(x))
    if attention and not found.attention:
        raise ValueError(f"{kind}'s attention modules did not run their forward (a fused "
                         "fast path, e.g. nn.TransformerEncoderLayer in eval mode without "
                         "gradients?); score it in train mode")
    return found
