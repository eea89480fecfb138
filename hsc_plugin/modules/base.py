"""The common base of factorised module types, and the registry they fill by subclassing."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

__all__ = ["FactorisedModule", "FinalLinear", "TYPES", "conv_geometry", "as_conv_kwargs", "dense_conv", "add_bias", "region_deltas", "fold_affine"]

TYPES: dict[str, type["FactorisedModule"]] = {}
"""Every factorised module type by its spec name (``spec()["type"]``); filled by subclassing."""


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


def as_conv_kwargs(geom: dict[str, Any]) -> dict[str, Any]:
    """A stored geometry (lists from JSON) as ``nn.Conv2d`` keyword arguments."""
    g = dict(geom)
    for k in ("kernel_size", "stride", "dilation"):
        g[k] = tuple(g[k])
    if not isinstance(g["padding"], str):
        g["padding"] = tuple(g["padding"])
    return g


class FinalLinear(NamedTuple):
    """A final linear factor of a factorised module, where its output lands (see ``final_linears``)."""

    module: nn.Module
    box: tuple[int, int, int, int]  # output rows [o0, o1), columns [q0, q1)
    channels: list[int] | None = None  # the output channels it produces, in its order (None: all)


class FactorisedModule:
    """Mixin of every module that replaces a dense conv/linear; a subclass registers itself.

    What serialization, deployment and the adapters ask a type: ``spec()`` / ``from_spec()``
    (JSON structure, no pickled code), ``rank_layers()`` (inner layers whose output channels are
    ranks: torch-pruning must not prune them), ``to_dense()`` (the equivalent nn.Conv2d/nn.Linear,
    or None), ``fold_bn(scale, shift)`` (absorb a following BatchNorm's per-channel affine; False
    when it cannot), ``speedup_incompatible`` (why NNI's ModelSpeedup cannot handle it, or None)
    and ``tp_one_op`` (torch-pruning must trace and prune it as one layer: its inner crops,
    concatenations or channel gathers are not channel maps tp understands; the channel surgery
    for such a type lives in the torch-pruning adapter).

    What label-free recovery (:mod:`hsc_plugin.recovery`, :mod:`hsc_plugin.refit`) asks:
    ``final_linears(h, w)`` (the last linear factors and the output boxes they produce, for the
    sequential refit; ``[]`` if not refittable), ``output_bias_regions(h, w)``
    (the output boxes that carry their own bias; one box unless the form is regional) and
    ``add_output_bias(delta)`` (shift the output by ``delta``, shaped ``(C_out,)`` or
    ``(n_regions, C_out)`` in the order of ``output_bias_regions``). Every type should implement
    ``add_output_bias``; a factor without a bias gets one, and ``spec()`` must then say
    ``bias=True`` so that save/load round-trips (:func:`add_bias`, :func:`region_deltas` help).
    """

    speedup_incompatible: ClassVar[str | None] = None
    tp_one_op: ClassVar[bool] = False
    output_layer: ClassVar[str | None] = None  # a chain's last factor: it takes biases and folded BNs

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.__name__.startswith("_"):
            TYPES[cls.__name__] = cls

    def spec(self) -> dict[str, Any]:  # pragma: no cover - every type overrides it
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict[str, Any], **kw: Any) -> Any:
        args = {k: v for k, v in spec.items() if k != "type"}
        return cls(**args, **kw)

    def rank_layers(self) -> list[nn.Module]:
        return []

    def to_dense(self) -> nn.Module | None:
        return None

    def output_bias_regions(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Boxes (rows ``[o0, o1)``, columns ``[q0, q1)``) of an ``h × w`` output map that each
        have their own output bias, in the order :meth:`add_output_bias` takes them."""
        return [(0, h, 0, w)]

    def add_output_bias(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the module's output: ``(C_out,)`` everywhere, or ``(n_regions, C_out)``
        one row per box of :meth:`output_bias_regions`."""
        last = self._output_layer()
        if last is None:
            raise NotImplementedError(f"{type(self).__name__} does not implement add_output_bias")
        add_bias(last, region_deltas(delta, 1, last.weight.shape[0])[0])

    def final_linears(self, h: int, w: int) -> list[FinalLinear]:
        """The final linear factors (``nn.Linear`` or 1×1 stride-1 ``nn.Conv2d``) that produce the
        output, each with the box of an ``h × w`` output map it produces (ignored for Linear) and
        the output channels it produces (None: all, in order); what sequential refit
        (:mod:`hsc_plugin.refit`) refits. ``[]``: the type cannot be refitted so. Default: the
        ``output_layer`` child over the whole map."""
        last = self._output_layer()
        return [] if last is None else [FinalLinear(last, (0, h, 0, w))]

    def fold_bn(self, scale: torch.Tensor, shift: torch.Tensor) -> bool:
        """Make the output ``y`` become ``y * scale + shift`` per output channel, in place (a folded
        BatchNorm); False, leaving the module as it was, where the type cannot."""
        last = self._output_layer()
        if not isinstance(last, nn.Conv2d) or scale.numel() != last.out_channels:
            return False
        fold_affine(last, scale, shift)
        return True

    def _output_layer(self) -> nn.Module | None:
        """The one child that produces the whole output (``output_layer`` names it), if any."""
        name = getattr(type(self), "output_layer", None)
        return getattr(self, name) if name else None


def region_deltas(delta: torch.Tensor, n_regions: int, channels: int) -> torch.Tensor:
    """``delta`` of shape ``(channels,)`` or ``(n_regions, channels)`` as ``(n_regions, channels)``."""
    d = delta.detach()
    if d.shape == (channels,):
        return d.expand(n_regions, channels)
    if d.shape != (n_regions, channels):
        raise ValueError(f"Output bias delta must have shape ({channels},) or ({n_regions}, {channels}), "
                         f"got {tuple(d.shape)}")
    return d


@torch.no_grad()
def add_bias(layer: nn.Module, delta: torch.Tensor) -> None:
    """``layer.bias += delta`` for an ``nn.Conv2d``/``nn.Linear``, giving it a bias if it has none."""
    w = layer.weight
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype),
                                  requires_grad=w.requires_grad)
    layer.bias.add_(delta.to(layer.bias))


@torch.no_grad()
def fold_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``conv``'s output times ``scale`` plus ``shift`` per output channel (a bias is created if absent)."""
    w = conv.weight
    conv.weight.data = w.detach() * scale.to(w).view(-1, *([1] * (w.dim() - 1)))
    old = conv.bias.detach() if conv.bias is not None else torch.zeros_like(shift).to(w)
    conv.bias = nn.Parameter(old * scale.to(w) + shift.to(w), requires_grad=w.requires_grad)


@torch.no_grad()
def dense_conv(convs: list[nn.Conv2d], spatial: nn.Conv2d, equation: str) -> nn.Conv2d:
    """The dense conv a chain of (grouped) convs computes: per group, ``einsum(equation)`` of the
    factors' weights (1x1 factors squeezed to matrices), the last factor's bias."""
    g = spatial.groups
    d = nn.Conv2d(convs[0].in_channels, convs[-1].out_channels, spatial.kernel_size, spatial.stride,
                  spatial.padding, spatial.dilation, g, bias=convs[-1].bias is not None,
                  padding_mode=spatial.padding_mode, device=spatial.weight.device, dtype=spatial.weight.dtype)
    for j in range(g):
        ws = [c.weight.chunk(g, 0)[j] for c in convs]  # per group: (out_g, in_g, kh, kw)
        ws = [w if c is spatial else w[:, :, 0, 0] for w, c in zip(ws, convs)]
        d.weight[j * d.out_channels // g:(j + 1) * d.out_channels // g] = torch.einsum(equation, *ws[::-1])
    if d.bias is not None:
        d.bias.copy_(convs[-1].bias)
    return d
