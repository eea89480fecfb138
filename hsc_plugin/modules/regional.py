"""Regional expansion (``RegionalExpansionConv2d``): one reduction on the whole map, a 1×1 per region.

The block's reduction runs once on the whole map (SVD's k×k filters, or Tucker-2's 1×1 + core),
producing ``rank`` features per output pixel; only the final 1×1 depends on the region. The regions
therefore copy K-channel maps (the reduced features), never C_in-channel crops of the input, and
the MACs equal the base form's at the same rank (the 1×1s cover disjoint pixels). Outputs are
assembled with ``torch.cat`` following the tiling's tree — no in-place writes, so autograd,
TorchScript, ``torch.export`` and ONNX work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.modules.base import (FactorisedModule, FinalLinear, add_bias, as_conv_kwargs, conv_geometry,
                                     fold_affine, region_deltas)
from hsc_plugin.tiling import Tiling, output_box

__all__ = ["RegionalExpansionConv2d"]

_BASES = ("svd", "tucker2")


class RegionalExpansionConv2d(FactorisedModule, nn.Module):
    """``reduce(first(x))`` on the whole map, then ``expands[i]`` (1×1, rank → C_out) on region i.

    ``base="svd"``: ``reduce`` is a k×k conv C_in → rank with the layer's geometry and ``first``
    is ``nn.Identity`` (no parameters). ``base="tucker2"``: ``first`` is a 1×1 C_in → rank_in and
    ``reduce`` the k×k core rank_in → rank. Each region's 1×1 carries the bias, so a fitted
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
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if base == "tucker2" and (rank_in is None or int(rank_in) < 1):
            raise ValueError(f"base='tucker2' needs rank_in >= 1, got {rank_in!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base = base
        self.tiling = tiling
        if base == "tucker2":
            self.first: nn.Module = nn.Conv2d(in_channels, int(rank_in), 1, bias=False, **kw)
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
        slots: list[torch.Tensor] = []
        for i, expand in enumerate(self.expands):
            o0, o1, q0, q1 = output_box(self.regions[i], h, w, self.grid)
            # A conv rejects an empty map, so a region with no pixels at this input size yields
            # zeros. Symbolic sizes (torch.fx proxies) cannot be compared: they take the conv.
            if not isinstance(o0, int) or (o1 > o0 and q1 > q0):
                slots.append(expand(z[:, :, o0:o1, q0:q1]))
            else:
                slots.append(z.new_zeros([z.shape[0], self.out_channels, o1 - o0, q1 - q0]))
        for axis, members in self.program:
            slots.append(torch.cat([slots[m] for m in members], axis))
        return slots[-1]

    def spec(self) -> dict[str, Any]:
        first = self.first
        return {
            "type": "RegionalExpansionConv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "geometry": conv_geometry(self.reduce),
            "tiling": self.tiling.to_dict(),
            "rank": self.reduce.out_channels,  # from the weights, as the other types
            "base": self.base,
            "rank_in": first.out_channels if isinstance(first, nn.Conv2d) else None,
            "bias": self.expands[0].bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> "RegionalExpansionConv2d":
        args = {k: v for k, v in spec.items() if k != "type"}
        args["tiling"] = Tiling.from_dict(args["tiling"])
        return cls(**args, **kw)

    def rank_layers(self) -> list[nn.Module]:
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
