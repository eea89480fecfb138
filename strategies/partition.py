"""Built-in spatial partitioners: ``none``, ``grid`` and ``quadtree``.

They read per-cell output second moments (:class:`~hsc_plugin.compressors.hsc.CellStats`) and
return a :class:`~hsc_plugin.tiling.Tiling` of cell-aligned rectangles.
"""

from __future__ import annotations

from typing import Any

import torch

from hsc_plugin.decomposition import sym_eig_desc
from hsc_plugin.registry import hookimpl
from hsc_plugin.tiling import Tiling, edge
from hsc_plugin import strategy as _strategy
from hsc_plugin.strategy import SpatialPartitioner

__all__ = ["NoPartition", "GridPartitioner", "QuadtreePartitioner"]


def _max_splits(cells: int, pixels: int, min_region: int) -> int:
    return max(1, min(cells, pixels // max(1, min_region)))


class NoPartition(SpatialPartitioner):
    """One region: the whole map (fastest; HSC then differs from SVD only by its clusters)."""

    name = "none"
    uses_moments = False

    def partition(self, cell_stats: Any) -> Tiling:
        return Tiling.full(cell_stats.grid)

    def statistics_grid(self, fine: tuple[int, int]) -> tuple[int, int]:
        return (1, 1)


class GridPartitioner(SpatialPartitioner):
    """A fixed ``g_h × g_w`` grid, reduced where the map is too small for regions of at least
    ``min_region`` pixels a side (small regions cost time and their factors see few positions:
    :data:`~hsc_plugin.strategy.MIN_REGION`)."""

    name = "grid"
    uses_moments = False

    def __init__(self, grid: tuple[int, int] | int = (2, 2), min_region: int | None = None) -> None:
        g = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if len(g) != 2 or min(g) < 1:
            raise ValueError(f"grid must be (rows, cols) with positive entries, got {grid!r}")
        self.grid = (int(g[0]), int(g[1]))
        self.min_region = _strategy.min_region(min_region)

    def statistics_grid(self, fine: tuple[int, int]) -> tuple[int, int]:
        return self.grid

    def partition(self, cell_stats: Any) -> Tiling:
        gh, gw = cell_stats.grid
        h, w = cell_stats.out_hw
        rows = min(self.grid[0], _max_splits(gh, h, self.min_region))
        cols = min(self.grid[1], _max_splits(gw, w, self.min_region))
        return Tiling.uniform((gh, gw), rows, cols)


def _tail(S: torch.Tensor, k: int) -> float:
    ev = sym_eig_desc(S)[0]
    return float(ev[k:].sum())


class QuadtreePartitioner(SpatialPartitioner):
    """Adaptive: split a region into four while the split lowers the error enough.

    At equal rank per region the MACs of a split are unchanged (pixels add up), so the question is
    whether the children's spectra differ enough to pay for the extra parameters and kernel
    launches: split when the children's discarded energy at rank ``ceil(rank_fraction·C)`` is at
    least ``min_gain`` (relative) below the parent's, up to ``max_depth`` levels.
    """

    name = "quadtree"

    def __init__(self, max_depth: int = 2, min_gain: float = 0.1, rank_fraction: float = 0.25,
                 min_region: int | None = None) -> None:
        self.max_depth = int(max_depth)
        self.min_gain = float(min_gain)
        self.rank_fraction = float(rank_fraction)
        self.min_region = _strategy.min_region(min_region)

    def statistics_grid(self, fine: tuple[int, int]) -> tuple[int, int]:
        """Halving ``max_depth`` times reaches no finer than 2**max_depth cells a side: more cells
        would only cost memory (4×4 instead of 8×8 at the default depth: 4× fewer statistics)."""
        n = 2 ** max(0, self.max_depth)
        return (min(fine[0], n), min(fine[1], n))

    def partition(self, cell_stats: Any) -> Tiling:
        gh, gw = cell_stats.grid
        h, w = cell_stats.out_hw
        C = cell_stats.S.shape[-1]
        k = max(1, int(self.rank_fraction * C + 0.999))
        regions: list[tuple[int, int, int, int]] = []

        def walk(r0: int, r1: int, c0: int, c1: int, depth: int) -> Any:
            can = (depth < self.max_depth and r1 - r0 >= 2 and c1 - c0 >= 2
                   and edge(r1 - r0, h, gh) >= 2 * self.min_region and edge(c1 - c0, w, gw) >= 2 * self.min_region)
            if can:
                rm, cm = (r0 + r1) // 2, (c0 + c1) // 2
                kids = [(r0, rm, c0, cm), (r0, rm, cm, c1), (rm, r1, c0, cm), (rm, r1, cm, c1)]
                parent = _tail(cell_stats.region(r0, r1, c0, c1), k)
                split = sum(_tail(cell_stats.region(*q), k) for q in kids)
                if parent > 0 and split <= (1 - self.min_gain) * parent:
                    top = ("w", [walk(*kids[0], depth + 1), walk(*kids[1], depth + 1)])
                    bottom = ("w", [walk(*kids[2], depth + 1), walk(*kids[3], depth + 1)])
                    return ("h", [top, bottom])
            regions.append((r0, r1, c0, c1))
            return len(regions) - 1

        tree = walk(0, gh, 0, gw, 0)
        return Tiling((gh, gw), tuple(regions), tree)


@hookimpl
def hsc_partitioners() -> list[type]:
    return [NoPartition, GridPartitioner, QuadtreePartitioner]
