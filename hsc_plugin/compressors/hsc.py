"""HSC: hierarchical spatio-channel low-rank compression.

Level 1 splits each layer's output map into regions (a partitioner plugin on per-cell output
second moments); level 2 clusters channels per region by co-activation (a clusterer plugin);
level 3 keeps, per (region, cluster) block, the top eigenvectors of the block's output second
moment — the reduced-rank-regression optimum, whose discarded eigenvalues are the calibration
error — with ranks chosen by the shared rank selectors (``budget`` water-fills across layers,
regions and clusters).

``channel_side="output"`` clusters output channels (each cluster gets its own basis of filters);
``channel_side="input"`` clusters input channels and gives each its own low-rank path summed at
the output (a block-term decomposition), whose rank units cost |c|·k² + C_out MACs per pixel
instead of C_in·k² + C_out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsc_plugin.calibration import Accumulator, LayerInfo, OutputMoment
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.compressors.global_svd import SVDPlan
from hsc_plugin.decomposition import factor_eig_desc, sym_eig_desc
from hsc_plugin.modules import LowRankConv2d, conv_geometry
from hsc_plugin.plan import LayerPlan, RankBlock
from hsc_plugin.registry import create
from hsc_plugin.modules import SpatioChannelConv2d
from hsc_plugin.tiling import Tiling, cell_edges, explicit_padding, halo, input_window, output_box
from hsc_plugin.strategy import ChannelClusterer, SpatialPartitioner

__all__ = ["HSC", "HSCPlan", "CellStats", "coactivation"]


def coactivation(S: torch.Tensor) -> np.ndarray:
    """|corr| of channels from an uncentred second moment: |S_ij| / sqrt(S_ii S_jj)."""
    d = S.diagonal().clamp_min(1e-30).sqrt()
    return (S.abs() / d[:, None] / d[None, :]).clamp(0, 1).cpu().numpy()


def balance_clusters(clusters: list[list[int]], A: np.ndarray) -> list[list[int]]:
    """Equal-size clusters (sizes differ by at most one) that keep most of a clustering.

    Channels are ordered cluster by cluster, each cluster's channels by their mean co-activation
    with it (most typical first), and the order is cut into equal consecutive chunks. Equal sizes
    and a tied rank let the input side run as one grouped conv (ALDS's k-SVD form).
    """
    order: list[int] = []
    for cl in sorted(clusters, key=len, reverse=True):
        typical = A[np.ix_(cl, cl)].mean(axis=1)
        order += [cl[i] for i in np.argsort(-typical, kind="stable")]
    n, total = len(clusters), len(order)
    edges = cell_edges(total, n)
    return [sorted(order[edges[i]:edges[i + 1]]) for i in range(n)]


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

    def moments(self) -> list[list["Moment"]]:
        """Per (region, cluster): the output second moment of the cluster's contribution, as the
        matrix or — from a patch Gram — as a thin factor ``W_c G^½`` (same eigenvectors, cheaper)."""
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
        return out


class Moment:
    """A PSD second moment, given as the matrix ``S`` or as a thin factor ``F`` with ``S = F Fᵀ``."""

    def __init__(self, matrix: torch.Tensor | None = None, factor: torch.Tensor | None = None) -> None:
        self.matrix, self.factor = matrix, factor

    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues descending and their eigenvectors (only the possibly non-zero ones for a factor)."""
        return sym_eig_desc(self.matrix) if self.factor is None else factor_eig_desc(self.factor)


def _region_pixels(tiling: Tiling, out_hw: tuple[int, int]) -> list[int]:
    boxes = [output_box(list(r), out_hw[0], out_hw[1], list(tiling.grid)) for r in tiling.regions]
    return [(o1 - o0) * (q1 - q0) for o0, o1, q0, q1 in boxes]


class HSCPlan(LayerPlan):
    """Blocks are (region, cluster) pairs; each keeps the top eigenvectors of its statistics."""

    def __init__(self, info: LayerInfo, tiling: Tiling, side: str, clusters: list[list[list[int]]],
                 moments: list[list[Moment]], tied: bool = False) -> None:
        m: nn.Conv2d = info.module
        self.tiling = tiling
        self.side = side
        self.clusters = clusters
        self.tied = tied  # one rank for all clusters of a region: runs as one grouped conv
        self.pixels = _region_pixels(tiling, info.out_hw)
        self.kk = m.kernel_size[0] * m.kernel_size[1]
        W = m.weight.detach().double()
        self.bases: list[list[torch.Tensor]] = []
        blocks: list[RankBlock] = []
        for r, (cl, mom) in enumerate(zip(clusters, moments)):
            row: list[torch.Tensor] = []
            spectra: list[torch.Tensor] = []
            for c, (idx, S) in enumerate(zip(cl, mom)):
                evals, evecs = S.eig()
                if side == "output":
                    k = min(len(idx), m.in_channels * self.kk)
                else:
                    k = min(m.out_channels, len(idx) * self.kk)
                row.append(evecs[:, :k])
                if not tied:
                    blocks.append(RankBlock(evals[:k].cpu().numpy(), label=f"r{r}c{c}", min_rank=0))
                else:
                    spectra.append(evals[:k])
            if tied:
                kmin = min(len(e) for e in spectra)
                blocks.append(RankBlock(sum(e[:kmin] for e in spectra).cpu().numpy(), label=f"r{r}", min_rank=0))
            self.bases.append(row)
        self.W = W
        super().__init__(info, blocks, dense_cost={})

    def _split(self, ranks: list[int]) -> list[list[int]]:
        if self.tied:
            return [[r] * len(cl) for r, cl in zip(ranks, self.clusters)]
        out, i = [], 0
        for cl in self.clusters:
            out.append(list(ranks[i:i + len(cl)]))
            i += len(cl)
        return out

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        m: nn.Conv2d = self.info.module
        co, ci = m.out_channels, m.in_channels
        bias = m.bias is not None
        total = 0.0
        for P, cl, rk in zip(self.pixels, self.clusters, self._split(ranks)):
            K = sum(rk)
            if self.side == "input":
                per = sum(k * len(idx) * self.kk for idx, k in zip(cl, rk)) + (co * K)
                extra = co if (bias and K > 0) else 0
            else:
                per = K * ci * self.kk + sum(len(idx) * k for idx, k in zip(cl, rk))
                extra = sum(len(idx) for idx, k in zip(cl, rk) if k > 0) if bias else 0
            total += per * P if metric == "macs" else per + extra
        return total

    def build(self, ranks: list[int]) -> nn.Module:
        m: nn.Conv2d = self.info.module
        split = self._split(ranks)
        kw = {"device": m.weight.device, "dtype": m.weight.dtype}
        if self.tiling.n_regions == 1 and len(self.clusters[0]) == 1 and self.side == "output" and split[0][0] > 0:
            # One region, one cluster: exactly data-aware SVD; the plain two-conv module is fastest.
            r = split[0][0]
            P = self.bases[0][0][:, :r]
            new = LowRankConv2d(m.in_channels, m.out_channels, r, conv_geometry(m), bias=m.bias is not None, **kw)
            new.reduce.weight.data.copy_((P.T @ self.W.reshape(m.out_channels, -1)).reshape(new.reduce.weight.shape))
            new.expand.weight.data.copy_(P[:, :, None, None])
            if m.bias is not None:
                new.expand.bias.data.copy_(m.bias.detach())
            return new
        new = SpatioChannelConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, self.side,
                                  self.clusters, split, bias=m.bias is not None, **kw)
        bias = m.bias.detach() if m.bias is not None else None
        for blk, cl, rk, bases in zip(new.blocks, self.clusters, split, self.bases):
            kept = [c for c, k in enumerate(rk) if k > 0]
            if self.side == "input":
                filters = [(bases[c][:, :rk[c]].T @ self.W[:, cl[c]].reshape(m.out_channels, -1))
                           .reshape(rk[c], len(cl[c]), *m.kernel_size) for c in kept]
                if len(blk.reduces) == 1 and len(kept) > 1:
                    blk.reduces[0].weight.data.copy_(torch.cat(filters, 0))
                else:
                    for conv, f in zip(blk.reduces, filters):
                        conv.weight.data.copy_(f)
                if blk.expands:
                    U = torch.cat([bases[c][:, :rk[c]] for c in kept], 1)
                    blk.expands[0].weight.data.copy_(U[:, :, None, None])
                    if bias is not None:
                        blk.expands[0].bias.data.copy_(bias)
                if bias is not None and blk.total_rank == 0:
                    blk.const_bias.copy_(bias)
            else:
                if blk.reduces:
                    A = torch.cat([bases[c][:, :rk[c]].T @ self.W[cl[c]].reshape(len(cl[c]), -1) for c in kept], 0)
                    blk.reduces[0].weight.data.copy_(A.reshape(blk.reduces[0].weight.shape))
                for e, c in zip(blk.expands, kept):
                    e.weight.data.copy_(bases[c][:, :rk[c]][:, :, None, None])
                    if bias is not None:
                        e.bias.data.copy_(bias[cl[c]])
                if bias is not None:
                    if blk.n_dropped:
                        blk.dropped_bias.copy_(bias[blk.dropped])
                    if blk.total_rank == 0:
                        blk.const_bias.copy_(bias)
        return new

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        split = self._split(ranks)
        return {
            "channel_side": self.side,
            "tiling": self.tiling.to_dict(),
            "regions": [
                {"cells": list(reg), "pixels": P, "cluster_sizes": [len(c) for c in cl], "ranks": rk}
                for reg, P, cl, rk in zip(self.tiling.regions, self.pixels, self.clusters, split)
            ],
        }


