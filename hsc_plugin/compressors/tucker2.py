"""Tucker-2: 1×1 (C_in→R_in) → k×k core (R_in→R_out) → 1×1 (R_out→C_out), via TensorLy."""

from __future__ import annotations

import torch
from torch import nn

from hsc_plugin.calibration import Accumulator, InputChannelMoment, LayerInfo, OutputMoment
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.compressors.global_svd import SVDPlan, group_blocks, weight_gram_eig
from hsc_plugin.decomposition import Moment, Tucker2Bases, fold_input_factor
from hsc_plugin.modules import LowRankConv2d, Tucker2Conv2d, conv_geometry
from hsc_plugin.plan import LayerPlan, PlanContext, RankBlock

__all__ = ["Tucker2", "Tucker2Plan", "kept_fractions_product"]


def _unfold(W: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(W, mode, 0).reshape(W.shape[mode], -1)


def kept_fractions_product(blocks: list[RankBlock], ranks: list[int]) -> float:
    """The product of the blocks' kept energy fractions at these ranks: the two-mode model of
    Tucker-2 and of the forms built on its reduction."""
    out = 1.0
    for r, b in zip(ranks, blocks):
        out *= float(b.energies[:r].sum() / b.total) if b.total > 0 else 1.0
    return out


class Tucker2Plan(LayerPlan):
    """Two coupled blocks per layer: the output mode (R_out) and the input mode (R_in).

    Their energies are the squared singular values of the mode unfoldings (data-free) or the
    output second moment's eigenvalues and the whitened input unfolding's spectrum (data-aware).
    The cost couples them (the core costs R_in·R_out·k²), which the budget selector handles.
    """

    family = "tucker2"

    def __init__(self, info: LayerInfo, S_out: torch.Tensor | Moment | None, S_in: torch.Tensor | None, *,
                 form: str = "") -> None:
        m: nn.Conv2d = info.module
        self.groups = m.groups
        W = info.weight64()
        self.weights = list(W.chunk(self.groups, 0))
        if isinstance(S_out, Moment) and self.groups > 1:
            S_out = S_out.full()
        if isinstance(S_out, Moment):  # shares its eigen-decomposition with the layer's other forms
            self.S_out: list = [S_out]
        else:
            self.S_out = group_blocks(S_out, self.groups) if S_out is not None else [None] * self.groups
        self.S_in = group_blocks(S_in, self.groups) if S_in is not None else [None] * self.groups
        # Each group's rank-free work (moment eigen-decompositions, whitening) is done once here:
        # build() at any ranks is then a slice and a contraction (data-free: the HOOI sweeps).
        self.bases = [Tucker2Bases(Wg, So, Si, gram_eig=weight_gram_eig(info, g) if So is None else None)
                      for g, (Wg, So, Si) in enumerate(zip(self.weights, self.S_out, self.S_in))]
        e_out = e_in = None
        for Wg, b in zip(self.weights, self.bases):
            kk = Wg.shape[2] * Wg.shape[3]
            # A mode's rank is at most the other dimension of its unfolding.
            eo = b.energies_out[: min(Wg.shape[0], Wg.shape[1] * kk)]
            ei = b.energies_in[: min(Wg.shape[1], Wg.shape[0] * kk)]
            e_out = eo if e_out is None else e_out + eo
            e_in = ei if e_in is None else e_in + ei
        data_free = S_out is None and self.groups == 1
        blocks = [
            RankBlock(e_out.cpu().numpy(), label="out", matrix=_unfold(self.weights[0], 0) if data_free else None),
            RankBlock(e_in.cpu().numpy(), label="in", matrix=(lambda: _unfold(self.weights[0], 1)) if data_free else None),
        ]
        super().__init__(info, blocks, total_energy=1.0, form=form)
        if S_out is None and S_in is None:
            self.family = "tucker2-datafree"

    def retained(self, ranks: list[int]) -> float:
        """Energy kept, modelled as the product of the two modes' kept fractions.

        Truncating both modes compounds (keeping all output directions is worthless when a single
        input direction survives), which an additive model would miss and the greedy would exploit.
        """
        return self.total_energy * kept_fractions_product(self.blocks, ranks)

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        r_out, r_in = ranks
        m = self.info.module
        k = m.kernel_size[0] * m.kernel_size[1]
        g = self.groups
        first = 0 if self.input_folded(r_in) else m.in_channels * r_in  # see build()
        if metric == "macs":
            pin = self.info.in_hw[0] * self.info.in_hw[1]
            p = self.info.positions
            return float(pin * first + p * g * r_in * r_out * k + p * r_out * m.out_channels)
        return float(first + g * r_in * r_out * k + r_out * m.out_channels
                     + (m.out_channels if m.bias is not None else 0))

    def input_folded(self, r_in: int) -> bool:
        """At full input rank the first 1×1 is an invertible C_in×C_in map: it is folded into
        the core. (Kept, a 1→1 1×1 conv on a 1-channel 128 px stem took 20 ms at batch 32 — 16×
        the dense 11×11 layer — in PyTorch 2.14's CPU kernels.)"""
        return r_in >= self.info.module.in_channels // self.groups

    def build(self, ranks: list[int]) -> nn.Module:
        r_out, r_in = ranks
        m: nn.Conv2d = self.info.module
        firsts, cores, lasts = [], [], []
        for b in self.bases:
            U_out, core, V_in = b.factors(r_out, r_in)
            firsts.append(V_in.T)
            cores.append(core)
            lasts.append(U_out)
        kw = {"device": m.weight.device, "dtype": m.weight.dtype}
        if self.input_folded(r_in):  # k×k (C_in→R_out) → 1×1: the SVD form, exact same map
            low = LowRankConv2d(m.in_channels, m.out_channels, r_out, conv_geometry(m), groups=self.groups,
                                bias=m.bias is not None, **kw)
            folded = [fold_input_factor(c, vt) for c, vt in zip(cores, firsts)]
            low.reduce.weight.data.copy_(torch.cat(folded, 0))
            low.expand.weight.data.copy_(torch.cat(lasts, 0)[:, :, None, None])
            if m.bias is not None:
                low.expand.bias.data.copy_(m.bias.detach())
            return low
        new = Tucker2Conv2d(m.in_channels, m.out_channels, r_in, r_out, conv_geometry(m), groups=self.groups,
                            bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        new.first.weight.data.copy_(torch.cat(firsts, 0)[:, :, None, None])
        new.core.weight.data.copy_(torch.cat(cores, 0))
        new.last.weight.data.copy_(torch.cat(lasts, 0)[:, :, None, None])
        if m.bias is not None:
            new.last.bias.data.copy_(m.bias.detach())
        return new


class Tucker2(Compressor):
    """Tucker-2 over the channel modes of each k×k conv (TensorLy, torch backend).

    Data-free by default; with a budget, ranks are scaled to it (one energy share τ per
    unfolding for every layer, see the ``scaled`` selector). ``data_aware=True`` takes the output factor from the output second
    moment and whitens the input factor by the input channel second moment. Linear layers and
    1×1 convs (where Tucker-2 reduces to an SVD) use the SVD factorisation; the report says so.
    """

    name = "tucker2"
    budget_selector = "scaled"
    form_family = ("tucker2", "svd")  # Linear layers and 1×1 convs are SVDs

    def statistics(self, info: LayerInfo, context: PlanContext | None = None) -> list[Accumulator]:
        if not self.data_aware:
            return []
        w = info.module.weight
        accs: list[Accumulator] = [OutputMoment(w.shape[0], w.device)]
        if self._is_spatial(info.module):
            accs.append(InputChannelMoment(info.module.in_channels, w.device))
        return accs

    @staticmethod
    def _is_spatial(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)

    def plan(self, info: LayerInfo, stats: list[Accumulator], context: PlanContext | None = None) -> LayerPlan | str:
        S_out = stats[0].S if stats else None
        if not self._is_spatial(info.module):
            return SVDPlan(info, S_out, note="Linear / 1x1 conv: Tucker-2 reduces to an SVD")
        return Tucker2Plan(info, S_out, stats[1].S if len(stats) > 1 else None)
