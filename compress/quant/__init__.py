"""Quantization: the shared quantization state, quantizers, and int8 QDQ export.

* :class:`QuantSpec` — one tensor's affine grid (bits, signed, axis, scale, zero point);
  :class:`QuantState` — a model's specs (weights by parameter name, activations by
  :class:`TensorPoint`), JSON-able, attached with :func:`attach_quantization`.
* :func:`quantize_rtn` — round-to-nearest weights + min/max activation calibration (baseline).
* :func:`fold_batchnorm` — conv+BN folding done before quantizing.
* :func:`choose_smoothing` / :func:`smoothquant_scales` — SmoothQuant divisors for Linear inputs
  with outlier channels (``quantize_rtn(..., smoothing="auto")``).
* :func:`export_qdq_onnx` — int8 QDQ ONNX with exactly the PyTorch scales.
"""

from slimline.compress.quant.fold import fold_batchnorm, fold_conv_bn_weights
from slimline.compress.quant.observers import MinMaxObserver
from slimline.compress.quant.placement import ActivationPlan, plan_activation_points
from slimline.compress.quant.qdq_export import QDQExportError, export_qdq_onnx
from slimline.compress.quant.rtn import RTNResult, quantize_rtn, weight_spec_rtn
from slimline.compress.quant.smoothing import choose_smoothing, smoothquant_scales
from slimline.compress.quant.spec import QuantSpec, affine_spec, symmetric_spec
from slimline.compress.quant.state import (
    QuantState,
    QuantStateError,
    TensorPoint,
    attach_quantization,
    detach_quantization,
    off_grid_parameters,
    quantization_of,
)

__all__ = [
    "ActivationPlan",
    "MinMaxObserver",
    "QDQExportError",
    "QuantSpec",
    "QuantState",
    "QuantStateError",
    "RTNResult",
    "TensorPoint",
    "affine_spec",
    "attach_quantization",
    "choose_smoothing",
    "detach_quantization",
    "export_qdq_onnx",
    "fold_batchnorm",
    "fold_conv_bn_weights",
    "off_grid_parameters",
    "plan_activation_points",
    "quantization_of",
    "quantize_rtn",
    "smoothquant_scales",
    "symmetric_spec",
    "weight_spec_rtn",
]
