"""Global SVD: one truncated SVD per layer (k×k conv with r filters, then 1×1 back to C_out)."""

from __future__ import annotations

import torch
from torch import nn

from hsc_plugin.calibration import Accumulator, LayerInfo, OutputMoment
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.decomposition import Moment, mode_gram, rrr_basis, sym_eig_desc
from hsc_plugin.modules import LowRankConv2d, LowRankLinear, conv_geometry
from hsc_plugin.plan import LayerPlan, PlanContext, RankBlock

__all__ = ["GlobalSVD", "SVDPlan"]


def layer_matrices(module: nn.Module) -> list[torch.Tensor]:
    """The layer as one matrix per group: ``C_out/g × (C_in/g·kh·kw)`` (a Linear is one group)."""
    W = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return [w.reshape(w.shape[0], -1) for w in W.chunk(groups, dim=0)]


def group_blocks(S: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Diagonal blocks of an output second moment, one per group."""
    n = S.shape[0] // groups
    return [S[g * n:(g + 1) * n, g * n:(g + 1) * n] for g in range(groups)]


def weight_gram_eig(info: LayerInfo, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of group ``group``'s ``M Mᵀ`` (M: its rows of the weight, unfolded), once
    per layer: data-free SVD's basis and data-free Tucker-2's mode-0 spectrum and HOOI-free factor."""
    return info.derived(("gram_eig", group),
                        lambda: sym_eig_desc(mode_gram(layer_matrices(info.module)[group], 0)))


class SVDPlan(LayerPlan):
    """Rank-r factorisation ``M_g ≈ B_g A_g`` per group with one shared rank (one block).

    ``A = Pᵀ M``, ``B = P`` with P the top eigenvectors of ``S``: the output second moment when
    data-aware (reduced-rank regression), ``M Mᵀ`` when data-free (P = M's left singular vectors,
    so ``B A`` is the truncated SVD).
    """

    family = "svd"

    def __init__(self, info: LayerInfo, S: torch.Tensor | Moment | None, *, note: str = "", form: str = "") -> None:
        module = info.module
        self.matrices = layer_matrices(module)
        self.groups = len(self.matrices)
        # (basis, spectrum, matrix): the coefficients Pᵀ M are formed at build(), for the kept rows
        # only (at full rank they were an extra float64 copy of the weight in every plan).
        self.factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        energies = None
        for g, M in enumerate(self.matrices):
            # Data-free SVD is the same projection with white inputs (S = M Mᵀ): the top
            # eigenvectors of M Mᵀ are M's left singular vectors, and eigh of the small C×C Gram
            # matrix is much faster than an SVD of the wide C×(C_in·k²) matrix.
            if isinstance(S, Moment) and self.groups == 1:
                evals, P = S.complete_eig()  # shared with the layer's other forms
            else:
                S_t = S.full() if isinstance(S, Moment) else S
                if S_t is None:  # shared with data-free Tucker-2 of the same layer (the mode-0 Gram)
                    evals, P = weight_gram_eig(info, g)
                else:
                    evals, P = rrr_basis(group_blocks(S_t, self.groups)[g])
            k = min(M.shape)
            spectrum = evals[:k]
            self.factors.append((P[:, :k], spectrum, M))
            energies = spectrum.clone() if energies is None else energies + spectrum
        block = RankBlock(energies.cpu().numpy(), label="rank",
                          matrix=self.matrices[0] if self.groups == 1 and S is None else None)
        super().__init__(info, [block], note=note, form=form)
        if S is None:
            self.family = "svd-datafree"  # weight SVD: what its spectrum measures is not output error

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        r = ranks[0]
        m = self.info.module
        if isinstance(m, nn.Linear):
            per = r * (m.in_features + m.out_features)
            return float(per * self.info.positions if metric == "macs" else per + (m.out_features if m.bias is not None else 0))
        k = m.kernel_size[0] * m.kernel_size[1]
        per = r * (m.in_channels * k + m.out_channels)
        if metric == "macs":
            return float(per * self.info.positions)
        return float(per + (m.out_channels if m.bias is not None else 0))

    def build(self, ranks: list[int]) -> nn.Module:
        r = ranks[0]
        m = self.info.module
        W = m.weight
        kw = {"device": W.device, "dtype": W.dtype}
        A = torch.cat([f[0][:, :r].T @ f[2].double() for f in self.factors], 0)  # (g·r) × D
        B = torch.cat([f[0][:, :r] for f in self.factors], 0)  # C_out × r (per group)
        if isinstance(m, nn.Linear):
            new = LowRankLinear(m.in_features, m.out_features, r, bias=m.bias is not None, **kw)
            new.reduce.weight.data.copy_(A)
            new.expand.weight.data.copy_(B)
        else:
            new = LowRankConv2d(m.in_channels, m.out_channels, r, conv_geometry(m), groups=m.groups,
                                bias=m.bias is not None, **kw)
            new.reduce.weight.data.copy_(A.reshape(new.reduce.weight.shape))
            new.expand.weight.data.copy_(B.reshape(new.expand.weight.shape))
        if m.bias is not None:
            new.expand.bias.data.copy_(m.bias.detach())
        return new


class GlobalSVD(Compressor):
    """One truncated SVD per Conv2d/Linear layer; data-free unless ``data_aware=True``.

    Data-aware factors minimise each layer's output error on the calibration data for the rank
    (reduced-rank regression on the output second moment).
    """

    name = "global_svd"
    form_family = ("svd",)

    def statistics(self, info: LayerInfo, context: PlanContext | None = None) -> list[Accumulator]:
        if not self.data_aware:
            return []
        w = info.module.weight
        return [OutputMoment(w.shape[0], w.device)]

    def plan(self, info: LayerInfo, stats: list[Accumulator], context: PlanContext | None = None) -> LayerPlan | str:
        S = stats[0].S if stats else None
        return SVDPlan(info, S)
