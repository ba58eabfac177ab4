"""Export a PyTorch model to a single self-contained ONNX file and check it against torch.

The torch.export-based ("dynamo") exporter is tried first; if it fails, the legacy TorchScript
exporter gets a second chance. Only when both fail is an
:class:`~slimline.export.export_errors.ExportError` raised, and its message names the operator
(and, where it can be found, the submodule) that blocked the export instead of surfacing a deep
exporter traceback (the diagnosis is :mod:`slimline.export.export_errors`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from .export_errors import eval_mode, export_error, reason
from .feeds import PAD_ID_KEY
from .graph import atomic_write_bytes
from .graph_rewrites import fold_scale_into_layernorm, fusable_gelu

__all__ = ["MIN_OPSET", "export_onnx", "onnx_feeds", "onnx_inputs_of"]

MIN_OPSET = 17
log = logging.getLogger(__name__)

# Loggers that print progress, "torchvision is not installed" and symbolic-shape chatter during
# export. Raised to CRITICAL only while exporting: a failure surfaces as our own ExportError.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx")
_NOISY_LOGGERS += ("onnxscript", "onnx_ir")


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "logits",
    input_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` to one self-contained ONNX file at ``path`` and return the path.

    The model runs in eval mode during export; each submodule's previous train/eval mode is
    restored afterwards. With ``dynamic_batch`` dimension 0 of input and output is named
    ``"batch"`` and may differ from ``example_input``'s; integer 2-D inputs (token ids, attention
    masks) also get a dynamic dimension 1, ``"seq"``. Several inputs are given as a tuple with
    ``input_names`` (e.g. ``("input_ids", "attention_mask")``). The file is checked with
    ``onnx.checker`` and written atomically, so a failed export never leaves a file behind.
    Weights are embedded (no external-data file), which limits models to protobuf's 2 GiB.

    Raises:
        ValueError: ``opset`` is below :data:`MIN_OPSET` or newer than the installed onnx knows.
        ExportError: neither the dynamo nor the legacy exporter could convert the model.
    """
    examples = example_input if isinstance(example_input, tuple) else (example_input,)
    if not examples or not all(isinstance(t, torch.Tensor) for t in examples):
        raise TypeError("example_input must be a torch.Tensor or a tuple of tensors, got "
                        f"{type(example_input).__name__}")
    names = tuple(input_names) if input_names is not None else (
        (input_name,) if len(examples) == 1 else tuple(f"{input_name}_{i}"
                                                       for i in range(len(examples))))
    if len(names) != len(examples):
        raise ValueError(f"{len(examples)} example inputs but {len(names)} input_names")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} and {newest} (got {opset})")

    if dynamic_batch:
        # torch.export specialises dimensions of size 1 to constants (and so would a traced
        # size check, e.g. in nn.TransformerEncoder's fast path): export with a batch of 2.
        examples = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t
                         for t in examples)
    spec = _ExportSpec(opset, dynamic_batch, names, output_name,
                       tuple(_dynamic_dims(t, dynamic_batch) for t in examples))
    example_input = examples  # the exporters take the tuple of positional inputs
    model_class = type(model).__name__
    failures: dict[str, BaseException] = {}
    proto: onnx.ModelProto | None = None
    used = ""
    with eval_mode(model), _quiet_exporter():
        for exporter, attempt in (("dynamo", _export_dynamo), ("torchscript", _export_legacy)):
            try:
                proto = attempt(model, example_input, spec)
            except Exception as exc:  # any exporter failure means "try the next one"
                failures[exporter] = exc
                continue
            used = exporter
            break
    if proto is None:
        raise export_error(model, example_input, opset, failures) from failures["torchscript"]
    if failures:
        # The legacy exporter traces, so data-dependent control flow is frozen to the example's
        # branch: worth telling the user even though the export succeeded.
        log.warning(
            "dynamo ONNX export of %s failed (%s); used the legacy TorchScript exporter",
            model_class,
            reason(failures["dynamo"]),
        )

    onnx.helper.set_model_props(
        proto,
        {p.key: p.value for p in proto.metadata_props}
        | {
            "slimline.exporter": used,
            "slimline.model_class": model_class,
            "slimline.torch_version": torch.__version__,
        }
        # token models: the id the attention mask is derived from (export/feeds.py)
        | ({PAD_ID_KEY: str(pad)} if isinstance(pad := getattr(model, "pad_token_id", None), int)
           else {}),
    )
    fusable_gelu(proto)  # onnxruntime then runs each GELU (and the bias before it) as one op
    fold_scale_into_layernorm(proto)  # a SmoothQuant divisor on a LayerNorm: one pass fewer
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


def onnx_inputs_of(
    model: nn.Module, x: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], list[str] | None]:
    """The ONNX inputs of a model called as ``model(x)``: models with named inputs (e.g. the
    Hugging Face wrapper: ``input_ids`` and the ``attention_mask`` it derives) say so with an
    ``onnx_inputs(x) -> (tensors, names)`` method; others take ``x`` alone."""
    method = getattr(model, "onnx_inputs", None)
    if callable(method):
        tensors, names = method(x)
        return tuple(tensors), list(names)
    return (x,), None


