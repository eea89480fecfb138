"""The HSC layer (``SpatioChannelConv2d``): one factorised block per region of a :class:`Tiling`.

Regions are placed by :mod:`hsc_plugin.tiling`; their outputs are assembled by
:func:`~hsc_plugin.modules.assembly.assemble`: a large map written in eager inference,
concatenated (no in-place writes) for autograd, TorchScript, ``torch.export`` and ONNX.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hsc_plugin.modules.assembly import assemble
from hsc_plugin.modules.base import FactorisedModule, FinalLinear, add_bias, fold_affine, region_deltas
from hsc_plugin.tiling import Tiling, explicit_padding, halo, input_window, output_box

__all__ = ["RegionBlock", "SpatioChannelConv2d"]

class RegionBlock(nn.Module):
    """One region's factorised conv, with its channel clusters; each kept cluster is one path.

    ``block="svd"``. ``side="output"``: one k×k conv computes every cluster's filters (Ci → K),
    then a 1×1 per output cluster maps its k_c filters back to its channels (a zero-rank cluster
    outputs its bias). ``side="input"``: each input cluster's channels go through their own k×k
    conv (|c| → k_c; one grouped conv when clusters and ranks are balanced), then one 1×1 maps the
    K = Σ k_c filters to all outputs — the block-term form.

    ``block="tucker2"``: each kept cluster's path is a bias-free 1×1 ``firsts[n]`` (its input
    channels → r_in_c; all C_in on the output side, the cluster's own on the input side), a k×k
    core ``reduces[n]`` (r_in_c → r_out_c, the layer's geometry), then the same expansions as
    ``svd``. Every path keeps its own convs (no merged 1×1): simple to fill and to prune, one launch
    per cluster. A 1×1 without bias commutes with every padding mode, so the cores may pad.

    :meth:`factors` gives every kept cluster's weights as writable views, whatever the layout.
    """

    speedup_incompatible = "a block of an HSC module (see SpatioChannelConv2d)"

    def __init__(self, in_channels: int, out_channels: int, geometry: dict[str, Any], side: str,
                 clusters: list[list[int]], ranks: list[int], bias: bool, device: Any = None,
                 dtype: Any = None, *, block: str = "svd", ranks_in: list[int] | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        geo = dict(geometry)
        self.side = side
        self.block = block
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.clusters = [list(map(int, c)) for c in clusters]
        self.ranks = [int(r) for r in ranks]
        self.ranks_in = [int(r) for r in ranks_in] if ranks_in is not None else []
        _check_block(side, block, self.clusters, self.ranks, ranks_in)
        self.kernel_size = tuple(geo["kernel_size"])
        self.stride = tuple(geo["stride"])
        self.dilation = tuple(geo["dilation"])
        self.padding = geo["padding"] if isinstance(geo["padding"], str) else tuple(geo["padding"])
        self.padding_mode = geo["padding_mode"]
        self.pad4 = list(explicit_padding(self.padding, self.kernel_size, self.dilation))
        conv_kw = dict(kernel_size=self.kernel_size, stride=self.stride, dilation=self.dilation,
                       padding=self.padding, padding_mode=self.padding_mode, bias=False, **kw)
        self.kept = [i for i, r in enumerate(self.ranks) if r > 0]
        self.total_rank = sum(self.ranks)
        self.firsts = nn.ModuleList()
        self.reduces = nn.ModuleList()
        self.expands = nn.ModuleList()
        self.slices: list[list[int]] = []
        self.has_bias = bias
        self.n_dropped = 0
        self.dropped: list[int] = []
        # Every attribute exists on both sides so that TorchScript compiles either branch.
        self.register_buffer("const_bias", torch.zeros(out_channels, **kw))
        if side == "input":
            self._build_input(conv_kw, kw)
        else:
            self._build_output(conv_kw, kw)

    def _reduction(self, n_in: int, i: int, conv_kw: dict[str, Any], kw: dict[str, Any]) -> nn.Conv2d:
        """Cluster ``i``'s k×k conv (after its 1×1 ``first`` when the block is tucker2)."""
        if self.block == "tucker2":
            self.firsts.append(nn.Conv2d(n_in, self.ranks_in[i], 1, bias=False, **kw))
            n_in = self.ranks_in[i]
        return nn.Conv2d(n_in, self.ranks[i], **conv_kw)

    def _build_input(self, conv_kw: dict[str, Any], kw: dict[str, Any]) -> None:
        device = kw["device"]
        index = [ch for i in self.kept for ch in self.clusters[i]]
        self.register_buffer("in_index", torch.tensor(index, dtype=torch.long, device=device), persistent=False)
        sizes = [len(self.clusters[i]) for i in self.kept]
        rks = [self.ranks[i] for i in self.kept]
        if self.block == "svd" and len(self.kept) > 1 and len(set(sizes)) == 1 and len(set(rks)) == 1:
            self.reduces.append(nn.Conv2d(sum(sizes), sum(rks), groups=len(self.kept), **conv_kw))
            self.slices.append([0, sum(sizes)])
        else:
            start = 0
            for i, s in zip(self.kept, sizes):
                self.reduces.append(self._reduction(s, i, conv_kw, kw))
                self.slices.append([start, start + s])
                start += s
        if self.total_rank > 0:
            self.expands.append(nn.Conv2d(self.total_rank, self.out_channels, 1, bias=self.has_bias, **kw))
        self.register_buffer("out_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("dropped_bias", torch.zeros(0, **kw))

    def _build_output(self, conv_kw: dict[str, Any], kw: dict[str, Any]) -> None:
        device = kw["device"]
        self.register_buffer("in_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        if self.block == "tucker2":
            for i in self.kept:
                self.reduces.append(self._reduction(self.in_channels, i, conv_kw, kw))
        elif self.total_rank > 0:
            self.reduces.append(nn.Conv2d(self.in_channels, self.total_rank, **conv_kw))
        start = 0
        order: list[int] = []
        for i in self.kept:
            self.expands.append(nn.Conv2d(self.ranks[i], len(self.clusters[i]), 1, bias=self.has_bias, **kw))
            self.slices.append([start, start + self.ranks[i]])
            start += self.ranks[i]
            order += self.clusters[i]
        dropped = [ch for i, r in enumerate(self.ranks) if r == 0 for ch in self.clusters[i]]
        order += dropped
        self.n_dropped = len(dropped)
        identity = order == list(range(self.out_channels))
        inv = torch.argsort(torch.tensor(order, dtype=torch.long)) if not identity else torch.zeros(0, dtype=torch.long)
        self.register_buffer("out_index", inv.to(device), persistent=False)
        self.register_buffer("dropped_bias", torch.zeros(len(dropped), **kw))
        self.dropped = dropped

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        pt, pb, pl, pr = self.pad4[0], self.pad4[1], self.pad4[2], self.pad4[3]
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        sh, sw = self.stride
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.total_rank == 0:
            ho, wo = self.out_size(x.shape[2], x.shape[3])
            return self.const_bias.view(1, -1, 1, 1).expand(x.shape[0], -1, ho, wo)
        if self.side == "input":
            xs = x.index_select(1, self.in_index)
            if self.block == "tucker2":
                zs = [core(first(xs[:, self.slices[i][0]:self.slices[i][1]]))
                      for i, (first, core) in enumerate(zip(self.firsts, self.reduces))]
            else:
                zs = [conv(xs[:, self.slices[i][0]:self.slices[i][1]]) for i, conv in enumerate(self.reduces)]
            z = zs[0] if len(zs) == 1 else torch.cat(zs, 1)
            return self.expands[0](z)
        # output side
        if self.block == "tucker2":
            parts = [e(core(first(x))) for first, core, e in zip(self.firsts, self.reduces, self.expands)]
        else:
            z = self.reduces[0](x)
            parts = [e(z[:, self.slices[i][0]:self.slices[i][1]]) for i, e in enumerate(self.expands)]
        y0 = parts[0]
        if self.n_dropped > 0:
            parts.append(self.dropped_bias.view(1, -1, 1, 1).expand(y0.shape[0], -1, y0.shape[2], y0.shape[3]))
        y = y0 if len(parts) == 1 else torch.cat(parts, 1)
        if self.out_index.numel() > 0:
            y = y.index_select(1, self.out_index)
        return y

    def factors(self) -> list[dict[str, torch.Tensor | None]]:
        """Per kept cluster (in ``self.kept`` order): ``first`` (r_in × its inputs, or None for svd),
        ``core`` (r_out × inputs × kh × kw) and ``expand`` (its outputs × r_out: the cluster's
        channels on the output side, all C_out on the input side) — views of the weights, so
        ``copy_`` into them writes the block (how compressors fill it, and pruning reads it)."""
        out: list[dict[str, torch.Tensor | None]] = []
        offs = [0]
        for i in self.kept:
            offs.append(offs[-1] + self.ranks[i])
        grouped = self.block == "svd" and (self.side == "output" or (len(self.reduces) == 1 and len(self.kept) > 1))
        for n in range(len(self.kept)):
            first = self.firsts[n].weight.detach()[:, :, 0, 0] if self.block == "tucker2" else None
            red = self.reduces[0] if grouped else self.reduces[n]
            core = red.weight.detach()[offs[n]:offs[n + 1]] if grouped else red.weight.detach()
            if self.side == "output":
                expand = self.expands[n].weight.detach()[:, :, 0, 0]
            else:
                expand = self.expands[0].weight.detach()[:, offs[n]:offs[n + 1], 0, 0]
            out.append({"first": first, "core": core, "expand": expand})
        return out

    @torch.no_grad()
    def channel_bias(self) -> torch.Tensor:
        """The block's bias per output channel, gathered from wherever it is kept (a copy)."""
        bias = self.const_bias.clone()
        if self.total_rank == 0:
            return bias
        bias.zero_()
        if self.side == "input":
            if self.expands[0].bias is not None:
                bias.copy_(self.expands[0].bias)
            return bias
        for e, i in zip(self.expands, self.kept):
            if e.bias is not None:
                bias[self.clusters[i]] = e.bias
        if self.n_dropped:
            bias[self.dropped] = self.dropped_bias
        return bias

    @torch.no_grad()
    def fold_bn(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Output times ``scale`` plus ``shift`` per channel: in the 1×1s, the dropped and constant biases."""
        self.const_bias.copy_(self.const_bias * scale.to(self.const_bias) + shift.to(self.const_bias))
        self.has_bias = True
        if self.side == "input":
            if len(self.expands):
                fold_affine(self.expands[0], scale, shift)
            return
        for conv, i in zip(self.expands, self.kept):
            idx = torch.tensor(self.clusters[i], dtype=torch.long, device=scale.device)
            fold_affine(conv, scale[idx], shift[idx])
        if self.dropped:
            idx = torch.tensor(self.dropped, dtype=torch.long, device=scale.device)
            self.dropped_bias.copy_(self.dropped_bias * scale[idx].to(self.dropped_bias) + shift[idx].to(self.dropped_bias))

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"side": self.side, "clusters": self.clusters, "ranks": self.ranks}
        if self.block != "svd":
            out.update(block=self.block, ranks_in=self.ranks_in)
        return out

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


def _check_block(side: str, block: str, clusters: list[list[int]], ranks: list[int],
                 ranks_in: list[int] | None) -> None:
    if side not in ("input", "output"):
        raise ValueError(f"channel_side must be 'input' or 'output', got {side!r}")
    if block not in ("svd", "tucker2"):
        raise ValueError(f"block must be 'svd' or 'tucker2', got {block!r}")
    if len(ranks) != len(clusters):
        raise ValueError(f"{len(clusters)} clusters but {len(ranks)} ranks")
    if block == "tucker2":
        if ranks_in is None or len(ranks_in) != len(clusters):
            raise ValueError(f"block='tucker2' needs ranks_in, one per cluster ({len(clusters)}), got {ranks_in!r}")
        bad = [c for c, (r, q) in enumerate(zip(ranks, ranks_in)) if r > 0 and int(q) < 1]
        if bad:
            raise ValueError(f"block='tucker2': kept clusters {bad} have input rank 0 (drop them with rank 0)")


class SpatioChannelConv2d(FactorisedModule, nn.Module):
    """An HSC-compressed conv: one :class:`RegionBlock` per region of a :class:`Tiling`.

    With one region the blocks use the layer's own padding. With several, the input is padded
    once (honouring ``padding_mode``), each region crops the input window it needs (its output
    rows/columns plus the kernel's halo) and runs its block without padding, and the outputs are
    assembled into one map (:func:`~hsc_plugin.modules.assembly.assemble`). No dense equivalent is
    kept (``to_dense`` is None) and its ranks need no protection from torch-pruning: the module is
    pruned as one layer.
    ``block`` (``"svd"`` or ``"tucker2"``, with ``region_ranks_in``: r_in per region and cluster)
    is how every (region, cluster) block is factorised (:class:`RegionBlock`).
    """

    speedup_incompatible = (
        "an HSC module: it gathers input channels per cluster (index_select) and crops spatial regions "
        "with bounds computed from the input size, and ModelSpeedup cannot propagate channel masks "
        "through that (its interpreter fails with 'slice indices must be integers')"
    )
    tp_one_op = True  # tp would read the per-cluster gathers, crops and concatenations as channel maps

    def __init__(self, in_channels: int, out_channels: int, geometry: dict[str, Any], tiling: Tiling,
                 side: str, region_clusters: list[list[list[int]]], region_ranks: list[list[int]],
                 bias: bool = True, device: Any = None, dtype: Any = None, *, block: str = "svd",
                 region_ranks_in: list[list[int]] | None = None) -> None:
        super().__init__()
        if region_ranks_in is not None and len(region_ranks_in) != len(region_ranks):
            raise ValueError(f"{len(region_ranks)} regions but {len(region_ranks_in)} lists of input ranks")
        self.block = block
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
        ins = region_ranks_in if region_ranks_in is not None else [None] * len(region_ranks)
        self.blocks = nn.ModuleList(
            RegionBlock(in_channels, out_channels, geo, side, c, r, bias, device=device, dtype=dtype,
                        block=block, ranks_in=q)
            for c, r, q in zip(region_clusters, region_ranks, ins)
        )
        self.grid = list(tiling.grid)
        self.regions = [list(r) for r in tiling.regions]
        # One region has no concatenation; a step that is never run (forward returns first) gives
        # TorchScript the list's element type, which it cannot infer from an empty list.
        self.program = tiling.program() or [(2, [0])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.single:
            return self.blocks[0](x)
        if self.padding_mode == "zeros":
            xp = F.pad(x, [self.pad[2], self.pad[3], self.pad[0], self.pad[1]])
        else:
            xp = F.pad(x, [self.pad[2], self.pad[3], self.pad[0], self.pad[1]], mode=self.padding_mode)
        h_out = (xp.shape[2] - self.halo[0]) // self.stride[0] + 1
        w_out = (xp.shape[3] - self.halo[1]) // self.stride[1] + 1
        parts: list[torch.Tensor] = []
        boxes: list[tuple[int, int, int, int]] = []
        for i, block in enumerate(self.blocks):
            o0, o1, q0, q1 = output_box(self.regions[i], h_out, w_out, self.grid)
            a0, a1 = input_window(o0, o1, self.stride[0], self.halo[0])
            b0, b1 = input_window(q0, q1, self.stride[1], self.halo[1])
            parts.append(block(xp[:, :, a0:a1, b0:b1]))
            boxes.append((o0, o1, q0, q1))
        return assemble(parts, boxes, self.program)

    def spec(self) -> dict[str, Any]:
        out = {
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
        if self.block != "svd":  # only then: specs saved before Tucker-2 blocks load unchanged
            out.update(block=self.block, region_ranks_in=[b.ranks_in for b in self.blocks])
        return out

    def output_bias_regions(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        if self.single:
            return [(0, h, 0, w)]
        return [output_box(r, h, w, self.grid) for r in self.regions]

    def final_linears(self, h: int, w: int) -> list[FinalLinear]:
        """Each region's 1×1s: the one to every output (input side), one per kept cluster to its
        channels (output side); a region with rank 0 has none (it outputs its bias)."""
        out = []
        for block, box in zip(self.blocks, self.output_bias_regions(h, w)):
            if block.side == "input":
                out += [FinalLinear(e, box) for e in block.expands]
            else:
                out += [FinalLinear(e, box, block.clusters[i]) for e, i in zip(block.expands, block.kept)]
        return out

    def add_output_bias(self, delta: torch.Tensor) -> None:
        for block, row in zip(self.blocks, region_deltas(delta, len(self.blocks), self.out_channels)):
            block.add_output_bias(row)

    def fold_bn(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        if scale.numel() != self.out_channels:
            return False
        for b in self.blocks:
            b.fold_bn(scale, shift)
        return True

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> "SpatioChannelConv2d":
        args = {k: v for k, v in spec.items() if k != "type"}
        args["tiling"] = Tiling.from_dict(args["tiling"])
        return cls(**args, **kw)
