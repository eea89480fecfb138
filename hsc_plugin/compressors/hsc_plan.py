"""HSC's layer plan: blocks are (region, cluster) pairs, each keeping the top eigenvectors of its
output statistics (the reduced-rank-regression optimum), and the HSC layer built from them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.calibration import LayerInfo
from hsc_plugin.compressors.hsc_statistics import region_pixels
from hsc_plugin.decomposition import Moment
from hsc_plugin.modules import LowRankConv2d, SpatioChannelConv2d, conv_geometry
from hsc_plugin.plan import LayerPlan, RankBlock
from hsc_plugin.tiling import Tiling

__all__ = ["HSCPlan"]


class HSCPlan(LayerPlan):
    """Blocks are (region, cluster) pairs; each keeps the top eigenvectors of its statistics."""

    def __init__(self, info: LayerInfo, tiling: Tiling, side: str, clusters: list[list[list[int]]],
                 moments: list[list[Moment]], tied: bool = False) -> None:
        m: nn.Conv2d = info.module
        self.tiling = tiling
        self.side = side
        self.clusters = clusters
        self.tied = tied  # one rank for all clusters of a region: runs as one grouped conv
        self.pixels = region_pixels(tiling, info.out_hw)
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
        super().__init__(info, blocks, form=_label(tiling, side, clusters))

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


def _label(tiling: Tiling, side: str, clusters: list[list[list[int]]]) -> str:
    """The form's name for the report: regions and clusters per region."""
    n = tiling.n_regions
    sizes = sorted({len(c) for c in clusters})
    counts = "-".join(str(k) for k in sizes)
    return f"{n} region{'s' if n > 1 else ''}, {counts} {side} cluster{'s' if sizes != [1] else ''}"
