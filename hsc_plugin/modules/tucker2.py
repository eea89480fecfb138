"""Tucker-2 conv: 1x1 channel reduction, k x k core, 1x1 expansion, all plain ``nn.Conv2d``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from hsc_plugin.modules.base import FactorisedModule, as_conv_kwargs, conv_geometry, dense_conv

__all__ = ["Tucker2Conv2d"]


class Tucker2Conv2d(FactorisedModule, nn.Sequential):
    """1×1 (C_in→R_in) → k×k core (R_in→R_out, the layer's geometry) → 1×1 (R_out→C_out, bias).

    For a grouped conv every factor is grouped the same way (a Tucker-2 per group).
    """

    output_layer = "last"

    def __init__(self, in_channels: int, out_channels: int, rank_in: int, rank_out: int,
                 geometry: dict[str, Any], *, groups: int = 1, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            OrderedDict(
                first=nn.Conv2d(in_channels, groups * rank_in, 1, groups=groups, bias=False, **kw),
                core=nn.Conv2d(groups * rank_in, groups * rank_out, groups=groups, bias=False,
                               **as_conv_kwargs(geometry), **kw),
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

    def rank_layers(self) -> list[nn.Module]:
        return [self.first, self.core]

    def to_dense(self) -> nn.Module:
        convs = [self.first, self.core, self.last]
        return dense_conv(convs, self.core, "ob,bakl,ai->oikl").train(self.training)


