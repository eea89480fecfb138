"""The default smallest region side (``hsc_plugin.strategy.MIN_REGION``): what it is, that HSC and
the built-in partitioners take it when ``min_region`` is not given, and bad values.

conftest.py runs the rest of the suite with 4-pixel regions (its nets are tiny); these tests set
the library's own default back first.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hsc_plugin.strategy
from hsc_plugin import compress
from hsc_plugin.compressors.hsc import HSC
from strategies.partition import GridPartitioner, QuadtreePartitioner


@pytest.fixture
def library_default(monkeypatch: pytest.MonkeyPatch) -> int:
    from conftest import LIBRARY_MIN_REGION

    monkeypatch.setattr(hsc_plugin.strategy, "MIN_REGION", LIBRARY_MIN_REGION)  # conftest's is 4
    return LIBRARY_MIN_REGION


def _cells(side: int, grid: int = 2) -> SimpleNamespace:
    return SimpleNamespace(grid=(grid, grid), out_hw=(side, side))


def test_the_default_is_sixteen_pixels_and_every_builtin_takes_it(library_default: int) -> None:
    assert library_default == 16
    assert HSC().min_region == 16
    assert HSC()._partitioner.min_region == 16  # handed on by HSC
    assert GridPartitioner().min_region == 16 and QuadtreePartitioner().min_region == 16
    assert HSC(min_region=4)._partitioner.min_region == 4


def test_grid_splits_a_map_only_into_regions_of_at_least_min_region_pixels(library_default: int) -> None:
    grid = GridPartitioner()
    assert grid.partition(_cells(31)).n_regions == 1  # two 15/16-pixel halves: too small
    assert grid.partition(_cells(32)).n_regions == 4
    assert grid.partition(_cells(127)).n_regions == 4
    assert GridPartitioner(min_region=4).partition(_cells(31)).n_regions == 4
    assert GridPartitioner(min_region=4).partition(_cells(7)).n_regions == 1


class _Net(nn.Module):
    """One 3×3 conv on a ``side``-pixel map, then a head: the only layer regions can apply to."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _regions(side: int, **options: object) -> int:
    torch.manual_seed(0)
    model = _Net().eval()
    calib = torch.randn(8, 8, side, side)
    res = compress(model, "hsc", calib=calib, rank="fixed", rank_ratio=0.5, alternatives=False,
                   progress=False, targets=["conv"], **options)
    return len(res.report.layers[0].details["tiling"]["regions"])


def test_hsc_without_min_region_keeps_small_maps_whole(library_default: int) -> None:
    assert _regions(24) == 1
    assert _regions(32) == 4
    assert _regions(24, min_region=4) == 4


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "many", [4]])
def test_bad_min_region_is_a_clear_error(bad: object) -> None:
    for make in (lambda: HSC(min_region=bad), lambda: GridPartitioner(min_region=bad),
                 lambda: QuadtreePartitioner(min_region=bad)):
        with pytest.raises(ValueError, match="min_region"):
            make()
