"""GRU sequence classifier for channels-first input of shape (N, C, L)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from slimline.models import register_model


class GRUClassifier(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, hidden_size: int, num_layers: int):
        super().__init__()
        # nn.GRU exports through the dynamo ONNX exporter as a single native ONNX GRU op.
        self.gru = nn.GRU(in_channels, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-first keeps the data layout shared with cnn1d; the GRU wants (N, L, C).
        _, h_n = self.gru(x.transpose(1, 2))
        return self.head(h_n[-1])


@register_model("gru")
def gru(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: Sequence[int] = (40,),
    hidden_size: int = 64,
    num_layers: int = 1,
) -> nn.Module:
    """GRU classifier: reads (N, C, L) sequences, classifies from the last hidden state."""
    size = tuple(int(s) for s in input_size)
    if len(size) != 1:
        raise ValueError(f"gru expects input_size=(L,), got {input_size!r}")
    if hidden_size < 1 or num_layers < 1:
        raise ValueError(
            f"gru needs hidden_size >= 1 and num_layers >= 1, got {hidden_size}, {num_layers}"
        )
    return GRUClassifier(num_classes, in_channels, hidden_size, num_layers)
