"""``foreground``: split a layer's output map into a central foreground block and background bands.

Medical images such as MRI slices have a near-empty background (the dark border around the
head). The activations there carry almost no energy, so a region made only of background cells
has a tiny spectrum and the ``budget`` rank selector gives it little or no rank; a region that
mixes background with tissue has to pay full rank everywhere. This partitioner finds the
background from the per-cell statistics that HSC already collects and tiles the map as::

    +---------------------------+
    |          top band         |
    +------+-------------+------+
    | left |  foreground | right|
    +------+-------------+------+
    |        bottom band        |
    +---------------------------+

The foreground block is the bounding box (in cells) of the cells whose activation energy is at
least ``threshold`` × the largest cell's; every band therefore holds background cells only. Bands
thinner than ``min_region`` output pixels join the foreground, as do the smallest bands when there
would be more than ``max_regions`` regions. Without a clear background (every cell bright, a small
map, a map without signal) the result is one region: exactly what ``partition="none"`` gives.

Only what every partitioner sees is used — the :class:`~hsc_plugin.compressors.hsc.CellStats` of
a layer (``grid``, ``out_hw``, the per-cell second moments ``S`` and pixel ``count``) — and the
result is a guillotine :class:`~hsc_plugin.spatial.Tiling`, so the compressed layer runs, saves,
loads and exports like one built with a built-in partitioner (loading needs no plugin).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hsc_plugin import SpatialPartitioner
from hsc_plugin.spatial import Tiling

__all__ = ["ForegroundPartitioner"]


class ForegroundPartitioner(SpatialPartitioner):
    """Foreground block plus background bands (at most 5 regions), from per-cell energy.

    Args:
        threshold: a cell is foreground when its energy is at least ``threshold`` × the largest
            cell energy of the layer (0 ≤ threshold < 1).
        max_regions: at most this many regions (1 turns the partitioner off; the layout has at
            most 5: top, left, foreground, right, bottom).
        min_region: minimum side of every region, in output pixels; thinner bands join the
            foreground, so small maps get one region.
    """

    name = "foreground"

    def __init__(self, threshold: float = 0.05, max_regions: int = 5, min_region: int = 4) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions!r}")
        if min_region < 1:
            raise ValueError(f"min_region must be >= 1, got {min_region!r}")
        self.threshold = float(threshold)
        self.max_regions = int(max_regions)
        self.min_region = int(min_region)

    # -- the two steps, public so that a user can look at what the partitioner sees -------------
    def cell_energy(self, cell_stats: Any) -> np.ndarray:
        """The ``(cells_h, cells_w)`` map of per-pixel energy that decides foreground."""
        S = torch.as_tensor(cell_stats.S).detach()
        trace = S.diagonal(dim1=-2, dim2=-1).sum(-1).to("cpu", torch.float64)  # Σ |y|² per cell
        n = torch.as_tensor(cell_stats.count).detach().to("cpu", torch.float64).clamp_min(1.0)
        return (trace / n).numpy()

    def foreground_box(self, cell_stats: Any) -> tuple[int, int, int, int] | None:
        """Bounding box ``(r0, r1, c0, c1)`` (half-open, in cells) of the foreground cells, or
        ``None`` when the map has no signal at all."""
        e = self.cell_energy(cell_stats)
        top = float(e.max()) if e.size else 0.0
        if not np.isfinite(top) or top <= 0.0:
            return None
        rows, cols = np.nonzero(e >= self.threshold * top)
        return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1

    def partition(self, cell_stats: Any) -> Tiling:
        gh, gw = (int(g) for g in cell_stats.grid)
        h, w = (int(v) for v in cell_stats.out_hw)
        full = Tiling.full((gh, gw))
        if self.max_regions < 2:
            return full
        box = self.foreground_box(cell_stats)
        if box is None:
            return full
        re = [i * h // gh for i in range(gh + 1)]  # cell edges in pixels, as the layer computes them
        ce = [j * w // gw for j in range(gw + 1)]
        r0, r1 = _grow(box[0], box[1], re, self.min_region)
        c0, c1 = _grow(box[2], box[3], ce, self.min_region)
        # bands thinner than min_region pixels are not worth a region: they join the foreground
        if re[r0] < self.min_region:
            r0 = 0
        if h - re[r1] < self.min_region:
            r1 = gh
        if ce[c0] < self.min_region:
            c0 = 0
        if w - ce[c1] < self.min_region:
            c1 = gw
        # too many regions: the band with the fewest pixels joins the foreground, until it fits
        while True:
            bands = {
                "top": re[r0] * w,
                "bottom": (h - re[r1]) * w,
                "left": (re[r1] - re[r0]) * ce[c0],
                "right": (re[r1] - re[r0]) * (w - ce[c1]),
            }
            bands = {k: v for k, v in bands.items() if v > 0}
            if 1 + len(bands) <= self.max_regions:
                break
            side = min(bands, key=lambda k: bands[k])  # ties: dict order (top, bottom, left, right)
            if side == "top":
                r0 = 0
            elif side == "bottom":
                r1 = gh
            elif side == "left":
                c0 = 0
            else:
                c1 = gw
        return _tiling((gh, gw), r0, r1, c0, c1)


def _grow(a: int, b: int, edges: list[int], min_px: int) -> tuple[int, int]:
    """Widen the cell range ``[a, b)`` one cell at a time (towards the side with more room) until
    it spans at least ``min_px`` pixels or the whole axis."""
    n = len(edges) - 1
    while edges[b] - edges[a] < min_px and (a > 0 or b < n):
        before, after = edges[a] - edges[0], edges[n] - edges[b]
        if after >= before and b < n:
            b += 1
        else:
            a -= 1
    return a, b


def _tiling(grid: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> Tiling:
    """top / (left | foreground | right) / bottom, leaving out empty bands.

    Regions are numbered in reading order: top, left, foreground, right, bottom.
    """
    gh, gw = grid
    regions: list[tuple[int, int, int, int]] = []

    def add(rect: tuple[int, int, int, int]) -> int:
        regions.append(rect)
        return len(regions) - 1

    top = add((0, r0, 0, gw)) if r0 > 0 else None
    left = add((r0, r1, 0, c0)) if c0 > 0 else None
    fg = add((r0, r1, c0, c1))
    right = add((r0, r1, c1, gw)) if c1 < gw else None
    bottom = add((r1, gh, 0, gw)) if r1 < gh else None
    row = [i for i in (left, fg, right) if i is not None]
    middle: Any = row[0] if len(row) == 1 else ("w", row)
    column = [n for n in (top, middle, bottom) if n is not None]
    tree: Any = column[0] if len(column) == 1 else ("h", column)
    return Tiling((gh, gw), tuple(regions), tree)
