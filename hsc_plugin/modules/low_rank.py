"""Low-rank (SVD) layers built only of standard ``nn.Conv2d`` / ``nn.Linear`` children.

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

from hsc_plugin.modules.base import FactorisedModule, as_conv_kwargs, conv_geometry, dense_conv

__all__ = ["LowRankConv2d", "LowRankLinear"]


class LowRankConv2d(FactorisedModule, nn.Sequential):
    """k×k conv with ``groups·rank`` filters, then a 1×1 conv back to ``out_channels``.

    The spatial factor carries the original stride, padding, dilation and padding_mode; the 1×1
    carries the bias. A grouped conv is factorised per group (both factors grouped), with the same
    rank in every group so that it stays one grouped conv.
    """

    output_layer = "expand"

    def __init__(self, in_channels: int, out_channels: int, rank: int, geometry: dict[str, Any], *,
                 groups: int = 1, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                reduce=nn.Conv2d(in_channels, groups * rank, groups=groups, bias=False,
                                 **as_conv_kwargs(geometry), **kw),
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

    def rank_layers(self) -> list[nn.Module]:
        return [self.reduce]

    def to_dense(self) -> nn.Module:
        return dense_conv([self.reduce, self.expand], self.reduce, "or,rikl->oikl").train(self.training)




class LowRankLinear(FactorisedModule, nn.Sequential):
    """``in → rank`` (no bias) then ``rank → out`` (with the bias): a truncated SVD of a Linear."""

    output_layer = "expand"

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
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

    def rank_layers(self) -> list[nn.Module]:
        return [self.reduce]

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        e = self.expand
        d = nn.Linear(self.reduce.in_features, e.out_features, bias=e.bias is not None,
                      device=e.weight.device, dtype=e.weight.dtype)
        d.weight.copy_(e.weight @ self.reduce.weight)
        if d.bias is not None:
            d.bias.copy_(e.bias)
        return d.train(self.training)

