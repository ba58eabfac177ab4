"""Where a model computes self-attention, whatever its layout, for the transformer proxies.

An :class:`AttentionSite` is one self-attention computation: the module whose forward computes
it (hooked to recompute the attention probabilities from its inputs), its heads, and its
projection matrices (query, key, value, output) as :class:`WeightView` slices, so fused
layouts give the same per-projection matrices as separate ones. Layouts recognised:

* **separate projections** — Linear query/key/value on the module: the zoo ``vit``
  (``q``/``k``/``v``/``proj``), Hugging Face BERT and ViT < 5 (``query``/``key``/``value``, the
  output projection in the sibling ``output.dense``), Hugging Face ViT >= 5 and other
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` layouts. Heads come from ``num_heads`` /
  ``num_attention_heads``, the head size from ``head_dim`` / ``attention_head_size``.
* **torch** ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` /
  ``DecoderLayer``): packed ``in_proj_weight`` or separate ``q/k/v_proj_weight``, ``out_proj``,
  ``batch_first`` either way, ``attn_mask`` / ``key_padding_mask`` / ``is_causal``.
* **GPT-2** (Hugging Face): fused ``c_attn`` ``Conv1D`` (weight ``(in, 3 * out)``), ``c_proj``,
  causal, with the layer-index scaling option.

Rotary position embeddings (Llama-style) are applied inside the attention function, not to the
projections' outputs, so such modules are not recognised rather than scored wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "AttentionSite",
    "WeightView",
    "attention_sites",
    "block_weights",
    "is_weight_layer",
]

QUERY_NAMES = ("q", "query", "q_proj")
KEY_NAMES = ("k", "key", "k_proj")
VALUE_NAMES = ("v", "value", "v_proj")
OUTPUT_NAMES = ("proj", "o_proj", "out_proj")
HEAD_COUNT_NAMES = ("num_heads", "num_attention_heads", "n_heads")
HEAD_SIZE_NAMES = ("head_dim", "attention_head_size")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): y = x @ W + b with W of shape (in, out).
    # Recognised by name and shape so that transformers need not be importable.
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def is_weight_layer(module: nn.Module) -> bool:
    """A dense layer of a transformer block: ``nn.Linear`` or Hugging Face's ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_hf_conv1d(module)


@dataclass(frozen=True)
class WeightView:
    """A weight matrix, or a slice of a fused one (``dim``, ``start:stop``): the value and the
    gradient of exactly one projection."""

    parameter: nn.Parameter
    dim: int = 0
    start: int = 0
    stop: int | None = None

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.stop is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)

    def tensor(self) -> torch.Tensor:
        """The slice, still part of the autograd graph."""
        return self._slice(self.parameter)

    def value(self) -> torch.Tensor:
        return self._slice(self.parameter.detach())

    def grad(self) -> torch.Tensor | None:
        grad = self.parameter.grad
        return None if grad is None else self._slice(grad)


Probabilities = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]


@dataclass
class AttentionSite:
    """One self-attention computation: ``probabilities(args, kwargs)`` turns the hooked
    module's forward inputs into softmax attention ``(b, heads, N_query, N_key)``."""

    module: nn.Module
    layout: str
    num_heads: int
    head_dim: int
    projections: dict[str, WeightView]  # "query", "key", "value", "output"
    probabilities: Probabilities = field(repr=False)


# ---- shared math -------------------------------------------------------------------------------
def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(b, n, heads * head_dim) -> (b, heads, n, head_dim)."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, head_dim).transpose(1, 2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                       additive: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                       causal: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` (Vaswani et al., 2017, eq. 1) for ``(b, h, n, d)``
    queries and keys; ``additive`` is added to the logits, ``keep`` (bool) masks out
    ``False`` positions, ``causal`` masks keys after the query."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if additive is not None:
        scores = scores + additive.to(scores.dtype)
    if keep is not None:
        scores = scores.masked_fill(~keep, -math.inf)
    if causal:
        n, m = scores.shape[-2:]
        upper = torch.ones(n, m, dtype=torch.bool, device=scores.device).triu(m - n + 1)
        scores = scores.masked_fill(upper, -math.inf)
    return torch.softmax(scores, dim=-1)


