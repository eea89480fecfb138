"""The HSC layer (``SpatioChannelConv2d``): one factorised block per region of a :class:`Tiling`.

Regions are placed by :mod:`hsc_plugin.tiling`; their outputs are assembled with ``torch.cat``
alone — no in-place writes, so autograd, TorchScript, ``torch.export`` and ONNX all work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hsc_plugin.modules.base import FactorisedModule, add_bias, region_deltas
from hsc_plugin.tiling import Tiling, explicit_padding, halo, input_window, output_box

__all__ = ["RegionBlock", "SpatioChannelConv2d"]

class RegionBlock(nn.Module):
    """One region's factorised conv, with its channel clusters.

    ``side="output"``: one k×k conv computes every cluster's filters (Ci → K), then a 1×1 per
    output cluster maps its k_c filters back to its channels (a zero-rank cluster outputs its
    bias). ``side="input"``: each input cluster's channels go through their own k×k conv
    (|c| → k_c; one grouped conv when clusters and ranks are balanced), then one 1×1 maps the
    K = Σ k_c filters to all outputs — the block-term form.
    """

    speedup_incompatible = "a block of an HSC module (see SpatioChannelConv2d)"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        geometry: dict[str, Any],
        side: str,
        clusters: list[list[int]],
        ranks: list[int],
        bias: bool,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        geo = dict(geometry)
        self.side = side
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.clusters = [list(map(int, c)) for c in clusters]
        self.ranks = [int(r) for r in ranks]
        self.kernel_size = tuple(geo["kernel_size"])
        self.stride = tuple(geo["stride"])
        self.dilation = tuple(geo["dilation"])
        self.padding = geo["padding"] if isinstance(geo["padding"], str) else tuple(geo["padding"])
        self.padding_mode = geo["padding_mode"]
        self.pad4 = list(explicit_padding(self.padding, self.kernel_size, self.dilation))
        conv_kw = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                       padding=self.padding, padding_mode=self.padding_mode, bias=False, **kw)
        kept = [i for i, r in enumerate(self.ranks) if r > 0]
        self.total_rank = sum(self.ranks)
        self.reduces = nn.ModuleList()
        self.expands = nn.ModuleList()
        self.slices: list[list[int]] = []
        self.has_bias = bias
        self.n_dropped = 0
        self.dropped: list[int] = []
        # Every attribute exists on both sides so that TorchScript compiles either branch.
        self.register_buffer("const_bias", torch.zeros(out_channels, **kw))
        if side == "input":
            index = [ch for i in kept for ch in self.clusters[i]]
            self.register_buffer("in_index", torch.tensor(index, dtype=torch.long, device=device), persistent=False)
            sizes = [len(self.clusters[i]) for i in kept]
            rks = [self.ranks[i] for i in kept]
            if len(kept) > 1 and len(set(sizes)) == 1 and len(set(rks)) == 1:
                self.reduces.append(nn.Conv2d(sum(sizes), sum(rks), groups=len(kept), **conv_kw))
                self.slices.append([0, sum(sizes)])
            else:
                start = 0
                for s, r in zip(sizes, rks):
                    self.reduces.append(nn.Conv2d(s, r, **conv_kw))
                    self.slices.append([start, start + s])
                    start += s
            if self.total_rank > 0:
                self.expands.append(nn.Conv2d(self.total_rank, out_channels, 1, bias=bias, **kw))
            self.register_buffer("out_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
            self.register_buffer("dropped_bias", torch.zeros(0, **kw))
        elif side == "output":
            self.register_buffer("in_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
            if self.total_rank > 0:
                self.reduces.append(nn.Conv2d(in_channels, self.total_rank, **conv_kw))
            start = 0
            order: list[int] = []
            for i in kept:
                self.expands.append(nn.Conv2d(self.ranks[i], len(self.clusters[i]), 1, bias=bias, **kw))
                self.slices.append([start, start + self.ranks[i]])
                start += self.ranks[i]
                order += self.clusters[i]
            dropped = [ch for i, r in enumerate(self.ranks) if r == 0 for ch in self.clusters[i]]
            order += dropped
            self.n_dropped = len(dropped)
            identity = order == list(range(out_channels))
            inv = torch.argsort(torch.tensor(order, dtype=torch.long)) if not identity else torch.zeros(0, dtype=torch.long)
            self.register_buffer("out_index", inv.to(device), persistent=False)
            self.register_buffer("dropped_bias", torch.zeros(len(dropped), **kw))
            self.dropped = dropped
        else:
            raise ValueError(f"channel_side must be 'input' or 'output', got {side!r}")

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        pt, pb, pl, pr = self.pad4[0], self.pad4[1], self.pad4[2], self.pad4[3]
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        sh, sw = self.stride
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input":
            if self.total_rank == 0:
                ho, wo = self.out_size(x.shape[2], x.shape[3])
                return self.const_bias.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo)
            xs = x.index_select(1, self.in_index)
            zs = [conv(xs[:, self.slices[i][0]:self.slices[i][1]]) for i, conv in enumerate(self.reduces)]
            z = zs[0] if len(zs) == 1 else torch.cat(zs, 1)
            return self.expands[0](z)
        # output side
        if self.total_rank == 0:
            ho, wo = self.out_size(x.shape[2], x.shape[3])
            return self.const_bias.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo)
        z = self.reduces[0](x)
        parts = [e(z[:, self.slices[i][0]:self.slices[i][1]]) for i, e in enumerate(self.expands)]
        if self.n_dropped > 0:
            parts.append(self.dropped_bias.view(1, -1, 1, 1).expand(z.shape[0], -1, z.shape[2], z.shape[3]))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if self.out_index.numel() > 0:
            y = y.index_select(1, self.out_index)
        return y

    def spec(self) -> dict[str, Any]:
        return {"side": self.side, "clusters": self.clusters, "ranks": self.ranks}

    @torch.no_grad()
    def add_output_bias(self, delta: torch.Tensor) -> None:
        """Shift every output channel by ``delta`` (C_out,): in the one 1×1 (input side), in each
        cluster's 1×1 and the dropped clusters' constant (output side), or in the zero-rank constant."""
        self.has_bias = True
        if self.total_rank == 0:
            self.const_bias += delta.to(self.const_bias)
            return
        if self.side == "input":
            add_bias(self.expands[0], delta)
            return
        kept = [i for i, r in enumerate(self.ranks) if r > 0]
        for conv, i in zip(self.expands, kept):
            add_bias(conv, delta[self.clusters[i]])
        if self.dropped:
            self.dropped_bias += delta[self.dropped].to(self.dropped_bias)


class SpatioChannelConv2d(FactorisedModule, nn.Module):
    """An HSC-compressed conv: one :class:`RegionBlock` per region of a :class:`Tiling`.

    With one region the blocks use the layer's own padding. With several, the input is padded
    once (honouring ``padding_mode``), each region crops the input window it needs (its output
    rows/columns plus the kernel's halo) and runs its block without padding, and the outputs are
    assembled by ``torch.cat`` following the tiling's tree. No dense equivalent is kept (``to_dense``
    is None) and its ranks need no protection from torch-pruning: the module is pruned as one layer.
    """

    speedup_incompatible = (
        "an HSC module: it gathers input channels per cluster (index_select) and crops spatial regions "
        "with bounds computed from the input size, and ModelSpeedup cannot propagate channel masks "
        "through that (its interpreter fails with 'slice indices must be integers')"
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        geometry: dict[str, Any],
        tiling: Tiling,
        side: str,
        region_clusters: list[list[list[int]]],
        region_ranks: list[list[int]],
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.geometry = dict(geometry)
        self.tiling = tiling
        self.side = side
        self.single = tiling.n_regions == 1
        geo = dict(geometry)
        k = tuple(geo["kernel_size"])
        d = tuple(geo["dilation"])
        self.pad = list(explicit_padding(geo["padding"] if isinstance(geo["padding"], str) else tuple(geo["padding"]), k, d))
        self.padding_mode = geo["padding_mode"]
        self.stride = list(geo["stride"])
        self.halo = halo(k, d)
        if not self.single:
            geo["padding"] = (0, 0)
            geo["padding_mode"] = "zeros"
        self.blocks = nn.ModuleList(
            RegionBlock(in_channels, out_channels, geo, side, c, r, bias, device=device, dtype=dtype)
            for c, r in zip(region_clusters, region_ranks)
        )
        self.grid = list(tiling.grid)
        self.regions = [list(r) for r in tiling.regions]
        self.program = tiling.program()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single:
            return self.blocks[0](x)
        if self.padding_mode == "zeros":
            xp = F.pad(x, [self.pad[2], self.pad[3], self.pad[0], self.pad[1]])
        else:
            xp = F.pad(x, [self.pad[2], self.pad[3], self.pad[0], self.pad[1]], mode=self.padding_mode)
        h_out = (xp.shape[2] - self.halo[0]) // self.stride[0] + 1
        w_out = (xp.shape[3] - self.halo[1]) // self.stride[1] + 1
        slots: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            o0, o1, q0, q1 = output_box(self.regions[i], h_out, w_out, self.grid)
            a0, a1 = input_window(o0, o1, self.stride[0], self.halo[0])
            b0, b1 = input_window(q0, q1, self.stride[1], self.halo[1])
            slots.append(block(xp[:, :, a0:a1, b0:b1]))
        for axis, members in self.program:
            slots.append(torch.cat([slots[m] for m in members], axis))
        return slots[-1]

    def spec(self) -> dict[str, Any]:
        return {
            "type": "SpatioChannelConv2d",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "geometry": self.geometry,
            "tiling": self.tiling.to_dict(),
            "side": self.side,
            "region_clusters": [b.clusters for b in self.blocks],
            "region_ranks": [b.ranks for b in self.blocks],
            "bias": self.blocks[0].has_bias,
        }

    def output_bias_regions(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        if self.single:
            return [(0, h, 0, w)]
        return [output_box(r, h, w, self.grid) for r in self.regions]

    def add_output_bias(self, delta: torch.Tensor) -> None:
        for block, row in zip(self.blocks, region_deltas(delta, len(self.blocks), self.out_channels)):
            block.add_output_bias(row)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> "SpatioChannelConv2d":
        args = {k: v for k, v in spec.items() if k != "type"}
        args["tiling"] = Tiling.from_dict(args["tiling"])
        return cls(**args, **kw)
