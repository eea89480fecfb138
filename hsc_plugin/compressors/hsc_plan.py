"""HSC's layer plan: blocks are (region, cluster) pairs, each factorised by a block factoriser
(:class:`~hsc_plugin.strategy.BlockFactoriser`: ``svd`` keeps the top eigenvectors of the block's
output statistics, ``tucker2`` a data-aware Tucker-2 of the block), and the HSC layer built from them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.calibration import LayerInfo
from hsc_plugin.compressors.hsc_statistics import region_pixels
from hsc_plugin.decomposition import fold_input_factor
from hsc_plugin.modules import LowRankConv2d, SpatioChannelConv2d, Tucker2Conv2d, conv_geometry
from hsc_plugin.plan import LayerPlan, RankBlock
from hsc_plugin.strategy import BlockFactors
from hsc_plugin.tiling import Tiling, explicit_padding, halo, input_window, output_box

__all__ = ["HSCPlan"]


class HSCPlan(LayerPlan):
    """One conv as regions × clusters, every block factorised on its own (``factors[r][c]``).

    All blocks share one structure (``"svd"`` or ``"tucker2"``). ``tied`` (svd, input side): one
    rank for all clusters of a region, so the region runs as one grouped conv.
    """

    family = "hsc"

    def __init__(self, info: LayerInfo, tiling: Tiling, side: str, clusters: list[list[list[int]]],
                 factors: list[list[BlockFactors]], tied: bool = False, form: str = "") -> None:
        m: nn.Conv2d = info.module
        self.tiling, self.side, self.clusters, self.factors = tiling, side, clusters, factors
        self.structure = factors[0][0].structure
        if any(f.structure != self.structure for row in factors for f in row):
            raise ValueError("all blocks of an HSC layer must share one structure (svd or tucker2)")
        if tied and self.structure != "svd":
            raise ValueError("tied (balanced) ranks apply to svd blocks")
        self.tied = tied
        self.pixels = region_pixels(tiling, info.out_hw)
        self.crop_pixels = _crop_pixels(m, tiling, info)
        self.kk = m.kernel_size[0] * m.kernel_size[1]
        blocks: list[RankBlock] = []
        self._offsets: list[list[int]] = []  # per region, per cluster: index of its first rank block
        for r, row in enumerate(factors):
            if tied:
                spectra = [f.rank_blocks[0].energies for f in row]
                kmin = min(len(e) for e in spectra)
                blocks.append(RankBlock(sum(e[:kmin] for e in spectra), label=f"r{r}", min_rank=0))
                continue
            offs = []
            for f in row:
                offs.append(len(blocks))
                blocks.extend(f.rank_blocks)
            self._offsets.append(offs)
        total = sum(f.total for row in factors for f in row)
        super().__init__(info, blocks, total_energy=total, form=form or _label(tiling, side, clusters, self.structure))

    # -- ranks ------------------------------------------------------------------------------------
    def _split(self, ranks: list[int]) -> list[list[list[int]]]:
        """Per region, per cluster: the block's ranks ([k] for svd, [r_out, r_in] for tucker2)."""
        if self.tied:
            return [[[r] for _ in cl] for r, cl in zip(ranks, self.clusters)]
        n = len(self.factors[0][0].rank_blocks)
        return [[list(ranks[o:o + n]) for o in offs] for offs in self._offsets]

    def retained(self, ranks: list[int]) -> float:
        return float(sum(f.retained(rk) for row, rks in zip(self.factors, self._split(ranks))
                         for f, rk in zip(row, rks)))

    # -- costs ------------------------------------------------------------------------------------
    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        m: nn.Conv2d = self.info.module
        co, ci = m.out_channels, m.in_channels
        bias = m.bias is not None
        total = 0.0
        for P, Pin, cl, rks in zip(self.pixels, self.crop_pixels, self.clusters, self._split(ranks)):
            outs = [k[0] for k in rks]  # the ranks the expands see (svd: k; tucker2: r_out)
            K = sum(outs)
            if self.structure == "tucker2":  # first 1×1 on the crop, then the core
                ins = [len(idx) if self.side == "input" else ci for idx in cl]
                firsts = 0 if self._folded(rks) else sum(k[1] * n for k, n, o in zip(rks, ins, outs) if o > 0)
                reduce = sum(k[1] * k[0] * self.kk for k in rks if k[0] > 0)
                macs, params = firsts * Pin + reduce * P, firsts + reduce
            else:
                reduce = sum(k * (len(idx) if self.side == "input" else ci) * self.kk for idx, k in zip(cl, outs))
                macs, params = reduce * P, reduce
            if self.side == "input":
                expand, extra = co * K, (co if (bias and K > 0) else 0)
            else:
                expand = sum(len(idx) * k for idx, k in zip(cl, outs))
                extra = sum(len(idx) for idx, k in zip(cl, outs) if k > 0) if bias else 0
            total += (macs + expand * P) if metric == "macs" else (params + expand + extra)
        return total

    def _folded(self, rks: list[list[int]]) -> bool:
        """One region, one cluster at full input rank: the first 1×1 is folded into the core."""
        return (self.tiling.n_regions == 1 and len(rks) == 1 and rks[0][0] > 0
                and rks[0][1] >= self.info.module.in_channels)

    # -- building ---------------------------------------------------------------------------------
    def build(self, ranks: list[int]) -> nn.Module:
        m: nn.Conv2d = self.info.module
        split = self._split(ranks)
        single = self.tiling.n_regions == 1 and len(self.clusters[0]) == 1
        if single and split[0][0][0] > 0 and (self.side == "output" or self.structure == "tucker2"):
            return self._build_plain(split[0][0])
        kw = {"device": m.weight.device, "dtype": m.weight.dtype}
        outs = [[k[0] for k in rks] for rks in split]
        extra: dict[str, Any] = {}
        if self.structure == "tucker2":
            extra = {"block": "tucker2", "region_ranks_in": [[k[1] for k in rks] for rks in split]}
        new = SpatioChannelConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, self.side,
                                  self.clusters, outs, bias=m.bias is not None, **kw, **extra)
        for blk, row, cl, rks in zip(new.blocks, self.factors, self.clusters, split):
            self._fill_region(blk, row, cl, rks)
        return new

    def _build_plain(self, rk: list[int]) -> nn.Module:
        """One region, one cluster: exactly data-aware SVD (or Tucker-2); plain modules are fastest."""
        m: nn.Conv2d = self.info.module
        kw = {"device": m.weight.device, "dtype": m.weight.dtype, "bias": m.bias is not None}
        f = self.factors[0][0].factors(rk)
        if self.structure == "svd":
            new: nn.Module = LowRankConv2d(m.in_channels, m.out_channels, rk[0], conv_geometry(m), **kw)
            new.reduce.weight.data.copy_(f[0])
            new.expand.weight.data.copy_(f[1][:, :, None, None])
            last = new.expand
        elif rk[1] >= m.in_channels:  # full input rank: fold the invertible first 1×1 into the core
            new = LowRankConv2d(m.in_channels, m.out_channels, rk[0], conv_geometry(m), **kw)
            new.reduce.weight.data.copy_(fold_input_factor(f[1], f[0]))
            new.expand.weight.data.copy_(f[2][:, :, None, None])
            last = new.expand
        else:
            new = Tucker2Conv2d(m.in_channels, m.out_channels, rk[1], rk[0], conv_geometry(m), **kw)
            new.first.weight.data.copy_(f[0][:, :, None, None])
            new.core.weight.data.copy_(f[1])
            new.last.weight.data.copy_(f[2][:, :, None, None])
            last = new.last
        if m.bias is not None:
            last.bias.data.copy_(m.bias.detach())
        return new

    def _fill_region(self, blk: nn.Module, row: list[BlockFactors], cl: list[list[int]], rks: list[list[int]]) -> None:
        """Copy one region's block factors into its :class:`~hsc_plugin.modules.RegionBlock`."""
        m: nn.Conv2d = self.info.module
        bias = m.bias.detach() if m.bias is not None else None
        kept = [c for c, k in enumerate(rks) if k[0] > 0]
        fs = [row[c].factors(rks[c]) for c in kept]
        tucker = self.structure == "tucker2"
        reduces = [f[1] if tucker else f[0] for f in fs]
        for conv, f in zip(getattr(blk, "firsts", []), fs):
            conv.weight.data.copy_(f[0][:, :, None, None])
        if len(blk.reduces) == 1 and len(reduces) > 1 and self.side == "input":  # one grouped conv
            blk.reduces[0].weight.data.copy_(torch.cat(reduces, 0))
        elif len(blk.reduces) == 1 and len(reduces) > 1:  # output side: one conv for all clusters
            blk.reduces[0].weight.data.copy_(torch.cat(reduces, 0).reshape(blk.reduces[0].weight.shape))
        else:
            for conv, w in zip(blk.reduces, reduces):
                conv.weight.data.copy_(w.reshape(conv.weight.shape))
        expands = [f[-1] for f in fs]
        if self.side == "input":
            if blk.expands:
                blk.expands[0].weight.data.copy_(torch.cat(expands, 1)[:, :, None, None])
                if bias is not None:
                    blk.expands[0].bias.data.copy_(bias)
        else:
            for e, c, U in zip(blk.expands, kept, expands):
                e.weight.data.copy_(U[:, :, None, None])
                if bias is not None:
                    e.bias.data.copy_(bias[cl[c]])
            if bias is not None and blk.n_dropped:
                blk.dropped_bias.copy_(bias[blk.dropped])
        if bias is not None and blk.total_rank == 0:
            blk.const_bias.copy_(bias)

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        split = self._split(ranks)
        return {
            "channel_side": self.side,
            "block": self.structure,
            "tiling": self.tiling.to_dict(),
            "regions": [
                {"cells": list(reg), "pixels": P, "cluster_sizes": [len(c) for c in cl],
                 "ranks": [k[0] for k in rk] if self.structure == "svd" else rk}
                for reg, P, cl, rk in zip(self.tiling.regions, self.pixels, self.clusters, split)
            ],
        }


