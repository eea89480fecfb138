"""Shared fixtures: small models, the MRI images (shared data set if present, else the bundled sample)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import hsc_plugin.strategy

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread: the suite is many tiny ops, and on a shared 2-core machine two threads per
# process oversubscribe the cores (LAPACK calls were seen 10x slower). Latency lives in benchmarks/.
torch.set_num_threads(1)
SHARED_MRI = REPO.parent / "shared" / "data" / "brain-mri-128"


def mri_root() -> Path:
    """Real brain-MRI images: ../shared when present (development, CI), else the bundled sample."""
    if SHARED_MRI.is_dir():
        return SHARED_MRI
    from hsc_plugin.mri.data import bundled_sample_path

    return bundled_sample_path()


class SmallCNN(nn.Module):
    """A custom CNN (not from timm) with every kind of layer the compressors meet."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 16, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


TEST_MIN_REGION = 4
"""The suite's nets are tiny (maps of 4–32 pixels), where the library's default smallest region
(``hsc_plugin.strategy.MIN_REGION``, 16 pixels a side) would leave almost no layer with regions and
the region code untested. So the whole session runs with 4-pixel regions (set before any fixture,
module-scoped ones included) unless a test passes ``min_region``; test_min_region.py sets the
library's default back to test it. Tests that compress in another process pass ``min_region``."""

LIBRARY_MIN_REGION = hsc_plugin.strategy.MIN_REGION


@pytest.fixture(scope="session", autouse=True)
def _small_regions() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hsc_plugin.strategy, "MIN_REGION", TEST_MIN_REGION)
        yield


@pytest.fixture
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """Parameters, buffers and structure, to prove a model was not touched."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model)


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], str]) -> None:
    state, structure = snap
    assert repr(model) == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():  # NaN equals NaN: some cases put NaN in the model on purpose
        torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