def _hf_mask(mask: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A Hugging Face attention mask as (additive, keep): float masks are added to the logits
    (the eager path's convention), bool masks keep ``True`` positions (the SDPA convention)."""
    if not isinstance(mask, torch.Tensor):
        return None, None
    return (None, mask) if mask.dtype == torch.bool else (mask, None)


def _argument(args: Sequence[Any], kwargs: dict[str, Any], name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _first_attr(module: nn.Module, names: Sequence[str]) -> Any:
    return next((getattr(module, n) for n in names if hasattr(module, n)), None)


# ---- layouts -------------------------------------------------------------------------------------
def _separate_site(module: nn.Module, parent: nn.Module | None) -> AttentionSite | None:
    q, k, v = (_first_attr(module, names) for names in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES))
    heads = _first_attr(module, HEAD_COUNT_NAMES)
    if not (all(isinstance(m, nn.Linear) for m in (q, k, v)) and isinstance(heads, int)):
        return None
    head_dim = _first_attr(module, HEAD_SIZE_NAMES) or q.out_features // heads
    if q.out_features != heads * head_dim or k.out_features != q.out_features:
        return None  # grouped-query attention (fewer key heads) is not one of our layouts
    output = _first_attr(module, OUTPUT_NAMES)
    if not isinstance(output, nn.Linear):
        sibling = getattr(parent, "output", None) if parent is not None else None
        output = getattr(sibling, "dense", None)  # BERT / ViT < 5: BertSelfOutput.dense
    scale = getattr(module, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim**-0.5
    causal = bool(getattr(module, "is_causal", False))

    def probabilities(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        tokens = _argument(args, kwargs, "hidden_states", 0)
        additive, keep = _hf_mask(_argument(args, kwargs, "attention_mask", 1))
        return _softmax_attention(_heads(q(tokens), heads, head_dim),
                                  _heads(k(tokens), heads, head_dim), scale, additive, keep,
                                  causal)

    views = {"query": WeightView(q.weight), "key": WeightView(k.weight),
             "value": WeightView(v.weight)}
    if isinstance(output, nn.Linear):
        views["output"] = WeightView(output.weight)
    return AttentionSite(module, "separate", heads, head_dim, views, probabilities)


def _torch_mha_site(module: nn.MultiheadAttention) -> AttentionSite:
    heads, embed = module.num_heads, module.embed_dim
    head_dim = embed // heads
    if module._qkv_same_embed_dim:
        weights = [WeightView(module.in_proj_weight, 0, i * embed, (i + 1) * embed)
                   for i in range(3)]
    else:
        weights = [WeightView(w) for w in (module.q_proj_weight, module.k_proj_weight,
                                           module.v_proj_weight)]
    bias = module.in_proj_bias

    def project(x: torch.Tensor, index: int) -> torch.Tensor:
        b = None if bias is None else bias[index * embed:(index + 1) * embed]
        return nn.functional.linear(x, weights[index].tensor(), b)

    def probabilities(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not "
                             "supported by the attention tap")
        query = _argument(args, kwargs, "query", 0)
        key = _argument(args, kwargs, "key", 1)
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        if query.dim() == 2:  # unbatched (L, E)
            query, key = query.unsqueeze(0), key.unsqueeze(0)
        q, k = _heads(project(query, 0), heads, head_dim), _heads(project(key, 1), heads,
                                                                    head_dim)
        mask = _argument(args, kwargs, "attn_mask", 5)
        padding = _argument(args, kwargs, "key_padding_mask", 3)
        additive, keep = None, None
        if isinstance(mask, torch.Tensor):
            if mask.dim() == 3:  # (b * heads, L, S)
                mask = mask.reshape(q.shape[0], heads, *mask.shape[-2:])
            # torch's convention: True = not allowed (the opposite of Hugging Face's SDPA).
            keep, additive = (~mask, None) if mask.dtype == torch.bool else (None, mask)
        if isinstance(padding, torch.Tensor):
            pad = padding[:, None, None, :]
            if pad.dtype == torch.bool:
                keep = ~pad if keep is None else keep & ~pad
            else:
                additive = pad if additive is None else additive + pad
        causal = bool(_argument(args, kwargs, "is_causal", 7)) and mask is None
        return _softmax_attention(q, k, head_dim**-0.5, additive, keep, causal)

    views = dict(zip(("query", "key", "value"), weights))
    views["output"] = WeightView(module.out_proj.weight)
    return AttentionSite(module, "torch-mha", heads, head_dim, views, probabilities)


def _gpt2_site(module: nn.Module) -> AttentionSite | None:
    fused, output = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    # c_attn is a Conv1D as transformers builds it, or the equivalent nn.Linear after
    # slimline.models.hf.linearize_conv1d (weight transposed: (3 * out, in)).
    linear = isinstance(fused, nn.Linear)
    if not (fused is not None and (_is_hf_conv1d(fused) or linear) and isinstance(heads, int)
            and isinstance(head_dim, int)) or getattr(module, "is_cross_attention", False):
        return None
    width = heads * head_dim
    if fused.weight.shape[0 if linear else 1] != 3 * width:
        return None
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, (int, float)):  # transformers < 5 kept only the two flags
        scale = head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(module.layer_idx + 1)

    def probabilities(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        tokens = _argument(args, kwargs, "hidden_states", 0)
        q, k, _ = fused(tokens).split(width, dim=2)
        additive, keep = _hf_mask(_argument(args, kwargs, "attention_mask", 2))
        return _softmax_attention(_heads(q, heads, head_dim), _heads(k, heads, head_dim),
                                  float(scale), additive, keep, causal=True)

    # Conv1D stores (in, out): the query is columns [0, width), and so on (rows for a Linear).
    views = {name: WeightView(fused.weight, 0 if linear else 1, i * width, (i + 1) * width)
             for i, name in enumerate(("query", "key", "value"))}
    if output is not None and (_is_hf_conv1d(output) or isinstance(output, nn.Linear)):
        views["output"] = WeightView(output.weight)
    return AttentionSite(module, "gpt2", heads, head_dim, views, probabilities)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every self-attention computation of ``model`` in module order (see the module doc)."""
    parents = {id(child): module for module in model.modules() for child in module.children()}
    sites = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            sites.append(_torch_mha_site(module))
            continue
        site = _gpt2_site(module) or _separate_site(module, parents.get(id(module)))
        if site is not None:
            sites.append(site)
    return sites


def block_weights(model: nn.Module, sites: Sequence[AttentionSite],
                  exclude: Sequence[nn.Module] = ()) -> list[nn.Module]:
    """The feed-forward (MLP) layers of the transformer blocks: for each site, the closest
    ancestor that holds a dense layer other than an attention projection is its block, and
    that block's other dense layers are its MLP. ``exclude`` (e.g. the classifier) never
    counts. Layers shared by several blocks are listed once, in module order."""
    projection_params = {id(view.parameter) for site in sites
                         for view in site.projections.values()}
    excluded = {id(m) for m in exclude}
    parents = {id(child): module for module in model.modules() for child in module.children()}

    def mlp_layers(scope: nn.Module) -> list[nn.Module]:
        return [m for m in scope.modules() if is_weight_layer(m) and id(m) not in excluded
                and id(m.weight) not in projection_params]

    chosen: dict[int, nn.Module] = {}
    for site in sites:
        scope = parents.get(id(site.module))
        while scope is not None and not mlp_layers(scope):
            scope = parents.get(id(scope))
        if scope is not None:
            chosen |= {id(m): m for m in mlp_layers(scope)}
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(chosen.values(), key=lambda m: order[id(m)])
