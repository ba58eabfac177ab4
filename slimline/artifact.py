"""The Artifact: what flows between stages, and how it is stored without pickling modules.

On disk an artifact is a directory::

    artifact.json   model spec (rebuildable), compression state, metrics, history, file names
    weights.pt      {"state_dict": ..., "masks": ...}: tensors only, loaded with weights_only=True
    <files>         anything the stage produced (model.onnx, latency.json, ...)
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimline.inputs import InputSpec
from slimline.io import atomic_path, read_json, write_json
from slimline.registry import import_object
from slimline.structure import apply_structure, structure_diff

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the architecture."""


@dataclass
class Artifact:
    """A model plus everything known about it.

    ``model_id`` names the stage output whose weights this model has (stages that only measure,
    like eval or export, pass it through); ``parent_model_id`` is the model it was derived from,
    which is what ``eval`` compares against for output fidelity.
    """

    model: nn.Module
    model_spec: dict[str, Any]
    input_shape: tuple[int, ...]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    model_id: str = "source"
    parent_model_id: str | None = None
    input_spec: InputSpec | None = None  # default: float inputs of input_shape

    @property
    def inputs(self) -> InputSpec:
        """What one input sample is (token ids or float features)."""
        return self.input_spec if self.input_spec is not None else InputSpec(self.input_shape)

    def derive(self, *, copy_model: bool = False) -> Artifact:
        """A new artifact with this one's model and state, fresh metrics and no files.

        ``copy_model=True`` for stages that change weights, so the upstream artifact (which may
        still be used by another branch of the DAG) stays intact.
        """
        return Artifact(
            model=copy.deepcopy(self.model) if copy_model else self.model,
            model_spec=copy.deepcopy(self.model_spec),
            input_shape=tuple(self.input_shape),
            masks={name: mask.clone() for name, mask in self.masks.items()},
            state=copy.deepcopy(self.state),
            history=copy.deepcopy(self.history),
            model_id=self.model_id,
            parent_model_id=self.parent_model_id,
            input_spec=self.input_spec,
        )

    def example_input(self, batch_size: int = 1, *, seed: int = 0) -> torch.Tensor:
        """A synthetic batch of the model's input: N(0, 1) features or valid token ids."""
        return self.inputs.random(batch_size, seed=seed)

    # ---- storage ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model_spec = record_structure(self.model_spec, self.model)
        state_dict = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        with atomic_path(directory / "weights.pt") as tmp:
            torch.save({"state_dict": state_dict, "masks": self.masks}, tmp)
        files = {}
        for name, path in self.files.items():
            path = Path(path)
            if path.parent.resolve() != directory.resolve():
                raise ValueError(f"artifact file {name!r} ({path}) must live in {directory}")
            files[name] = path.name
        write_json(directory / "artifact.json", {
            "format_version": FORMAT_VERSION,
            "model_spec": self.model_spec,
            "input_shape": list(self.input_shape),
            "input_spec": self.input_spec.to_dict() if self.input_spec is not None else None,
            "state": self.state,
            "metrics": self.metrics,
            "history": self.history,
            "files": files,
            "model_id": self.model_id,
            "parent_model_id": self.parent_model_id,
        })

    @classmethod
    def load(cls, directory: str | Path) -> Artifact:
        directory = Path(directory)
        meta = read_json(directory / "artifact.json")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{directory}: artifact format {meta.get('format_version')} is "
                                  f"not {FORMAT_VERSION}; re-run the stage with --force")
        payload = load_tensor_file(directory / "weights.pt")
        model = build_model_from_spec(meta["model_spec"])
        load_weights(model, payload["state_dict"], source=str(directory / "weights.pt"))
        if "quantization" in meta["state"]:  # fake-quant hooks are code, not saved: re-install
            from slimline.compress.quant import attach_quantization

            attach_quantization(model, meta["state"]["quantization"])
        return cls(
            model=model,
            model_spec=meta["model_spec"],
            input_shape=tuple(meta["input_shape"]),
            masks=dict(payload.get("masks", {})),
            state=meta["state"],
            metrics=meta["metrics"],
            history=meta["history"],
            files={name: directory / fname for name, fname in meta["files"].items()},
            model_id=meta["model_id"],
            parent_model_id=meta["parent_model_id"],
            input_spec=InputSpec.from_dict(meta["input_spec"]) if meta.get("input_spec") else None,
        )


def build_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an architecture from ``{"name": zoo name | "factory": "pkg.mod:fn", "with": {}}``
    plus any recorded structural changes (``"structure"``, see :mod:`slimline.structure`)."""
    model = _build_base(spec)
    if spec.get("structure"):
        apply_structure(model, spec["structure"])
    return model


def record_structure(spec: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``spec`` with ``"structure"`` set to how ``model`` differs from a fresh build."""
    diff = structure_diff(_build_base(spec), model)
    updated = {k: v for k, v in spec.items() if k != "structure"}
    if diff:
        updated["structure"] = diff
    return updated


def _build_base(spec: dict[str, Any]) -> nn.Module:
    if "hf" in spec or "hf_config" in spec:
        from slimline.models.hf import build_hf_model

        return build_hf_model(spec)
    kwargs = dict(spec.get("with") or {})
    if "factory" in spec:
        builder = import_object(spec["factory"])
        if not callable(builder):
            raise ValueError(f"model factory {spec['factory']!r} is not callable")
        model = builder(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model factory {spec['factory']!r} returned "
                             f"{type(model).__name__}, not a torch.nn.Module")
        return model
    from slimline.models import build_model

    return build_model(spec["name"], **kwargs)


def load_tensor_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with a clear message for anything that is not tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load — it contains Python objects other than tensors "
            f"({str(exc).splitlines()[0][:200]}). slimline loads only state_dicts saved with "
            "torch.save(model.state_dict(), path); a pickled nn.Module could run arbitrary code."
        ) from None
    except Exception as exc:  # zip/format errors come in several exception types
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None


def state_dict_from_checkpoint(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict or the usual wrappers ({"state_dict": ...}, {"model": ...})."""
    if isinstance(payload, dict):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(payload.get(wrapper), dict):
                payload = payload[wrapper]
                break
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return payload
    raise CheckpointError(f"{source}: expected a state_dict (a mapping of names to tensors)")


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """Strict load that lists what does not match instead of torch's wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model "
                  f"{tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("shape mismatch", mismatched), ("missing", missing),
                             ("unexpected", unexpected)):
            if items:
                shown = "; ".join(items[:5]) + (f"; ... ({len(items)} in all)"
                                                if len(items) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not match the architecture "
                              f"{type(model).__name__} — " + " | ".join(parts))
    model.load_state_dict(state_dict)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total parameters, non-zero parameters)."""
    total = nonzero = 0
    for tensor in model.parameters():
        total += tensor.numel()
        nonzero += int(torch.count_nonzero(tensor.detach()))
    return total, nonzero
