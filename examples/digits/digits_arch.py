"""The architecture of the example digits teacher, for loading ``teacher.safetensors``.

    calibrate-teacher evaluate examples/digits/teacher.safetensors \\
        --arch examples/digits/digits_arch.py:digits_cnn --data examples/digits/val
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two conv blocks and a linear head for 1 x 16 x 16 digit images."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            # The identity at 16 x 16; lets the model run on other sizes (as torchvision's VGG
            # does), which is how tools probe a TorchScript file that records no input shape.
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def digits_cnn(num_classes: int = 10, width: int = 16) -> DigitsCNN:
    """Build the (untrained) digits CNN."""
    return DigitsCNN(num_classes=num_classes, width=width)
