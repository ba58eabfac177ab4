"""Wiring QAT into a model: weight quantizers as parametrizations, LSQ activation quantizers on
the inputs of quantized layers, QKR on attention, oscillation tracking and CGA freezing.

Everything it adds is removed by :meth:`QATController.finish`, which leaves the plain
architecture with weights on their grids and the :class:`~slimline.compress.quant.state.QuantState`
attached (so artifacts save and the int8 exporter reads it like any other quantizer's).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from slimline.compress.quant.qat.cga import FrozenWeights, confident_mask
from slimline.compress.quant.qat.config import QATConfig
from slimline.compress.quant.qat.lsq import LSQQuantizer
from slimline.compress.quant.qat.oscillation import OscillationTracker
from slimline.compress.quant.qat.qkr import (
    attention_layout,
    merged_query_key,
    qkr_forward,
    verify_qkr,
)
from slimline.compress.quant.qat.statsq import StatsQQuantizer, statsq_scale, statsq_spec
from slimline.compress.quant.rtn import quantizable_modules
from slimline.compress.quant.spec import QuantSpec
from slimline.compress.quant.state import QuantState, TensorPoint, attach_quantization
from slimline.compress.quant.target import Target, WeightGrid, layer_weight_bits, scheme_record

__all__ = ["QATConfig", "QATController"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _position(quantizer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Continuous level position whose rounding is the integer level (what CGA measures).

    Clipped weights sit at the centre of their extreme level (distance 1/2 from any boundary):
    for StatsQ, ``clamp(w/s, -1, 1)·n − 1/2`` reaches ``±n − 1/2`` there, which looks like a
    rounding boundary but is not one (the integer is clamped to ``[−n, n−1]``), and treating
    those weights — the largest, which set ``s`` — as unconfident kept them training through
    CGA and moving every row's scale."""
    if isinstance(quantizer, StatsQQuantizer):
        n = 2 ** (quantizer.bits - 1)
        return torch.clamp(torch.clamp(weight / statsq_scale(weight), -1, 1) * n - 0.5, -n, n - 1)
    step = quantizer._view(weight).detach()
    return torch.clamp(weight / step, quantizer.qmin, quantizer.qmax)


