"""``quant.qat``: low-bit quantization-aware training — LSQ baseline or OFQ (StatsQ weights,
confidence-guided annealing, query-key reparameterization), LSQ activations, optional KD.

:func:`train_qat` is the whole method on a plain module; it runs unchanged under ``torchrun``
(:func:`slimline.training.fit` shards the batches; activation steps start from the same
calibration batch on every process).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from slimline.artifact import Artifact
from slimline.compress.quant.qat import QATConfig, QATController
from slimline.data import Dataset
from slimline.params import ParamError, check_range, param
from slimline.progress import Progress
from slimline.search.distill import distillation_loss_fn
from slimline.stage import StageContext, register_stage
from slimline.stages.quant import target_metrics
from slimline.training import TrainingDiverged, TrainParams, fit, world


@dataclass
class QATParams:
    weight_quantizer: Literal["lsq", "statsq"] = param(
        "statsq", help="lsq: learned step (baseline); statsq: OFQ statistical scale, no zero"
    )
    weight_bits: int = param(3, help="weight bits (statsq: 2-7, exported as odd int8 levels)")
    activation_bits: int = param(3, help="activation bits (signed LSQ, per tensor)")
    cga: bool = param(False, help="confidence-guided annealing in the last cga_epochs")
    cga_epochs: int = param(2, help="length of the annealing phase")
    boundary_range: float = param(
        0.005,
        help="CGA: weights within this many steps of a rounding boundary keep training, the "
        "rest are frozen (the authors' code uses 0.003-0.01; 0.005 met the oscillation goal at "
        "W3/W4 in bench/bench_ofq.py, 0.02 did not)",
    )
    qkr: bool = param(False, help="quantize the merged W_q^T W_k per head (attention models)")
    skip: str | None = param(r"^(patch_embed|head)$", help="regex of layers kept in float")
    epochs: int = param(10, help="training epochs (annealing included)")
    lr: float = param(1e-3, help="peak learning rate (AdamW, cosine)")
    batch_size: int = param(64, help="samples per step (global, over all processes)")
    calibration_samples: int = param(256, help="inputs that initialise activation steps")
    oscillation_momentum: float = param(
        0.05, help="momentum of the moving oscillation frequency (~1/steps per epoch)"
    )
    oscillation_threshold: float = param(
        0.02, help="frequency above which a weight counts as oscillating"
    )
    distill: bool = param(False, help="distill from the input (float) model (Hinton KD)")
    distill_loss: Literal["kd", "dist", "sinkhorn"] = param(
        "kd", help="distillation term: Hinton KD, DIST relations or Sinkhorn OT (slimline.search.distill)"
    )
    temperature: float = param(4.0, help="distillation temperature T")
    alpha: float = param(0.5, help="weight of the distillation term (1 - alpha: labels)")

    def __post_init__(self) -> None:
        high = 7 if self.weight_quantizer == "statsq" else 8
        if not 2 <= self.weight_bits <= high:
            raise ParamError(
                "weight_bits",
                f"must be in [2, {high}] for {self.weight_quantizer}, got {self.weight_bits}",
            )
        if not 2 <= self.activation_bits <= 8:
            raise ParamError("activation_bits", f"must be in [2, 8], got {self.activation_bits}")
        if self.cga and not 0 < self.cga_epochs < self.epochs:
            raise ParamError("cga_epochs", f"must be in [1, epochs={self.epochs})")
        check_range("boundary_range", self.boundary_range, 0.0, 0.5)
        check_range("alpha", self.alpha, 0.0, 1.0)
        if self.temperature <= 0 or self.lr <= 0:
            raise ParamError("lr", "lr and temperature must be positive")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as exc:
                raise ParamError("skip", f"invalid regular expression: {exc}") from None


def train_qat(
    model: nn.Module,
    data: Dataset,
    p: QATParams,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    target: str = "auto",
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Quantization-aware training of ``model`` in place; returns (state dict, history).

    Each history record has ``oscillation_share`` (at the end of that epoch) and, in the CGA
    phase, ``frozen_share``.
    """
    controller = QATController(
        model,
        QATConfig(
            weight_quantizer=p.weight_quantizer,
            weight_bits=p.weight_bits,
            activation_bits=p.activation_bits,
            qkr=p.qkr,
            boundary_range=p.boundary_range,
            skip=p.skip,
            oscillation_momentum=p.oscillation_momentum,
            oscillation_threshold=p.oscillation_threshold,
            target=target,
        ),
    )
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
    return state.to_dict(), history


def plot_oscillation(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """PNG of the oscillating share per epoch (the report links PNGs in the stage dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["epoch"] for r in history], [100 * r["oscillation_share"] for r in history], "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("oscillating weights (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@register_stage("quant.qat", QATParams, target_aware=True)
def quant_qat(ctx: StageContext, inputs: list[Artifact], p: QATParams) -> Artifact:
    """Low-bit QAT: LSQ, or OFQ (StatsQ + CGA + QKR); tracks weight oscillation."""
    from slimline.evaluation import accuracy, predict

    source = inputs[0]
    if "quantization" in source.state:
        raise ctx.fail("the input model is already quantized; start from the float model")
    out = source.derive(copy_model=True)
    teacher = copy.deepcopy(source.model) if p.distill else None
    with ctx.progress(p.epochs, "epochs") as bar:
        try:
            state, history = train_qat(
                out.model, ctx.data, p, teacher=teacher, seed=ctx.seed, progress=bar,
                target=ctx.target.name,
            )
        except (TrainingDiverged, ValueError) as exc:
            raise ctx.fail(str(exc)) from None
    out.state["quantization"] = state
    method = (
        "lsq" if p.weight_quantizer == "lsq" else "ofq-statsq" + "+cga" * p.cga + "+qkr" * p.qkr
    )
    out.metrics = {
        "method": method,
        "weight_bits": p.weight_bits,
        "activation_bits": p.activation_bits,
        # accuracy of the model as stored (weights on the grid, activation hooks attached)
        "val_accuracy": accuracy(predict(out.model, ctx.data.x_val), ctx.data.y_val),
        "oscillation_share": history[-1]["oscillation_share"],
        "oscillation_share_per_epoch": [r["oscillation_share"] for r in history],
        "epochs": history,
        **target_metrics(state.get("info", {})),
    }
    if world()[0] == 0:
        path = ctx.work_dir / "oscillation.png"
        out.files["oscillation_plot"] = plot_oscillation(
            history, path, f"{method} W{p.weight_bits}A{p.activation_bits}"
        )
    return out
