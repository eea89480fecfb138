"""HSC's calibration statistics: per-cell moments of a layer's maps and per-cluster contributions.

Second moments are additive, so the statistics of any region made of cells is the sum of its
cells' (:meth:`CellStats.region`): a partitioner can try many partitions without another pass.
Cells and crop windows are placed by :mod:`hsc_plugin.tiling`, the same rule the HSC layer uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsc_plugin.calibration import Accumulator
from hsc_plugin.decomposition import Moment, sym_eig_desc
from hsc_plugin.tiling import Tiling, cell_edges, explicit_padding, halo, input_window, output_box

__all__ = ["FINE_CELLS", "CellStats", "ClusterContributions", "region_pixels"]


# The statistics grid adaptive partitioners (quadtree) choose regions from.
FINE_CELLS: tuple[int, int] = (8, 8)


class CellStats(Accumulator):
    """Per-cell uncentred second moments of a map (g_h × g_w cells of C × C, float64).

    ``side="output"`` accumulates the layer's pre-bias output; ``"input"`` its input (cells laid
    proportionally over the input map). A region's statistics are the sum of its cells'.
    """

    def __init__(self, channels: int, grid: tuple[int, int], out_hw: tuple[int, int], side: str,
                 device: torch.device, moments: bool = True) -> None:
        self.grid = grid
        self.out_hw = out_hw
        self.side = side
        self.moments = moments  # False: pixel counts only (a fixed tiling needs no more)
        c = channels if moments else 0
        self.S = torch.zeros(grid[0], grid[1], c, c, dtype=torch.float64, device=device)
        self.count = torch.zeros(grid[0], grid[1], dtype=torch.float64, device=device)

    @staticmethod
    def nbytes(channels: int, grid: tuple[int, int], moments: bool = True) -> int:
        """What the accumulator allocates (float64 moments and counts)."""
        return 8 * grid[0] * grid[1] * ((channels**2 if moments else 0) + 1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t = y if self.side == "output" else x
        re, ce = cell_edges(t.shape[2], self.grid[0]), cell_edges(t.shape[3], self.grid[1])
        for i in range(self.grid[0]):
            for j in range(self.grid[1]):
                block = t[:, :, re[i]:re[i + 1], ce[j]:ce[j + 1]]
                if self.moments:
                    Y = block.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
                    self.S[i, j] += Y.T @ Y
                elif not bool(torch.isfinite(block).all()):  # still report where NaN/Inf appear
                    self.count[i, j] += float("nan")
                self.count[i, j] += block.shape[0] * block.shape[2] * block.shape[3]

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.count] if self.moments else [self.count]

    def region(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        return self.S[r0:r1, c0:c1].sum(dim=(0, 1))


def _pad(x: torch.Tensor, pad: list[int], mode: str) -> torch.Tensor:
    lrtb = [pad[2], pad[3], pad[0], pad[1]]
    return F.pad(x, lrtb) if mode == "zeros" else F.pad(x, lrtb, mode=mode)


class ClusterContributions(Accumulator):
    """Second pass of the input side: per (region, input cluster), the output second moment of
    that cluster's contribution ``y_c = W[:, c] * x[c]`` over the region's pixels."""

    def __init__(self, module: nn.Conv2d, tiling: Tiling, clusters: list[list[list[int]]]) -> None:
        self.module = module
        self.tiling = tiling
        self.clusters = clusters
        self._moments: list[list[Moment]] | None = None  # made once, by moments()
        co = module.out_channels
        dev = module.weight.device
        kk = module.kernel_size[0] * module.kernel_size[1]
        # E[y_c y_cᵀ] = W_c E[p_c p_cᵀ] W_cᵀ with p_c the cluster's input patches (|c|·k² long):
        # accumulate whichever Gram is smaller — for 1×1 convs and small clusters the patches'.
        self.patch = [[len(idx) * kk < co for idx in cl] for cl in clusters]
        self.G = [[torch.zeros((len(idx) * kk,) * 2 if p else (co, co), dtype=torch.float64, device=dev)
                   for idx, p in zip(cl, pr)] for cl, pr in zip(clusters, self.patch)]
        k, d = module.kernel_size, module.dilation
        pad = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        self.pad = list(explicit_padding(pad, k, d))
        self.halo = halo(k, d)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        m = self.module
        xp = _pad(x, self.pad, m.padding_mode)
        h, w = y.shape[2], y.shape[3]
        W = m.weight
        for r, region in enumerate(self.tiling.regions):
            o0, o1, q0, q1 = output_box(list(region), h, w, list(self.tiling.grid))
            a0, a1 = input_window(o0, o1, m.stride[0], self.halo[0])
            b0, b1 = input_window(q0, q1, m.stride[1], self.halo[1])
            crop = xp[:, :, a0:a1, b0:b1]
            for c, idx in enumerate(self.clusters[r]):
                ix = torch.tensor(idx, device=x.device)
                xc = crop.index_select(1, ix)
                if self.patch[r][c]:
                    P = F.unfold(xc, m.kernel_size, dilation=m.dilation, stride=m.stride)  # (N, |c|k², L)
                    Y = P.transpose(1, 2).reshape(-1, P.shape[1]).double()
                else:
                    yc = F.conv2d(xc, W.index_select(1, ix), stride=m.stride, dilation=m.dilation)
                    Y = yc.permute(0, 2, 3, 1).reshape(-1, yc.shape[1]).double()
                self.G[r][c] += Y.T @ Y

    def tensors(self) -> list[torch.Tensor]:
        return [t for row in self.G for t in row]

    def moments(self) -> list[list[Moment]]:
        """Per (region, cluster): the output second moment of the cluster's contribution, as the
        matrix or — from a patch Gram — as a thin factor ``W_c G^½`` (same eigenvectors, cheaper).
        Computed once, so the block factorisers that share a moment share its eigen-decomposition."""
        if self._moments is not None:
            return self._moments
        W = self.module.weight.detach().double()
        out = []
        for cl, pr, gr in zip(self.clusters, self.patch, self.G):
            row: list[Moment] = []
            for idx, p, G in zip(cl, pr, gr):
                if p:
                    Wc = W[:, idx].reshape(W.shape[0], -1)  # unfold's order: channel, then kernel offsets
                    evals, evecs = sym_eig_desc(G)
                    row.append(Moment(factor=Wc @ (evecs * evals.sqrt())))
                else:
                    row.append(Moment(matrix=G))
            out.append(row)
        self._moments = out
        return out


def region_pixels(tiling: Tiling, out_hw: tuple[int, int]) -> list[int]:
    """Output pixels of each region of a tiling on an ``out_hw`` map."""
    boxes = [output_box(list(r), out_hw[0], out_hw[1], list(tiling.grid)) for r in tiling.regions]
    return [(o1 - o0) * (q1 - q0) for o0, o1, q0, q1 in boxes]
