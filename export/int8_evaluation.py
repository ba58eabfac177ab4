"""An int8 ONNX file against its fp32 original, both run by onnxruntime (torch-free): top-1
agreement, logit errors, accuracy, and the file facts the ``export.ort_quantize`` stage reports."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .feeds import pad_id_of, sample_feeds
from .graph import OnnxFileError, graph_summary
from .ort_contrib import session_source
from .ort_quant import OrtQuantizeConfig, first_error_line

__all__ = ["QuantEvaluation", "compare_onnx_models", "quantization_report", "row_cosines"]


@dataclass(frozen=True)
class QuantEvaluation:
    """An int8 ONNX model against its fp32 original on the same inputs (both run by ORT).

    ``max_abs_error`` is the largest |int8 logit - fp32 logit| (``mean_abs_error`` its mean);
    ``max_rel_error`` divides it by the largest |fp32 logit|. ``accuracy``/``fp32_accuracy``
    are ``None`` without labels.
    """

    samples: int
    top1_agreement: float
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    accuracy: float | None = None
    fp32_accuracy: float | None = None
    cosine_mean: float = 1.0  # per-sample cosine of int8 vs fp32 outputs (embedding models)
    cosine_min: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_onnx_models(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    int8_reference: bool = False,
) -> QuantEvaluation:
    """Run both models (single-input, or token models fed ids) on ``inputs`` with onnxruntime
    and compare their outputs.

    Sessions use one thread: the numbers must not depend on the machine's load.
    ``int8_reference`` runs the int8 file without graph optimizations (its QDQ semantics, not
    this CPU's fused integer kernels): for a file made for another CPU than this one.
    """
    if len(inputs) == 0:
        raise ValueError("compare_onnx_models needs at least one input sample")
    reference = _predict(Path(fp32_path), inputs, batch_size)
    candidate = _predict(Path(int8_path), inputs, batch_size, optimize=not int8_reference)
    if reference.shape != candidate.shape:
        raise ValueError(
            f"{int8_path} outputs shape {candidate.shape}, {fp32_path} outputs {reference.shape}"
        )
    error = np.abs(candidate.astype(np.float64) - reference)
    scale = float(np.abs(reference).max()) or 1.0
    accuracy = fp32_accuracy = None
    if labels is not None:
        labels = np.asarray(labels)
        accuracy = float((candidate.argmax(-1) == labels).mean())
        fp32_accuracy = float((reference.argmax(-1) == labels).mean())
    cosine = row_cosines(candidate.reshape(len(inputs), -1), reference.reshape(len(inputs), -1))
    return QuantEvaluation(
        samples=len(inputs),
        top1_agreement=float((candidate.argmax(-1) == reference.argmax(-1)).mean()),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        max_abs_error=float(error.max()),
        mean_abs_error=float(error.mean()),
        max_rel_error=float(error.max()) / scale,
        accuracy=accuracy,
        fp32_accuracy=fp32_accuracy,
    )


def quantization_report(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None,
    config: OrtQuantizeConfig,
    *,
    reduce_range: bool,
    calibration_samples: int,
) -> dict[str, Any]:
    """Score the int8 file against its fp32 source on ``inputs`` (with this CPU's fused
    kernels when they compute it exactly, else on onnxruntime's unfused reference path) and
    describe both files: the ``export.ort_quantize`` stage's metrics."""
    from .int8numerics import exact_on

    exact_here = exact_on(int8_path)
    scores = compare_onnx_models(fp32_path, int8_path, inputs, labels,
                                 batch_size=config.batch_size, int8_reference=not exact_here)
    summary, fp32_summary = graph_summary(int8_path), graph_summary(fp32_path)
    labelled = scores.accuracy is not None and scores.fp32_accuracy is not None
    return {
        "split": config.split,
        "samples": scores.samples,
        **({"accuracy": scores.accuracy,  # of the int8 file, run by onnxruntime
            "fp32_accuracy": scores.fp32_accuracy,
            "int8_accuracy_change": scores.accuracy - scores.fp32_accuracy} if labelled else {}),
        "cosine_mean": scores.cosine_mean,  # int8 vs fp32 outputs, per sample
        "cosine_min": scores.cosine_min,
        "top1_agreement": scores.top1_agreement,
        "agreement": scores.top1_agreement,  # the report's agreement column
        "max_abs_logit_error": scores.max_abs_error,
        "mean_abs_logit_error": scores.mean_abs_error,
        "max_rel_logit_error": scores.max_rel_error,
        "onnx_bytes": summary.file_bytes,
        "fp32_onnx_bytes": fp32_summary.file_bytes,
        "size_ratio": summary.file_bytes / fp32_summary.file_bytes,
        "op_counts": summary.op_counts,
        "quant_format": summary.quant_format,
        "quantize_nodes": summary.quantize_nodes,
        "dequantize_nodes": summary.dequantize_nodes,
        "int8_initializers": summary.int8_initializers,
        "int8_bytes": summary.int8_bytes,
        "initializer_bytes_by_dtype": summary.initializer_bytes_by_dtype,
        "onnx_sparsity": summary.sparsity,
        "mode": config.mode,
        "per_channel": config.per_channel,
        "activation_type": config.activation_type if config.mode == "static" else "dynamic",
        "weight_type": config.weight_type,
        "calibration_samples": calibration_samples,
        "reduce_range": reduce_range,
        "scored_with": "onnxruntime" if exact_here else "onnxruntime reference (unfused QDQ)",
        "exact_here": exact_here,
    }


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (2-D arrays)."""
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-30)


def _predict(path: Path, inputs: np.ndarray, batch_size: int, optimize: bool = True
             ) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    summary = graph_summary(path)  # OnnxFileError with a clear message for a non-ONNX file
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            session_source(path, optimize=optimize), sess_options=options,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:
        raise OnnxFileError(f"{path}: onnxruntime cannot load this model: {first_error_line(exc)}") from exc
    pad_id = pad_id_of(summary.metadata)
    data = np.asarray(inputs)
    outputs = [
        session.run(None, sample_feeds(summary.inputs, data[start : start + batch_size],
                                       pad_id))[0]
        for start in range(0, len(data), batch_size)
    ]
    return np.concatenate(outputs).astype(np.float64)
