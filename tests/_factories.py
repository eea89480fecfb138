"""Model factories for ``hsc compress package.module:factory`` in the CLI tests.

With ``tests/`` on ``sys.path`` (pytest puts it there; the CLI tests add it for subprocesses),
``_factories:tiny_cnn`` names :func:`tiny_cnn`.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """A small 3-channel CNN (seeded, so every call gives the same weights)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
