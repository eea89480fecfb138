"""Factorised layers built only of standard ``nn.Conv2d`` / ``nn.Linear`` children.

They subclass ``nn.Sequential`` so that torch-pruning, NNI, TorchScript, ``torch.export`` and ONNX
see nothing but ordinary convolutions and matrix products, and so that ``state_dict`` keys are
plain (``reduce.weight``, ``expand.weight`` …). Each class knows how to rebuild its skeleton from
a small JSON-safe ``spec`` (used by save/load) and how many MACs it executes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["LowRankConv2d", "LowRankLinear", "Tucker2Conv2d", "conv_geometry", "FACTORISED_TYPES"]


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The arguments that define a conv's spatial behaviour (copied onto its spatial factor)."""
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    return {
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": padding,
        "dilation": tuple(conv.dilation),
        "padding_mode": conv.padding_mode,
    }


def _as_conv_kwargs(geom: dict[str, Any]) -> dict[str, Any]:
    g = dict(geom)
    for k in ("kernel_size", "stride", "dilation"):
        g[k] = tuple(g[k])
    if not isinstance(g["padding"], str):
        g["padding"] = tuple(g["padding"])
    return g


class _Factorised(nn.Sequential):
    """Common part: rebuild from a JSON ``spec`` (for loading without pickled code)."""

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> "_Factorised":
        args = {k: v for k, v in spec.items() if k != "type"}
        return cls(**args, **kw)


class LowRankConv2d(_Factorised):
    """k×k conv with ``groups·rank`` filters, then a 1×1 conv back to ``out_channels``.

    The spatial factor carries the original stride, padding, dilation and padding_mode; the 1×1
    carries the bias. A grouped conv is factorised per group (both factors grouped), with the same
    rank in every group so that it stays one grouped conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        geometry: dict[str, Any],
        *,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                reduce=nn.Conv2d(in_channels, groups * rank, groups=groups, bias=False,
                                 **_as_conv_kwargs(geometry), **kw),
                expand=nn.Conv2d(groups * rank, out_channels, 1, groups=groups, bias=bias, **kw),
            )
        )
        self.rank = rank

    def spec(self) -> dict[str, Any]:
        r = self.reduce
        return {
            "type": "LowRankConv2d",
            "in_channels": r.in_channels,
            "out_channels": self.expand.out_channels,
            "rank": r.out_channels // r.groups,  # from the weights: a structured pruner may shrink it
            "geometry": conv_geometry(r),
            "groups": r.groups,
            "bias": self.expand.bias is not None,
        }


class Tucker2Conv2d(_Factorised):
    """1×1 (C_in→R_in) → k×k core (R_in→R_out, the layer's geometry) → 1×1 (R_out→C_out, bias).

    For a grouped conv every factor is grouped the same way (a Tucker-2 per group).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank_in: int,
        rank_out: int,
        geometry: dict[str, Any],
        *,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                first=nn.Conv2d(in_channels, groups * rank_in, 1, groups=groups, bias=False, **kw),
                core=nn.Conv2d(groups * rank_in, groups * rank_out, groups=groups, bias=False,
                               **_as_conv_kwargs(geometry), **kw),
                last=nn.Conv2d(groups * rank_out, out_channels, 1, groups=groups, bias=bias, **kw),
            )
        )
        self.rank_in = rank_in
        self.rank_out = rank_out

    def spec(self) -> dict[str, Any]:
        return {
            "type": "Tucker2Conv2d",
            "in_channels": self.first.in_channels,
            "out_channels": self.last.out_channels,
            "rank_in": self.first.out_channels // self.first.groups,  # from the weights (see above)
            "rank_out": self.core.out_channels // self.core.groups,
            "geometry": conv_geometry(self.core),
            "groups": self.core.groups,
            "bias": self.last.bias is not None,
        }


class LowRankLinear(_Factorised):
    """``in → rank`` (no bias) then ``rank → out`` (with the bias): a truncated SVD of a Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                reduce=nn.Linear(in_features, rank, bias=False, **kw),
                expand=nn.Linear(rank, out_features, bias=bias, **kw),
            )
        )
        self.rank = rank

    def spec(self) -> dict[str, Any]:
        return {
            "type": "LowRankLinear",
            "in_features": self.reduce.in_features,
            "out_features": self.expand.out_features,
            "rank": self.reduce.out_features,  # from the weights (see above)
            "bias": self.expand.bias is not None,
        }


FACTORISED_TYPES: dict[str, type[nn.Module]] = {
    "LowRankConv2d": LowRankConv2d,
    "Tucker2Conv2d": Tucker2Conv2d,
    "LowRankLinear": LowRankLinear,
}
