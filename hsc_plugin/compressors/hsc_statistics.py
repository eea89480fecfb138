"""HSC's calibration statistics: per-cell moments of a layer's maps and per-cluster contributions.

Second moments are additive, so the statistics of any region made of cells is the sum of its
cells' (:meth:`CellStats.region`): a partitioner can try many partitions without another pass.
Cells and crop windows are placed by :mod:`hsc_plugin.tiling`, the same rule the HSC layer uses.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hsc_plugin.calibration import Accumulator
from hsc_plugin.decomposition import Moment, sym_eig_desc
from hsc_plugin.tiling import Tiling, cell_edges, explicit_padding, halo, input_window, output_box

__all__ = ["FINE_CELLS", "CellStats", "ProjectedCellStats", "ClusterContributions", "region_pixels", "pointwise"]


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


def pointwise(module: nn.Module) -> bool:
    """A stride-1, unpadded, ungrouped 1×1 conv: its pre-bias output is ``W x`` at every pixel of
    the same map, so its output statistics follow from its input statistics without another Gram."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.kernel_size != (1, 1):
        return False
    pad = module.padding
    return module.stride == (1, 1) and (pad in ("valid", "same") or tuple(pad) == (0, 0))


class ProjectedCellStats(CellStats):
    """The output cell moments of a :func:`pointwise` conv, ``W S_in Wᵀ`` per cell from its input
    cell moments, computed once after the pass (exact: ``y = W x`` pixel by pixel, and the cells lie
    on the same map). An expanding 1×1 (resnet50's C → 4C) would otherwise cost a C_out² Gram per
    pixel — 4× the conv's own MACs, in float64 — on every calibration batch."""

    needs_pass = False

    def __init__(self, module: nn.Conv2d, source: CellStats) -> None:  # noqa: D107 (no super: S is derived)
        self.grid, self.out_hw, self.side, self.moments = source.grid, source.out_hw, "output", True
        self._module, self._source = module, source
        self._S: torch.Tensor | None = None

    @property
    def count(self) -> torch.Tensor:  # type: ignore[override]
        return self._source.count

    @property
    def S(self) -> torch.Tensor:  # type: ignore[override]
        if self._S is None:
            W = self._module.weight.detach().double().flatten(1)
            self._S = W @ self._source.S @ W.T
        return self._S

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def tensors(self) -> list[torch.Tensor]:
        return []  # the source's sums are the ones to reduce across processes


def _pad(x: torch.Tensor, pad: list[int], mode: str) -> torch.Tensor:
    lrtb = [pad[2], pad[3], pad[0], pad[1]]
    return F.pad(x, lrtb) if mode == "zeros" else F.pad(x, lrtb, mode=mode)


class ClusterContributions(Accumulator):
    """Second pass of the input side: per (region, input cluster), the output second moment of
    that cluster's contribution ``y_c = W[:, c] * x[c]`` over the region's pixels."""

    def __init__(self, module: nn.Conv2d, tiling: Tiling, clusters: list[list[list[int]]],
                 inputs: CellStats | None = None) -> None:
        """``inputs``: the layer's input cell moments; for a :func:`pointwise` conv the contributions
        follow from them (a cluster's patches are its input pixels), and no pass is needed."""
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
        self.needs_pass = not (inputs is not None and pointwise(module))
        if not self.needs_pass:
            Wm = module.weight.detach().double().flatten(1)
            for r, region in enumerate(tiling.regions):
                S_in = inputs.region(*region)  # type: ignore[union-attr]
                for c, idx in enumerate(clusters[r]):
                    S_c = S_in[idx][:, idx]
                    self.G[r][c] += S_c if self.patch[r][c] else Wm[:, idx] @ S_c @ Wm[:, idx].T

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

    def merged(self) -> "ClusterContributions":
        """The same clusters on one region (the whole map): every region's Grams summed (second
        moments add). Needs the same clusters in every region."""
        if any(cl != self.clusters[0] for cl in self.clusters):
            raise ValueError("merging regions needs the same clusters in every region")
        out = copy.copy(self)
        out.tiling = Tiling.full(self.tiling.grid)
        out.clusters, out.patch = self.clusters[:1], self.patch[:1]
        out.G = [[sum(row[c] for row in self.G) for c in range(len(self.clusters[0]))]]
        out._moments = None
        return out

    def output_moment(self, region: int, cluster: int) -> torch.Tensor:
        """The C_out × C_out output moment of one (region, cluster) contribution, as a matrix (no
        eigen-decomposition: ``W_c G W_cᵀ`` from a patch Gram)."""
        G = self.G[region][cluster]
        if not self.patch[region][cluster]:
            return G
        Wc = self._patch_weight(self.module.weight.detach().double(), self.clusters[region][cluster])
        return Wc @ G @ Wc.T

    @staticmethod
    def _patch_weight(W: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """The cluster's weight as a C_out × |c|·k² map of its patches (unfold's order: channel, then
        kernel offsets): ``y_c = W_c p_c``."""
        return W[:, idx].reshape(W.shape[0], -1)

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
                    Wc = self._patch_weight(W, idx)
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