def _crop_pixels(m: nn.Conv2d, tiling: Tiling, info: LayerInfo) -> list[int]:
    """Input pixels each region's first 1×1 runs on: the whole unpadded input for one region, else
    the region's window of the padded input (the HSC layer crops it with the kernel's halo)."""
    if tiling.n_regions == 1:
        return [info.in_hw[0] * info.in_hw[1]]
    pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    t, b, l, r = explicit_padding(pad, tuple(m.kernel_size), tuple(m.dilation))
    hp, wp = info.in_hw[0] + t + b, info.in_hw[1] + l + r
    span = halo(m.kernel_size, m.dilation)
    out = []
    for reg in tiling.regions:
        o0, o1, q0, q1 = output_box(list(reg), info.out_hw[0], info.out_hw[1], list(tiling.grid))
        a0, a1 = input_window(o0, o1, m.stride[0], span[0])
        b0, b1 = input_window(q0, q1, m.stride[1], span[1])
        out.append((min(a1, hp) - a0) * (min(b1, wp) - b0))
    return out


def _label(tiling: Tiling, side: str, clusters: list[list[list[int]]], structure: str = "svd") -> str:
    """The form's name for the report: regions, clusters per region and the block factoriser."""
    n = tiling.n_regions
    sizes = sorted({len(c) for c in clusters})
    counts = "-".join(str(k) for k in sizes)
    name = f"{n} region{'s' if n > 1 else ''}, {counts} {side} cluster{'s' if sizes != [1] else ''}"
    return name if structure == "svd" else f"{name}, {structure} blocks"
