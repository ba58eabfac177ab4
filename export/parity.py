"""Parity between an exported ONNX model (run by onnxruntime) and the PyTorch model."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .export_errors import eval_mode
from .onnx_export import onnx_feeds, onnx_inputs_of
from .ort_contrib import session_source


@dataclass(frozen=True)
class ParityResult:
    """ONNX Runtime vs torch on the same inputs.

    ``max_rel_diff`` is ``max_abs_diff`` divided by ``max |torch output|`` (a scale-free number
    that stays meaningful when single outputs are near zero). ``passed`` uses the same scale:
    ``max_abs_diff <= atol + rtol * max |torch output|``. ``top1_agreement`` is the fraction of
    rows (all axes but the last) whose argmax over the last axis agrees; ``cosine_min`` the
    smallest cosine similarity between a row of ONNX Runtime's output and torch's (what matters
    for embeddings, where an argmax means nothing).
    """

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    passed: bool
    atol: float
    rtol: float
    num_samples: int
    cosine_min: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: max |diff| {self.max_abs_diff:.3g}, max rel diff "
            f"{self.max_rel_diff:.3g} (atol {self.atol:g}, rtol {self.rtol:g}), top-1 agreement "
            f"{self.top1_agreement:.2%} over {self.num_samples} samples"
        )


class ParityError(RuntimeError):
    """The ONNX model's outputs differ from torch's beyond tolerance."""

    def __init__(self, message: str, result: ParityResult | None = None):
        super().__init__(message)
        self.result = result


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    optimize: bool = True,
) -> ParityResult:
    """Run ``inputs`` through ONNX Runtime (CPU) and through ``model`` (eval, no_grad); compare.

    Only the first output of each is compared. A shape mismatch raises :class:`ParityError`
    (there are no numbers to compare); NaNs in either output make ``passed`` False.
    ``optimize=False`` runs the file without graph optimizations: an int8 QDQ file then executes
    its QuantizeLinear/DequantizeLinear as written around float ops (its reference semantics)
    instead of this CPU's fused integer kernels (a file with onnxruntime's int8 contrib ops runs
    as its QDQ equivalent: :func:`~slimline.export.ort_contrib.session_source`).
    """
    import onnxruntime as ort  # deferred: importing onnxruntime costs ~0.3 s

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; ORT's warnings are not actionable here
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        session_source(onnx_path, optimize=optimize), sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    from .int8_evaluation import row_cosines

    tensors, _ = onnx_inputs_of(model, inputs)
    feed = onnx_feeds(model, inputs, [arg.name for arg in session.get_inputs()])
    got = np.asarray(session.run(None, feed)[0], dtype=np.float64)
    with eval_mode(model), torch.no_grad():
        expected = _first_tensor(model(*tensors)).detach().cpu().double().numpy()
    if got.shape != expected.shape:
        raise ParityError(
            f"ONNX output shape {got.shape} differs from torch output shape {expected.shape}"
        )

    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    max_abs = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    rows_got = got.reshape(-1, got.shape[-1] if got.ndim >= 2 else 1)
    rows_exp = expected.reshape(rows_got.shape)
    top1 = float(np.mean(rows_got.argmax(axis=-1) == rows_exp.argmax(axis=-1))) if got.size else 1.0
    cosine_min = float(row_cosines(rows_got, rows_exp).min()) if got.size else 1.0
    return ParityResult(
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale > 0 else max_abs,
        top1_agreement=top1,
        # Written so that NaN fails: every comparison with NaN is False.
        passed=bool(max_abs <= atol + rtol * scale),
        atol=atol,
        rtol=rtol,
        num_samples=int(inputs.shape[0]) if inputs.ndim else 1,
        cosine_min=cosine_min,
    )


def assert_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    optimize: bool = True,
) -> ParityResult:
    """:func:`check_parity`, raising :class:`ParityError` (with the numbers) when it fails."""
    result = check_parity(model, onnx_path, inputs, atol=atol, rtol=rtol, optimize=optimize)
    if not result.passed:
        raise ParityError(f"{onnx_path}: ONNX output differs from torch: {result}", result)
    return result


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if isinstance(output, dict) and output:
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"model output has no tensor to compare: {type(output).__name__}")