class HSC(Compressor):
    """Hierarchical spatio-channel compression (regions → channel clusters → per-block ranks).

    Options (besides the shared ones of :class:`Compressor`): ``partition`` (name or
    :class:`SpatialPartitioner`; ``grid`` sets the grid partitioner's ``(rows, cols)``),
    ``clusterer`` (name or :class:`ChannelClusterer`) with ``n_clusters`` (``None`` = automatic),
    ``channel_side`` (``"input"`` or ``"output"``), ``cells`` (the statistics grid; default: what
    the partitioner needs — its own cells for ``grid``/``none``, 2^max_depth a side (4×4) for
    ``quadtree``, the 8×8 fine grid for other adaptive ones; statistics memory is cells × C²
    float64 per layer, layers in groups under ``max_stats_gb``) and
    ``min_region`` (minimum region side in output pixels; smaller maps get fewer regions) and
    ``alternatives``: under a latency budget, also offer each layer as one region (same kind of
    clusters) and as plain data-aware SVD, and let measured time choose per layer
    (:mod:`hsc_plugin.forms`) — regions buy accuracy but cost launches, so a layer is split only
    where that pays at the budget. MAC and parameter budgets always use the partitioner's form.
    Grouped convs and Linear layers are compressed as one region, one cluster (data-aware SVD).
    """

    name = "hsc"

    def __init__(
        self,
        *,
        partition: str | SpatialPartitioner = "grid",
        grid: tuple[int, int] | int | None = None,
        clusterer: str | ChannelClusterer = "agglomerative",
        n_clusters: int | None = 4,
        channel_side: str = "input",
        balanced: bool = False,
        cells: tuple[int, int] | int | None = None,
        min_region: int = 4,
        alternatives: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.alternatives = bool(alternatives)
        if balanced and channel_side != "input":
            raise ValueError("balanced=True applies to channel_side='input' (equal input clusters run as one grouped conv)")
        self.balanced = bool(balanced)
        if channel_side not in ("input", "output"):
            raise ValueError(f"channel_side must be 'input' or 'output', got {channel_side!r}")
        self.partition = partition
        self.grid = grid
        self.clusterer = clusterer
        self.n_clusters = n_clusters
        self.channel_side = channel_side
        self.cells = None if cells is None else (cells, cells) if isinstance(cells, int) else tuple(cells)
        self.min_region = int(min_region)
        self.data_aware = True
        part_opts: dict[str, Any] = {}
        if grid is not None:
            part_opts["grid"] = grid
        if isinstance(partition, str) and partition.lower() in ("grid", "quadtree"):
            part_opts["min_region"] = self.min_region
        self._partitioner = create("partitioner", partition, SpatialPartitioner, **part_opts)
        clu_opts: dict[str, Any] = {}
        if isinstance(clusterer, str) and clusterer.lower() != "single":
            clu_opts = {"n_clusters": n_clusters, "seed": self.seed}
        self._clusterer = create("clusterer", clusterer, ChannelClusterer, **clu_opts)

    def needs_calibration(self) -> bool:
        return True

    def options(self) -> dict[str, Any]:
        out = super().options()
        out["partition"] = self._partitioner.config()
        out["clusterer"] = self._clusterer.config()
        return out

    @staticmethod
    def _spatial(info: LayerInfo) -> bool:
        return isinstance(info.module, nn.Conv2d) and info.module.groups == 1

    def _offers_alternatives(self, info: LayerInfo) -> bool:
        return self.alternatives and self._budget_metric == "latency" and self._spatial(info)

    def _grid(self, info: LayerInfo) -> tuple[int, int]:
        h, w = info.out_hw
        cells = self.cells if self.cells is not None else self._partitioner.statistics_grid(FINE_CELLS)
        return (max(1, min(cells[0], h)), max(1, min(cells[1], w)))

    def statistics_bytes(self, info: LayerInfo) -> int:
        m = info.module
        if not self._spatial(info):
            return 8 * (int(m.weight.shape[0]) ** 2 + 1)  # float64 moment and its count
        grid = self._grid(info)
        if self.channel_side == "output":
            return CellStats.nbytes(m.out_channels, grid)
        svd = 8 * (m.out_channels**2 + 1) if self._offers_alternatives(info) else 0
        return (CellStats.nbytes(m.out_channels, grid, self._partitioner.uses_moments)
                + CellStats.nbytes(m.in_channels, grid) + svd)

    def statistics(self, info: LayerInfo) -> list[Accumulator]:
        m = info.module
        dev = m.weight.device
        if not self._spatial(info):
            return [OutputMoment(m.weight.shape[0], dev)]
        grid = self._grid(info)
        if self.channel_side == "output":
            return [CellStats(m.out_channels, grid, info.out_hw, "output", dev)]
        # Input side: output moments only for partitioners that read them (the input clusters'
        # own output statistics come in the second pass); the whole map's for the SVD form.
        accs: list[Accumulator] = [
            CellStats(m.out_channels, grid, info.out_hw, "output", dev, moments=self._partitioner.uses_moments),
            CellStats(m.in_channels, grid, info.out_hw, "input", dev)]
        if self._offers_alternatives(info):
            accs.append(OutputMoment(m.out_channels, dev))
        return accs

    def _cluster(self, S: torch.Tensor) -> list[list[int]]:
        A = coactivation(S)
        labels = self._clusterer.cluster(A)
        clusters = [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]
        if self.balanced and len(clusters) > 1:
            clusters = balance_clusters(clusters, A)
        return clusters

    def second_statistics(self, info: LayerInfo, stats: list[Accumulator]) -> list[Accumulator]:
        if not self._spatial(info) or self.channel_side != "input":
            return []
        tiling = self._partitioner.partition(stats[0])
        inputs: CellStats = stats[1]  # type: ignore[assignment]
        clusters = [self._cluster(inputs.region(*reg)) for reg in tiling.regions]
        out = [ClusterContributions(info.module, tiling, clusters)]
        if self._offers_alternatives(info) and tiling.n_regions > 1:
            whole = inputs.S.sum(dim=(0, 1))
            out.append(ClusterContributions(info.module, Tiling.full(tiling.grid), [self._cluster(whole)]))
        return out

    def plan(self, info: LayerInfo, stats: list[Accumulator]) -> LayerPlan | str:
        if not self._spatial(info):
            plan = SVDPlan(info, stats[0].S)
            plan.note = "grouped conv / Linear: one region, one cluster (data-aware SVD)"
            return plan
        cells: CellStats = stats[0]  # type: ignore[assignment]
        alternatives = self._offers_alternatives(info)
        if self.channel_side == "input":
            forms: list[LayerPlan] = [
                _labelled(HSCPlan(info, c.tiling, "input", c.clusters, c.moments(), tied=self.balanced))
                for c in stats if isinstance(c, ClusterContributions)]
            whole = next((a.S for a in stats if isinstance(a, OutputMoment)), None)
        else:
            tiling = self._partitioner.partition(cells)
            forms = [self._output_plan(info, tiling, cells)]
            whole = cells.S.sum(dim=(0, 1))
            if alternatives and tiling.n_regions > 1:
                forms.append(self._output_plan(info, Tiling.full(tiling.grid), cells))
        if not alternatives:
            return forms[0]
        last = forms[-1]
        if whole is not None and not (last.tiling.n_regions == 1 and all(len(c) == 1 for c in last.clusters)):
            svd = SVDPlan(info, whole)
            svd.form = "1 region, 1 cluster (data-aware SVD)"
            forms.append(svd)
        return forms

    def _output_plan(self, info: LayerInfo, tiling: Tiling, cells: CellStats) -> HSCPlan:
        clusters, moments = [], []
        for reg in tiling.regions:
            S = cells.region(*reg)
            cl = self._cluster(S)
            clusters.append(cl)
            moments.append([Moment(matrix=S[idx][:, idx]) for idx in cl])
        return _labelled(HSCPlan(info, tiling, "output", clusters, moments))


def _labelled(plan: HSCPlan) -> HSCPlan:
    """Name the plan's form for the report: regions and clusters per region."""
    n = plan.tiling.n_regions
    sizes = sorted({len(c) for c in plan.clusters})
    clusters = "-".join(str(k) for k in sizes)
    plan.form = f"{n} region{'s' if n > 1 else ''}, {clusters} {plan.side} cluster{'s' if sizes != [1] else ''}"
    return plan
