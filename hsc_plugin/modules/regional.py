"""Regional expansion (``RegionalExpansionConv2d``): one reduction on the whole map, a 1×1 per region.

The block's reduction runs once on the whole map (SVD's k×k filters, Tucker-2's 1×1 + core, or
the input clusters' k×k convs — one grouped conv when the clusters are balanced),
producing ``rank`` features per output pixel; only the final 1×1 depends on the region. The regions
therefore copy K-channel maps (the reduced features), never C_in-channel crops of the input, and
the MACs equal the base form's at the same rank (the 1×1s cover disjoint pixels). Outputs are
assembled by :func:`~hsc_plugin.modules.assembly.assemble` (a large map written in eager inference;
``torch.cat`` along the tiling's tree, no in-place writes, for autograd, TorchScript,
``torch.export`` and ONNX).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.modules.base import (FactorisedModule, FinalLinear, add_bias, as_conv_kwargs, conv_geometry,
                                     fold_affine, region_deltas)
from hsc_plugin.modules.assembly import assemble
from hsc_plugin.tiling import Tiling, output_box

__all__ = ["RegionalExpansionConv2d", "ClusterReduction"]

_BASES = ("svd", "tucker2", "clusters")


class ClusterReduction(nn.Module):
    """The input clusters' reduction on the whole map: cluster ``i``'s channels through its own
    k×k conv (|c_i| → ranks[i]), the features concatenated in cluster order (K = Σ ranks).

    Equal clusters with equal ranks run as one grouped conv. :meth:`cores` gives each cluster's
    weight as a writable view, whatever the layout (how plans fill it, and pruning reads it).
    """

    def __init__(self, in_channels: int, geometry: dict[str, Any], clusters: list[list[int]], ranks: list[int],
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        clusters = [[int(ch) for ch in c] for c in clusters]
        ranks = [int(r) for r in ranks]
        flat = [ch for c in clusters for ch in c]
        if not clusters or len(ranks) != len(clusters) or any(not c for c in clusters):
            raise ValueError(f"clusters must be non-empty channel lists, one rank each; got {len(clusters)} "
                             f"clusters and {len(ranks)} ranks")
        if len(set(flat)) != len(flat) or min(flat) < 0 or max(flat) >= in_channels:
            raise ValueError(f"clusters must be disjoint subsets of range({in_channels})")
        if min(ranks) < 1:
            raise ValueError(f"every cluster's rank must be >= 1 (leave a dropped cluster out), got {ranks}")
        self.clusters, self.ranks = clusters, ranks
        self.in_channels = in_channels
        self.register_buffer("in_index", torch.tensor(flat, dtype=torch.long, device=device), persistent=False)
        kw = {"device": device, "dtype": dtype, "bias": False, **as_conv_kwargs(geometry)}
        sizes = [len(c) for c in clusters]
        self.grouped = len(clusters) > 1 and len(set(sizes)) == 1 and len(set(ranks)) == 1
        if self.grouped:
            self.convs = nn.ModuleList([nn.Conv2d(sum(sizes), sum(ranks), groups=len(clusters), **kw)])
        else:
            self.convs = nn.ModuleList(nn.Conv2d(s, r, **kw) for s, r in zip(sizes, ranks))
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        self.slices = [[offs[i], offs[i + 1]] for i in range(len(sizes))]
        self.out_channels = sum(ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.index_select(1, self.in_index)
        if len(self.convs) == 1:
            return self.convs[0](xs)
        zs = [conv(xs[:, self.slices[i][0]:self.slices[i][1]]) for i, conv in enumerate(self.convs)]
        return torch.cat(zs, 1)

    def cores(self) -> list[torch.Tensor]:
        """Per cluster: its k×k weight (ranks[i] × |c_i| × kh × kw), a view of the parameters."""
        if not self.grouped:
            return [conv.weight.detach() for conv in self.convs]
        w = self.convs[0].weight.detach()
        r = self.ranks[0]
        return [w[i * r:(i + 1) * r] for i in range(len(self.ranks))]


class RegionalExpansionConv2d(FactorisedModule, nn.Module):
    """``reduce(first(x))`` on the whole map, then ``expands[i]`` (1×1, rank → C_out) on region i.

    ``base="svd"``: ``reduce`` is a k×k conv C_in → rank with the layer's geometry and ``first``
    is ``nn.Identity`` (no parameters). ``base="tucker2"``: ``first`` is a 1×1 C_in → rank_in and
    ``reduce`` the k×k core rank_in → rank. ``base="clusters"``: ``first`` is a
    :class:`ClusterReduction` (input clusters ``clusters``, one rank each in ``ranks``, summing to
    ``rank``) and ``reduce`` is ``nn.Identity``. Each region's 1×1 carries the bias, so a fitted
    per-region bias (or a folded BatchNorm) is exact. Regions are placed by
    :func:`hsc_plugin.tiling.output_box` on the reduced map, so the module runs at any input size;
    a region that is empty at a small input size yields an empty slice of zeros.
    """

    speedup_incompatible = (
        "a regional-expansion module: it crops its reduced map into regions with bounds computed from "
        "the input size and concatenates them along the spatial axes, and ModelSpeedup cannot "
        "propagate channel masks through that (its interpreter fails with 'slice indices must be integers')"
    )
    tp_one_op = True  # tp would read the spatial crops and concatenations as channel maps

    def __init__(self, in_channels: int, out_channels: int, geometry: dict[str, Any], tiling: Tiling,
                 rank: int, *, base: str = "svd", rank_in: int | None = None, bias: bool = True,
                 clusters: list[list[int]] | None = None, ranks: list[int] | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if base == "tucker2" and (rank_in is None or int(rank_in) < 1):
            raise ValueError(f"base='tucker2' needs rank_in >= 1, got {rank_in!r}")
        if base == "clusters" and (clusters is None or ranks is None or sum(int(r) for r in ranks) != int(rank)):
            raise ValueError(f"base='clusters' needs clusters and their ranks, summing to rank={rank}; got {ranks!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base = base
        self.tiling = tiling
        if base == "clusters":
            self.first: nn.Module = ClusterReduction(in_channels, geometry, clusters or [], ranks or [], **kw)
            self.reduce: nn.Module = nn.Identity()
        else:
            if base == "tucker2":
                self.first = nn.Conv2d(in_channels, int(rank_in), 1, bias=False, **kw)
                reduce_in = int(rank_in)
            else:
                self.first = nn.Identity()
                reduce_in = in_channels
            self.reduce = nn.Conv2d(reduce_in, int(rank), bias=False, **as_conv_kwargs(geometry), **kw)
        self.expands = nn.ModuleList(nn.Conv2d(int(rank), out_channels, 1, bias=bias, **kw)
                                     for _ in range(tiling.n_regions))
        self.single = tiling.n_regions == 1
        self.grid = [int(g) for g in tiling.grid]
        self.regions = [[int(v) for v in r] for r in tiling.regions]
        # One region has no concatenation; a step that is never run (forward returns first) gives
        # TorchScript the list's element type, which it cannot infer from an empty list.
        self.program = tiling.program() or [(2, [0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce(self.first(x))
        if self.single:
            return self.expands[0](z)
        h, w = z.shape[2], z.shape[3]
        parts: list[torch.Tensor] = []
        boxes: list[tuple[int, int, int, int]] = []
        for i, expand in enumerate(self.expands):
            o0, o1, q0, q1 = output_box(self.regions[i], h, w, self.grid)
            boxes.append((o0, o1, q0, q1))
            # A conv rejects an empty map, so a region with no pixels at this input size yields
            # zeros. Symbolic sizes (torch.fx proxies) cannot be compared: they take the conv.
            if not isinstance(o0, int) or (o1 > o0 and q1 > q0):
                parts.append(expand(z[:, :, o0:o1, q0:q1]))
            else:
                parts.append(z.new_zeros([z.shape[0], self.out_channels, o1 - o0, q1 - q0]))
        return assemble(parts, boxes, self.program)

    def spec(self) -> dict[str, Any]:
        first = self.first
        kxk = first.convs[0] if isinstance(first, ClusterReduction) else self.reduce
        out = {
            "type": "RegionalExpansionConv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "geometry": conv_geometry(kxk),
            "tiling": self.tiling.to_dict(),
            "rank": self.expands[0].in_channels,  # from the weights, as the other types
            "base": self.base,
            "rank_in": first.out_channels if isinstance(first, nn.Conv2d) else None,
            "bias": self.expands[0].bias is not None,
        }
        if isinstance(first, ClusterReduction):
            out.update(clusters=first.clusters, ranks=first.ranks)
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> "RegionalExpansionConv2d":
        args = {k: v for k, v in spec.items() if k != "type"}
        args["tiling"] = Tiling.from_dict(args["tiling"])
        return cls(**args, **kw)

    def rank_layers(self) -> list[nn.Module]:
        if isinstance(self.first, ClusterReduction):
            return list(self.first.convs)
        return [self.first, self.reduce] if self.base == "tucker2" else [self.reduce]

    def fold_bn(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        if scale.numel() != self.out_channels:
            return False
        for e in self.expands:
            fold_affine(e, scale, shift)
        return True

    def final_linears(self, h: int, w: int) -> list[FinalLinear]:
        return [FinalLinear(e, box) for e, box in zip(self.expands, self.output_bias_regions(h, w))]

    def output_bias_regions(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        return [output_box(list(r), h, w, list(self.tiling.grid)) for r in self.tiling.regions]

    @torch.no_grad()
    def add_output_bias(self, delta: torch.Tensor) -> None:
        """Each region's own 1×1 takes its row of ``delta`` (or the same shift everywhere)."""
        for e, row in zip(self.expands, region_deltas(delta, len(self.expands), self.out_channels)):
            add_bias(e, row)