def onnx_feeds(model: nn.Module, x: torch.Tensor,
               declared: Sequence[str]) -> dict[str, Any]:
    """Numpy feeds for the ONNX inputs ``declared`` (the file's input names) of ``model(x)``.
    The legacy exporter drops inputs the graph does not use, so only declared names are fed."""
    tensors, names = onnx_inputs_of(model, x)
    return {name: t.detach().cpu().numpy() for name, t in zip(names or declared, tensors)
            if name in declared}


# --- exporters -------------------------------------------------------------------------------


def _dynamic_dims(tensor: torch.Tensor, dynamic_batch: bool) -> dict[int, str]:
    """Which dimensions of an input vary: the batch, and the length of token-id inputs."""
    dims = {0: "batch"} if dynamic_batch else {}
    if not tensor.is_floating_point() and tensor.dim() == 2:
        dims[1] = "seq"
    return dims


@dataclass(frozen=True)
class _ExportSpec:
    opset: int
    dynamic_batch: bool
    input_names: tuple[str, ...]
    output_name: str
    dynamic: tuple[dict[int, str], ...]

    def common_kwargs(self) -> dict[str, Any]:
        return {
            "opset_version": self.opset,
            "input_names": list(self.input_names),
            "output_names": [self.output_name],
        }

    def dynamo_shapes(self) -> tuple[dict[int, Any], ...] | None:
        if not any(self.dynamic):
            return None
        dims = {"batch": torch.export.Dim("batch"), "seq": torch.export.Dim.AUTO}
        return tuple({axis: dims[name] for axis, name in d.items()} for d in self.dynamic)

    def legacy_axes(self, output_rank: int) -> dict[str, dict[int, str]] | None:
        if not any(self.dynamic):
            return None
        axes = {name: dict(d) for name, d in zip(self.input_names, self.dynamic) if d}
        out = {0: "batch"} if self.dynamic_batch else {}
        if output_rank >= 3 and any(1 in d for d in self.dynamic):
            out[1] = "seq"  # per-token outputs (e.g. language-model logits)
        if out:
            axes[self.output_name] = out
        return axes


def _export_dynamo(model: nn.Module, example: tuple[torch.Tensor, ...],
                   spec: _ExportSpec) -> onnx.ModelProto:
    dynamic_shapes = spec.dynamo_shapes()
    program = torch.onnx.export(
        model,
        example,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        verbose=False,
        **spec.common_kwargs(),
    )
    proto = program.model_proto
    _name_dynamic_dims(proto, spec)
    if _default_opset(proto) != spec.opset:
        # Below opset 18 torch converts down and silently keeps 18 when that fails (e.g. a
        # ReduceMean in torch 2.13). Converting again yields a graph the checker rejects, which
        # sends us to the legacy exporter: it emits old opsets natively.
        proto = onnx.version_converter.convert_version(proto, spec.opset)
    onnx.checker.check_model(proto)
    return proto


def _name_dynamic_dims(proto: onnx.ModelProto, spec: _ExportSpec) -> None:
    """torch.export names automatic dimensions ``s53``; call them what they are (``seq``)."""
    rename: dict[str, str] = {}
    for value, dims in zip(proto.graph.input, spec.dynamic):
        shape = value.type.tensor_type.shape.dim
        for axis, name in dims.items():
            if axis < len(shape) and shape[axis].dim_param and shape[axis].dim_param != name:
                rename[shape[axis].dim_param] = name
    if not rename:
        return
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _export_legacy(model: nn.Module, example: tuple[torch.Tensor, ...],
                   spec: _ExportSpec) -> onnx.ModelProto:
    with torch.no_grad():
        output = model(*example)
    rank = output.dim() if isinstance(output, torch.Tensor) else 2
    dynamic_axes = spec.legacy_axes(rank)
    buffer = io.BytesIO()
    # On failure the TorchScript exporter prints its whole IR graph to stdout from C++, which
    # Python-level redirection cannot catch; and torch <= 2.13 leaves that logging switched on.
    with _std_fds_silenced(), _onnx_log_restored():
        torch.onnx.export(
            model,
            example,
            buffer,
            dynamo=False,
            dynamic_axes=dynamic_axes,
            **spec.common_kwargs(),
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return proto


def _default_opset(model: onnx.ModelProto) -> int:
    return next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)


# --- keeping the exporters quiet -------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    # torch.export print()s partial FX graphs to sys.stderr when it fails.
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")  # FutureWarning/DeprecationWarning/TracerWarning noise
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


@contextlib.contextmanager
def _std_fds_silenced() -> Iterator[None]:
    # The file descriptors themselves, not sys.stdout/sys.stderr: C++ writes to them directly
    # even when Python's streams have been swapped (pytest, notebooks).
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()  # Python-buffered text belongs outside the silenced window
    with contextlib.ExitStack() as stack:
        for fd in (1, 2):
            try:
                saved = os.dup(fd)
            except OSError:  # that descriptor is closed: nothing to silence
                continue
            sink = stack.enter_context(tempfile.TemporaryFile())
            stack.callback(os.close, saved)
            stack.callback(os.dup2, saved, fd)
            os.dup2(sink.fileno(), fd)
        yield


@contextlib.contextmanager
def _onnx_log_restored() -> Iterator[None]:
    # Private torch API, hence the getattr guards: skip quietly where it no longer exists.
    getter = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    setter = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    was_on = bool(getter()) if callable(getter) else None
    try:
        yield
    finally:
        if was_on is not None and callable(setter):
            setter(was_on)
