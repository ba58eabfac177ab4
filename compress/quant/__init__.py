"""Quantization: quantizers, data-free PTQ, UDFC and QAT (see the quantization issues)."""
