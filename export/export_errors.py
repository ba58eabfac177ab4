"""Why an ONNX export failed, in terms the model's author can act on.

Both exporters bury the cause under pages of traceback, spell an unsupported operator in their
own ways and never say where in the model it is called; this module turns those failures into one
:class:`ExportError` naming the operator and the submodule. It is kept apart from the exporting
in :mod:`slimline.export.onnx_export` because the diagnosis (message patterns, a recorded eager
forward) changes with each torch release for reasons of its own; :func:`eval_mode`, which that
recorded forward shares with the exporter and the parity check, lives here as the lowest of them.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ExportError", "eval_mode", "export_error", "reason"]

log = logging.getLogger(__name__)

# How each exporter spells "this op has no ONNX translation" (checked against torch 2.13):
#   legacy:  "Exporting the operator 'aten::linalg_inv' to ONNX opset version 18 is not supported"
#   dynamo:  "No ONNX function found for <OpOverload(op='aten.linalg_inv_ex', overload='default')>"
#   dynamo:  "Error when translating node %x : ... call_function[target=torch.ops.aten.histc.default]"
_OP_PATTERNS = (
    re.compile(r"Exporting the operator '([^']+)'"),
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+)"),
)
# torch.export's fake-tensor tracing raises these with the bare op name as the message.
_FAKE_TENSOR_OP_ERRORS = frozenset(
    {"DynamicOutputShapeException", "DataDependentOutputException", "UnsupportedOperatorException"}
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(RuntimeError):
    """Both exporters failed. ``op`` is the unsupported operator when one could be identified."""

    def __init__(
        self,
        message: str,
        *,
        model_class: str,
        op: str | None = None,
        module_path: str | None = None,
        details: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.model_class = model_class
        self.op = op
        self.module_path = module_path
        # One line per exporter with its own (ANSI-stripped) reason, for bug reports.
        self.details = details or {}


def export_error(
    model: nn.Module, example: tuple[torch.Tensor, ...], opset: int,
    failures: dict[str, BaseException]
) -> ExportError:
    """The error for ``failures`` (exporter name -> what it raised), naming the unsupported
    operator and the submodule calling it when they can be found."""
    model_class = type(model).__name__
    ops = {name: op for name, exc in failures.items() if (op := _failing_op(exc))}
    details = {name: reason(exc) for name, exc in failures.items()}
    if not ops:
        reasons = "; ".join(f"{name} exporter: {why}" for name, why in details.items())
        return ExportError(
            f"cannot export {model_class} to ONNX (opset {opset}). {reasons}. Hint: check that "
            f"the model runs on inputs of shape {[tuple(t.shape) for t in example]} and that "
            "forward() "
            "has no data-dependent Python control flow or non-tensor outputs.",
            model_class=model_class,
            details=details,
        )
    # The legacy name is what the user wrote (aten::linalg_inv); dynamo reports the op after
    # decomposition (aten::linalg_inv_ex, prims::lgamma), shown second as a cross-reference.
    op = ops.get("torchscript") or ops["dynamo"]
    other = ops.get("dynamo")
    also = f" (dynamo exporter: {other})" if other and other != op else ""
    module_path = _locate_op(model, example, set(ops.values()))
    where = ""
    if module_path:
        owner = type(model.get_submodule(module_path)).__name__
        where = f", called in submodule '{module_path}' ({owner}),"
    elif module_path == "":
        where = f", called in {model_class}.forward(),"
    return ExportError(
        f"cannot export {model_class} to ONNX (opset {opset}): operator {op}{also}{where} "
        "has no ONNX conversion. Hint: rewrite that computation "
        "with supported ops or move it out of forward() (pre/post-processing), or pass a custom "
        "translation to torch.onnx.export(custom_translation_table=...).",
        model_class=model_class,
        op=op,
        module_path=module_path,
        details=details,
    )


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _failing_op(exc: BaseException) -> str | None:
    for err in _exception_chain(exc):
        text = str(err)
        if type(err).__name__ in _FAKE_TENSOR_OP_ERRORS and re.fullmatch(r"[\w.:]+", text):
            return _normalise_op(text)
        for pattern in _OP_PATTERNS:
            if match := pattern.search(text):
                return _normalise_op(match.group(1))
    return None


def _normalise_op(name: str) -> str:
    """``aten.linalg_inv_ex.default`` / ``aten.linalg_inv_ex`` -> ``aten::linalg_inv_ex``."""
    if "::" in name:
        return name
    namespace, _, rest = name.partition(".")
    op, _, _overload = rest.partition(".")
    return f"{namespace}::{op}" if op else name


def reason(exc: BaseException) -> str:
    """First line of the innermost exception: the root cause, without exporter boilerplate."""
    *_, root = _exception_chain(exc)
    lines = [ln.strip() for ln in _ANSI.sub("", str(root)).splitlines() if ln.strip()]
    lines = lines or [type(root).__name__]
    # "The following inconsistencies were found:" says nothing without the line after it.
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _locate_op(model: nn.Module, example: tuple[torch.Tensor, ...], ops: set[str]) -> str | None:
    """Dotted path of the innermost submodule that calls one of ``ops`` ("" for the root).

    Runs one eager forward under a dispatch-level recorder. Exporters and the dispatcher name
    ops differently (``prims::lgamma`` vs ``aten::lgamma``), so the namespace is ignored.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    wanted = {op.split("::")[-1] for op in ops}
    stack: list[str] = [""]
    found: list[str] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and _normalise_op(str(func)).split("::")[-1] in wanted:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def push(name: str):
        return lambda module, args: stack.append(name)

    def pop(module, args, output):
        if len(stack) > 1:
            stack.pop()

    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(push(name)))
                handles.append(module.register_forward_hook(pop))
        with eval_mode(model), torch.no_grad(), _Recorder():
            model(*example)
    except Exception:  # best effort: the error message is still useful without a location
        log.debug("could not locate the failing op", exc_info=True)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the ``with`` block, each submodule's own mode restored after."""
    # Restore per submodule: model.train(previous) would also flip deliberately frozen
    # (eval-mode) submodules such as frozen BatchNorm layers.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