class _QuantizeInput:
    """Forward pre-hook: the module's own ``input_quantizer`` on its first input."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (module.input_quantizer(args[0]), *args[1:])


class QATController:
    """Installs QAT on ``model`` (in place); see the module docstring."""

    def __init__(self, model: nn.Module, config: QATConfig,
                 target: Target | str | None = "auto"):
        self.model, self.config, self.target = model, config, target
        self.tracker = OscillationTracker(config.oscillation_momentum, config.oscillation_threshold)
        self.frozen = FrozenWeights()
        self.attentions = {
            name: m for name, m in model.named_modules()
            if config.qkr and attention_layout(m) is not None
        }
        self.layouts = {name: attention_layout(m) for name, m in self.attentions.items()}
        if config.qkr and not self.attentions:
            raise ValueError(
                "qkr: no attention block of a layout QKR knows (slimline's ViT Attention, "
                "BERT-style SelfAttention, q_proj/k_proj/v_proj/o_proj self-attention) in "
                f"{type(model).__name__}; torch's MultiheadAttention, fused qkv (GPT-2), "
                "rotary and cross-attention have no merged query-key form here: set qkr: false")
        qk = {f"{a}.{getattr(self.layouts[a], p)}" for a in self.attentions for p in ("q", "k")}
        # MultiheadAttention's out_proj (bypassed by its forward) and tied weights stay float.
        usable = quantizable_modules(model)
        self.layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, _LAYERS)
            and name in usable
            and name not in qk
            and not (config.skip and re.search(config.skip, name))
        }
        self.qk_quantizers: dict[str, StatsQQuantizer] = {}
        self.layer_bits: dict[nn.Module, int] = {}
        self._handles: list[Any] = []
        self.annealing = False  # CGA phase: the frozen set is re-chosen after every step

    def _weight_quantizer(self, module: nn.Module) -> nn.Module:
        weight = module.weight.detach()
        if self.config.weight_quantizer == "statsq":
            return StatsQQuantizer(self._bits(module, "odd"))
        quantizer = LSQQuantizer(self._bits(module, "affine"), per_row=True)
        quantizer.initialize(weight)
        return quantizer

    def _bits(self, module: nn.Module, grid: WeightGrid) -> int:
        """The configured weight bits, lowered where the target's kernels need it."""
        bits = layer_weight_bits(module, self.config.weight_bits, self.target, grid=grid)
        self.layer_bits[module] = bits
        return bits

    def install(self, calibration: torch.Tensor) -> None:
        """Add the quantizers; activation steps are initialised on ``calibration`` (the same
        tensor on every process, so distributed runs start identically)."""
        if self.attentions:
            training = self.model.training
            verify_qkr(self.model, self.attentions, self.layouts, calibration[:8])
            self.model.train(training)
        for module in self.layers.values():
            parametrize.register_parametrization(module, "weight", self._weight_quantizer(module))
            module.input_quantizer = LSQQuantizer(self.config.activation_bits, per_row=False)
            self._handles.append(module.register_forward_pre_hook(_QuantizeInput()))
        for name, attention in self.attentions.items():
            layout = self.layouts[name]
            self.qk_quantizers[name] = StatsQQuantizer(self.config.weight_bits)
            quantize_input = getattr(getattr(attention, layout.v), "input_quantizer", None)
            attention.forward = qkr_forward(attention, layout, self.qk_quantizers[name],
                                            quantize_input)
        with torch.no_grad():
            self.model(calibration)

    def _quantized_weights(self) -> dict[str, tuple[nn.Module, torch.Tensor, nn.Parameter]]:
        """name -> (quantizer, float weight tensor, parameter that training updates)."""
        found = {}
        for name, module in self.layers.items():
            original = module.parametrizations.weight.original
            found[f"{name}.weight"] = (module.parametrizations.weight[0], original, original)
        return found

    @torch.no_grad()
    def after_step(self) -> None:
        """Undo updates of CGA-frozen weights, record integer levels, and while annealing
        re-choose the frozen set for the next step."""
        self.frozen.restore()
        for name, (quantizer, weight, _) in self._quantized_weights().items():
            self.tracker.update(name, quantizer.integer_levels(weight))
        for name, attention in self.attentions.items():
            merged = merged_query_key(attention, self.layouts[name])
            levels = torch.stack([self.qk_quantizers[name].integer_levels(m) for m in merged])
            self.tracker.update(f"{name}.qk_merged", levels)
        if self.annealing:
            self._freeze_confident()

    @torch.no_grad()
    def start_annealing(self) -> float:
        """CGA: from now on, before every step, freeze the confident weights at their current
        values; returns the frozen share now.

        The confident set is re-chosen after every step, as in the authors' training script: a
        weight trains only while it is within ``boundary_range`` of a rounding boundary, and is
        held as soon as a step carries it out of that band, so it can no longer flip back and
        forth (choosing the set once per epoch let the near-boundary weights oscillate freely
        for the whole epoch).

        On the QKR path the quantized tensor is the product ``W_qᵀW_k``, whose entries are not
        parameters, so CGA freezes ``W_q`` and ``W_k`` entirely (their merged levels are then
        fixed up to the StatsQ scale)."""
        self.annealing = True
        return self._freeze_confident()

    @torch.no_grad()
    def _freeze_confident(self) -> float:
        self.frozen = FrozenWeights()
        for name, (quantizer, weight, parameter) in self._quantized_weights().items():
            mask = confident_mask(_position(quantizer, weight), self.config.boundary_range)
            self.frozen.freeze(name, parameter, mask)
        for name, attention in self.attentions.items():
            for part in (self.layouts[name].q, self.layouts[name].k):
                weight = getattr(attention, part).weight
                self.frozen.freeze(
                    f"{name}.{part}.weight", weight, torch.ones_like(weight, dtype=torch.bool)
                )
        return self.frozen.share()

    def oscillation_share(self) -> float:
        return self.tracker.share()

    @torch.no_grad()
    def finish(self) -> QuantState:
        """Remove the training machinery, put weights on their grids, attach the state.

        Exported grids: StatsQ as ``scale = s/(2n)``, odd integers (see
        :mod:`slimline.compress.quant.qat.statsq`); LSQ as its learned step, integers in
        ``[-2^(b-1), 2^(b-1)-1]``; activations as signed per-tensor LSQ steps at each quantized
        layer's input. With QKR the q/k Linears stay float (their quantized product has rank up
        to D, not head_dim, so it cannot be split back into W_q, W_k); their input gets the
        activation grid of the v projection that reads the same tensor.
        """
        self.frozen, self.annealing = FrozenWeights(), False
        weights: dict[str, QuantSpec] = {}
        activations: dict[str, QuantSpec] = {}
        a_bits = self.config.activation_bits
        for name, module in self.layers.items():
            quantizer = module.parametrizations.weight[0]
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            weight = module.weight
            if isinstance(quantizer, StatsQQuantizer):
                spec, values = statsq_spec(weight, quantizer.bits)
            else:
                spec = QuantSpec(
                    bits=quantizer.bits,
                    signed=True,
                    axis=0,
                    scale=quantizer.positive_step().detach().flatten(),
                    zero_point=torch.zeros(weight.shape[0], dtype=torch.int32),
                )
                values = spec.fake_quant(weight)
            weight.copy_(values)
            weights[f"{name}.weight"] = spec
            step = module.input_quantizer.positive_step().detach().reshape(())
            activations[TensorPoint(name, "input").key] = QuantSpec(
                bits=a_bits, signed=True, scale=step, zero_point=0
            )
            del module.input_quantizer
        for handle in self._handles:
            handle.remove()
        for name, attention in self.attentions.items():
            del attention.forward
            layout = self.layouts[name]
            v_point = TensorPoint(f"{name}.{layout.v}", "input").key
            if v_point in activations:
                for part in (layout.q, layout.k):
                    activations[TensorPoint(f"{name}.{part}", "input").key] = activations[v_point]
        state = QuantState(
            weights=weights,
            activations=activations,
            method=f"qat-{self.config.weight_quantizer}",
            info={
                "weight_bits": self.config.weight_bits,
                "activation_bits": a_bits,
                "qkr": self.config.qkr,
                **scheme_record(
                    self.target,
                    self.config.weight_bits,
                    {name: self.layer_bits[m] for name, m in self.layers.items()},
                ),
            },
        )
        attach_quantization(self.model, state)
        return state
