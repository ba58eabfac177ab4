"""The ``quant.qat`` method on a plain module: :func:`train_qat` installs the quantizers
(:class:`~slimline.compress.quant.qat.model.QATController`), trains with
:func:`slimline.training.fit` (optionally distilled), anneals with CGA and attaches the final
state. It runs unchanged under ``torchrun`` because ``fit`` shards the batches.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch.nn as nn

from slimline.compress.methods import (
    MethodError,
    MethodInputs,
    QuantizeResult,
    register_quantizer,
)
from slimline.compress.quant.qat.config import QATConfig
from slimline.compress.quant.qat.model import QATController
from slimline.compress.quant.state import QuantState
from slimline.distillation import distillation_loss_fn
from slimline.training import TrainingDiverged, TrainParams, fit

if TYPE_CHECKING:
    from slimline.data import Dataset
    from slimline.export.target import Target
    from slimline.progress import Progress

__all__ = ["QATConfig", "quantize_qat", "train_qat"]


def train_qat(
    model: nn.Module,
    data: Dataset,
    p: QATConfig,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    target: Target | str | None = "auto",
) -> tuple[QuantState, list[dict[str, float]]]:
    """Quantization-aware training of ``model`` in place; returns (its state, history).

    Each history record has ``oscillation_share`` (at the end of that epoch) and, in the CGA
    phase, ``frozen_share``.
    """
    controller = QATController(model, p, target=target)
    controller.install(data.calibration(p.calibration_samples, seed=seed))
    anneal_from = p.epochs - p.cga_epochs if p.cga else p.epochs
    frozen: dict[int, float] = {}

    def on_epoch(epoch: int) -> dict[str, float]:
        if epoch >= anneal_from:  # the controller then re-chooses the frozen set every step
            frozen[epoch] = controller.start_annealing()
        return {}

    train = TrainParams(
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, warmup_epochs=1.0, weight_decay=0.0
    )
    loss_fn = (
        distillation_loss_fn(
            teacher, temperature=p.temperature, alpha=p.alpha, loss=p.distill_loss
        )
        if teacher is not None
        else None
    )
    shares: list[float] = []

    class _Bar:  # records the oscillation share at every epoch end, then forwards to progress
        def update(self, n: int, **values: float) -> None:
            shares.append(controller.oscillation_share())
            if progress is not None:
                progress.update(n, **values)

    history = fit(
        model,
        data,
        train,
        seed=seed,
        progress=_Bar(),  # type: ignore[arg-type]
        loss_fn=loss_fn,
        on_step=controller.after_step,
        on_epoch=on_epoch,
    )
    for epoch, record in enumerate(history):
        record["oscillation_share"] = shares[epoch]
        if epoch in frozen:
            record["frozen_share"] = frozen[epoch]
    state = controller.finish()
    return state, history


@register_quantizer(QATConfig)
def quantize_qat(model: nn.Module, config: QATConfig, inputs: MethodInputs) -> QuantizeResult:
    """Train ``model`` quantized in place (distilled from its float self when
    ``config.distill``) and attach the resulting state."""
    from slimline.compress.quant.rtn import refuse_quantized
    from slimline.compress.quant.target import target_metrics
    from slimline.evaluation import accuracy, predict

    p = config
    refuse_quantized(model)
    data = inputs.require_data("quant.qat")
    teacher = inputs.teacher if inputs.teacher is not None else (
        copy.deepcopy(model) if p.distill else None)
    with inputs.progress(p.epochs, "epochs") as bar:
        try:
            state, history = train_qat(model, data, p, teacher=teacher, seed=inputs.seed,
                                       progress=bar, target=inputs.target)
        except (TrainingDiverged, ValueError) as exc:
            raise MethodError(str(exc)) from None
    method = ("lsq" if p.weight_quantizer == "lsq"
              else "ofq-statsq" + "+cga" * p.cga + "+qkr" * p.qkr)
    metrics = {
        "method": method,
        "weight_bits": p.weight_bits,
        "activation_bits": p.activation_bits,
        # accuracy of the model as stored (weights on the grid, activation hooks attached)
        "val_accuracy": accuracy(predict(model, data.x_val), data.y_val),
        "oscillation_share": history[-1]["oscillation_share"],
        "oscillation_share_per_epoch": [r["oscillation_share"] for r in history],
        "epochs": history,
        **target_metrics(state.info),
    }
    return QuantizeResult(model, state, metrics, extras={"history": history, "method": method})
