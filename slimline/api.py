"""The Python API: one call per family, each taking the config dataclass its recipe stage uses.

    import slimline
    from slimline import UnstructuredConfig, RTNConfig, ExportConfig

    slimline.train(model, data, slimline.TrainParams(epochs=3))
    pruned = slimline.prune(model, UnstructuredConfig(sparsity=0.5), data=data)   # data-free DP
    slimline.quantize(model, RTNConfig(), data=data, target="auto")              # int8 grids
    slimline.export_model(model, data.x_test[:2], "model.onnx", ExportConfig(format="int8"),
                          parity_inputs=data.x_test[:64])
    found = slimline.nas(teacher, data, slimline.NasConfig(trials=40, max_params=20_000))
    slimline.distill(found.model, teacher, data, slimline.DistillConfig(loss="dist"))

Every call changes the model in place and returns what it did (masks, state, metrics). The
recipe runner (:func:`run`, :func:`validate`) calls exactly these through thin stage adapters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from slimline.dag import Plan, build_plan
from slimline.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from slimline.compress.deploy import ExportConfig, ExportResult
    from slimline.compress.methods import ProgressFactory, PruneResult, QuantizeResult
    from slimline.data import Dataset
    from slimline.export.target import Target
    from slimline.progress import Progress
    from slimline.search.distill import DistillConfig, DistillResult
    from slimline.search.nas_config import NasConfig
    from slimline.search.nas_search import NasResult
    from slimline.training import TrainParams

__all__ = ["distill", "export_model", "nas", "prune", "quantize", "train", "validate"]


def validate(recipe: str | Path | dict[str, Any] | Recipe) -> Plan:
    """Parse and validate a recipe without running anything; returns the ordered plan.

    Raises :class:`slimline.RecipeError` naming the file, line and key of the first problem.
    """
    return build_plan(recipe if isinstance(recipe, Recipe) else load_recipe(recipe))


def _example(example_input: torch.Tensor | None, data: Dataset | None) -> torch.Tensor | None:
    """The given example, else one N(0, 1) batch of the dataset's input shape."""
    if example_input is not None or data is None:
        return example_input
    return data.input_spec.random(1)


def prune(
    model: nn.Module,
    config: Any,
    *,
    data: Dataset | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> PruneResult:
    """Prune ``model`` in place as ``config`` says (``MagnitudeConfig``, ``UnstructuredConfig``,
    ``ChannelConfig``, ``NMConfig``, ``PlainChannelsConfig``, ``NeuronMergingConfig``,
    ``PDPConfig``). Data-free methods never read ``data`` (it only gives the input shape when
    ``example_input`` is missing); PDP trains on it. See :func:`slimline.compress.methods.prune`.
    """
    from slimline.compress.methods import prune as run

    return run(model, config, data=data if config.uses_data() else None, masks=masks,
               example_input=_example(example_input, data), seed=seed, progress=progress,
               input_spec=data.input_spec if data is not None else None)


def quantize(
    model: nn.Module,
    config: Any,
    *,
    data: Dataset | None = None,
    target: Target | str | None = "auto",
    masks: dict[str, torch.Tensor] | None = None,
    example_input: torch.Tensor | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> QuantizeResult:
    """Quantize ``model`` in place as ``config`` says (``RTNConfig``, ``DataFreeConfig``,
    ``DFQConfig``, ``UDFCConfig``, ``QATConfig``) for the CPU ``target`` (``"auto"``: this one;
    see :mod:`slimline.export.target`)."""
    from slimline.compress.methods import quantize as run

    return run(model, config, data=data if config.uses_data() else None, target=target,
               masks=masks, example_input=_example(example_input, data), seed=seed,
               progress=progress, input_spec=data.input_spec if data is not None else None)


def export_model(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    parity_inputs: torch.Tensor | None = None,
    target: Target | str | None = "auto",
) -> ExportResult:
    """Write ``model`` as fp32 or int8 QDQ ONNX and check it against PyTorch on
    ``parity_inputs`` (see :func:`slimline.compress.deploy.export_model`). Named so because
    :mod:`slimline.export` is the ONNX/latency package."""
    from slimline.compress.deploy import export_model as run

    return run(model, example_input, path, config, parity_inputs=parity_inputs, target=target)


def nas(
    teacher: nn.Module | None,
    data: Dataset,
    config: NasConfig | None = None,
    *,
    seed: int = 0,
    work_dir: str | os.PathLike | None = None,
    study_name: str | None = None,
    progress: ProgressFactory | None = None,
) -> NasResult:
    """Search ``config.space`` for a student architecture, training-free and latency-aware
    (NSGA-II/TPE/random over an Optuna study, or RoBoT over a pool; the default objective is a
    rank ensemble of zero-cost proxies fitted on a few short trainings). Returns the chosen
    student freshly initialised, every candidate and the report files (``search.json``,
    ``search.md``, ``pareto.png`` in ``work_dir``, default a new temporary folder). Named so
    because :mod:`slimline.search` is the search package; see
    :func:`slimline.search.nas_search.search_architecture`."""
    from slimline.search.nas_search import search_architecture

    return search_architecture(teacher, data, config, seed=seed, work_dir=work_dir,
                               study_name=study_name, progress=progress)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    config: DistillConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> DistillResult:
    """Train ``student`` in place toward the frozen ``teacher`` (KD, DIST, Sinkhorn, FitNets
    hint or DisWOT terms; see :func:`slimline.search.distill.distill`)."""
    from slimline.search.distill import distill as run

    return run(student, teacher, data, config, masks=masks, seed=seed, progress=progress)


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainParams | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, float]]:
    """Train or fine-tune ``model`` in place (the ``train`` stage's loop: AdamW or SGD,
    warm-up + cosine); ``masks`` keep pruned weights at zero. Returns the per-epoch history."""
    from slimline.training import TrainParams, fit

    return fit(model, data, config or TrainParams(), masks=masks, seed=seed, progress=progress)
