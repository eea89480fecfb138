"""Regional expansion: SVD's or Tucker-2's reduction once on the whole map, the final 1×1 fitted per region.

With the data-aware SVD basis P (top eigenvectors of the whole map's output moment S), the
reduced features are ``z = Pᵀ y`` at every position. Region r's 1×1 is the least-squares map from
z to y over its pixels, ``A_r = S_r P (Pᵀ S_r P)⁻¹``, computed from the per-cell output moments
(any partition is a sum of cells; no extra pass). Same MACs as SVD at the same rank, more
parameters (one C_out × K map per region), and lower error wherever the regions' statistics
differ. Nested bases make every rank exact from one Cholesky per region: with
``Pᵀ S_r P = L Lᵀ`` and ``G = S_r P L⁻ᵀ``, the error at rank K is ``tr S_r − ‖G[:, :K]‖²``, so
column j of G carries component j's energy.

On Tucker-2 (:class:`RegionalTucker2Plan`) the reduction is data-aware Tucker-2's first 1×1 and
core, whose R_out features are ``z = Pᵀ ŷ`` with ŷ the conv of the input-projected weight; the
regional 1×1s are the same least-squares maps, fitted as if ``ŷ = y`` (exact at full input rank,
where the first 1×1 is invertible). The input mode's energy enters as Tucker-2's does (the two
modes' kept fractions multiply), so the predicted error is a model; the measured one is reported.

On input clusters (:class:`RegionalClustersPlan`) the reduction is the one-region HSC form's
(each input cluster's k×k conv, ``z_c = P_cᵀ y_c`` with ``y_c`` the cluster's contribution), and
region r's 1×1 is, cluster by cluster, the least-squares map from ``z_c`` to ``y_c`` on the
region's contribution moment — the same per-cluster error model as HSC's blocks (clusters'
errors add); the sequential refit then fits each region's 1×1 jointly on the data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.calibration import LayerInfo
from hsc_plugin.compressors.hsc_statistics import CellStats, ClusterContributions, region_pixels
from hsc_plugin.compressors.hsc_plan import HSCPlan
from hsc_plugin.compressors.tucker2 import Tucker2Plan, kept_fractions_product
from hsc_plugin.decomposition import Moment, fold_input_factor
from hsc_plugin.modules import LowRankConv2d, RegionalExpansionConv2d, Tucker2Conv2d, conv_geometry
from hsc_plugin.plan import LayerPlan, RankBlock
from hsc_plugin.tiling import Tiling

__all__ = ["RegionalSVDPlan", "RegionalTucker2Plan", "RegionalExpansionPlan", "RegionalClustersPlan",
           "regional_least_squares"]


def _cholesky(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a PSD matrix, with the smallest ridge that makes it succeed."""
    scale = float(M.diagonal().abs().max().clamp_min(1e-30))
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for eps in (1e-10, 1e-8, 1e-6, 1e-4):
        L, info = torch.linalg.cholesky_ex(M + eps * scale * eye)
        if int(info) == 0:
            return L
    raise torch.linalg.LinAlgError("regional expansion: the reduced features' moment is not positive definite")


def regional_least_squares(S_r: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For features ``z = Pᵀ y`` on a region with output moment ``S_r``: (energies, Q, L) with
    ``energies[j]`` the error removed by the j-th feature (nested in K), ``Q = S_r P`` and the
    Cholesky factor ``L`` of ``Pᵀ S_r P``; the 1×1 at rank K is ``Q_K (L_K L_Kᵀ)⁻¹``."""
    Q = S_r @ P
    L = _cholesky(P.T @ Q)
    G = torch.linalg.solve_triangular(L, Q.T, upper=False).T  # Q L⁻ᵀ
    return G.pow(2).sum(dim=0), Q, L


def _least_squares_map(Q: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The C_out × K map ``Q (L Lᵀ)⁻¹`` of :func:`regional_least_squares` (at rank K: its first K
    columns of Q and leading K × K block of L)."""
    return torch.cholesky_solve(Q.T, L).T


def _maps_params(module: nn.Conv2d, n: int, rank: int) -> int:
    """Parameters of ``n`` regional 1×1 maps, rank → C_out, each with the layer's bias."""
    return n * (rank * module.out_channels + (module.out_channels if module.bias is not None else 0))


class RegionalSVDPlan(LayerPlan):
    """One rank K: k×k reduce with SVD's K filters on the whole map, a 1×1 per region."""

    family = "hsc"

    def __init__(self, info: LayerInfo, tiling: Tiling, cells: CellStats, form: str = "",
                 whole: Moment | None = None) -> None:
        m: nn.Conv2d = info.module
        self.tiling = tiling
        self.pixels = region_pixels(tiling, info.out_hw)
        self.kk = m.kernel_size[0] * m.kernel_size[1]
        self.W = info.weight64().reshape(m.out_channels, -1)
        whole = whole if whole is not None else Moment(matrix=cells.S.sum(dim=(0, 1)))  # the whole map's moment
        S = whole.full()
        _, evecs = whole.complete_eig()
        k = min(m.out_channels, self.W.shape[1])
        self.P = evecs[:, :k]
        energies = torch.zeros(k, dtype=torch.float64)
        self._fits: list[tuple[torch.Tensor, torch.Tensor]] = []
        for reg in tiling.regions:
            e, Q, L = regional_least_squares(cells.region(*reg), self.P)
            energies += e.cpu()
            self._fits.append((Q, L))
        n = tiling.n_regions
        super().__init__(info, [RankBlock(energies.numpy(), label="rank")], total_energy=float(S.trace()),
                         form=form or f"{n} region{'s' if n > 1 else ''}, regional 1x1 on SVD")

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        K = ranks[0]
        m: nn.Conv2d = self.info.module
        if metric == "macs":
            return float(K * (m.in_channels * self.kk + m.out_channels) * self.info.positions)
        return float(K * m.in_channels * self.kk + _maps_params(m, self.tiling.n_regions, K))

    def expansion(self, region: int, K: int) -> torch.Tensor:
        """Region ``region``'s 1×1 (C_out × K) at rank K: least squares of y on the K features."""
        Q, L = self._fits[region]
        return _least_squares_map(Q[:, :K], L[:K, :K])

    def build(self, ranks: list[int]) -> nn.Module:
        K = ranks[0]
        m: nn.Conv2d = self.info.module
        new = RegionalExpansionConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, K,
                                      bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        new.reduce.weight.data.copy_((self.P[:, :K].T @ self.W).reshape(new.reduce.weight.shape))
        for r, e in enumerate(new.expands):
            e.weight.data.copy_(self.expansion(r, K)[:, :, None, None])
            if m.bias is not None:
                e.bias.data.copy_(m.bias.detach())
        return new

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        return {"tiling": self.tiling.to_dict(), "regions": len(self.pixels), "pixels": self.pixels}


class RegionalTucker2Plan(LayerPlan):
    """Two ranks (R_out, R_in): Tucker-2's 1×1 + k×k core on the whole map, a 1×1 per region.

    Built from the layer's one-region plans, whose work it shares: ``regional`` (the regional
    least-squares fits on the whole map's output basis) and ``tucker2`` (data-aware Tucker-2 on the
    same output moment, so the same basis; its input whitening). Same MACs as Tucker-2 at the same
    ranks, one C_out × R_out map per region more in parameters.
    """

    family = "hsc"

    def __init__(self, info: LayerInfo, regional: RegionalSVDPlan, tucker2: Tucker2Plan, form: str = "") -> None:
        if tucker2.groups != 1 or tucker2.family != "tucker2":
            raise ValueError("regional Tucker-2 needs a data-aware, ungrouped Tucker-2 plan")
        self.regional, self.tucker2, self.bases = regional, tucker2, tucker2.bases[0]
        self.tiling = regional.tiling
        out = regional.blocks[0]
        blocks = [RankBlock(out.energies, label="out"), RankBlock(tucker2.blocks[1].energies, label="in")]
        n = self.tiling.n_regions
        super().__init__(info, blocks, total_energy=1.0,
                         form=form or f"{n} region{'s' if n > 1 else ''}, regional 1x1 on Tucker-2")

    def retained(self, ranks: list[int]) -> float:
        """The two modes' kept fractions multiply, as for Tucker-2 (see :meth:`Tucker2Plan.retained`)."""
        return self.total_energy * kept_fractions_product(self.blocks, ranks)

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        """Tucker-2's at the same ranks (the regions' 1×1s cover disjoint pixels), plus, in
        parameters, the extra regions' 1×1s (C_out × R_out and a bias each)."""
        cost = self.tucker2.factorised_cost(ranks, metric)
        if metric == "macs":
            return cost
        return cost + _maps_params(self.info.module, self.tiling.n_regions - 1, ranks[0])

    def build(self, ranks: list[int]) -> nn.Module:
        r_out, r_in = ranks
        m: nn.Conv2d = self.info.module
        _, core, V_in = self.bases.factors(r_out, r_in)
        folded = self.tucker2.input_folded(r_in)  # the first 1×1 is invertible: folded, as Tucker-2 does
        new = RegionalExpansionConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, r_out,
                                      base="svd" if folded else "tucker2", rank_in=None if folded else r_in,
                                      bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        if folded:  # k×k (C_in → R_out): the regional SVD's reduction, the same map
            new.reduce.weight.data.copy_(fold_input_factor(core, V_in.T))
        else:
            new.first.weight.data.copy_(V_in.T[:, :, None, None])
            new.reduce.weight.data.copy_(core)
        for r, e in enumerate(new.expands):
            e.weight.data.copy_(self.regional.expansion(r, r_out)[:, :, None, None])
            if m.bias is not None:
                e.bias.data.copy_(m.bias.detach())
        return new

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        return self.regional.describe(ranks[:1])


class RegionalExpansionPlan(LayerPlan):
    """The regional expansion of a one-region plan: its own factors at its own ranks on the whole
    map, and the final 1×1 refitted per region by least squares.

    ``base`` is an :class:`~hsc_plugin.compressors.global_svd.SVDPlan` or a
    :class:`~hsc_plugin.compressors.tucker2.Tucker2Plan`, data-aware or data-free: the baselines'
    allocations spend the budget exactly as the baseline does (same blocks, same MACs), and this
    plan then swaps each layer's shared output map for one per region. With the base's output basis
    U (its final 1×1), region r's map is ``S_r U (Uᵀ S_r U)⁻¹`` — exact for an SVD's features
    ``z = Uᵀ y``, and for Tucker-2's as far as its input projection is (the refit that follows
    corrects the rest on the data). One C_out × R map per extra region in parameters, same MACs.
    """

    def __init__(self, info: LayerInfo, base: LayerPlan, tiling: Tiling, cells: CellStats | Any) -> None:
        if tiling.n_regions < 2:
            raise ValueError("a regional expansion needs at least two regions")
        self.base, self.tiling = base, tiling
        # One copy per layer and tiling, shared by the layer's four baselines (C_out² float64 a region).
        self._moments = info.derived(("region moments", tiling.grid, tiling.regions),
                                     lambda: [cells.region(*reg) for reg in tiling.regions])
        blocks = [RankBlock(b.energies, label=b.label) for b in base.blocks]
        n = tiling.n_regions
        super().__init__(info, blocks, total_energy=base.total_energy,
                         form=f"{n} regions, regional 1x1 on {base.form or base.family}")
        self.family = f"{base.family}-regional"

    def retained(self, ranks: list[int]) -> float:
        return self.base.retained(ranks)

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        """The base's, plus, in parameters, the extra regions' 1×1s (C_out × R and a bias each; R is
        the base's first rank: an SVD's rank, Tucker-2's output rank)."""
        cost = self.base.factorised_cost(ranks, metric)
        if metric == "macs":
            return cost
        return cost + _maps_params(self.info.module, self.tiling.n_regions - 1, int(ranks[0]))

    def build(self, ranks: list[int]) -> nn.Module:
        m: nn.Conv2d = self.info.module
        one = self.base.build(ranks)
        if isinstance(one, Tucker2Conv2d):
            first, reduce, last = one.first, one.core, one.last
        elif isinstance(one, LowRankConv2d):
            first, reduce, last = None, one.reduce, one.expand
        else:
            raise TypeError(f"regional expansion of a {type(one).__name__}: needs an SVD or a Tucker-2 layer")
        K = int(last.in_channels)
        new = RegionalExpansionConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, K,
                                      base="svd" if first is None else "tucker2",
                                      rank_in=None if first is None else int(first.out_channels),
                                      bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        if first is not None:
            new.first.weight.data.copy_(first.weight.data)
        new.reduce.weight.data.copy_(reduce.weight.data)
        U = last.weight.detach().double().reshape(m.out_channels, K)
        for S_r, e in zip(self._moments, new.expands):
            _, Q, L = regional_least_squares(S_r, U)
            e.weight.data.copy_(_least_squares_map(Q, L)[:, :, None, None])
            if m.bias is not None:
                e.bias.data.copy_(m.bias.detach())
        return new

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        return {"tiling": self.tiling.to_dict(), "regions": self.tiling.n_regions,
                **self.base.describe(ranks)}


class RegionalClustersPlan(LayerPlan):
    """The one-region input-cluster form's reduction on the whole map (each cluster's k×k conv, one
    grouped conv when balanced), and the final 1×1 (K = Σ k_c → C_out) fitted per region.

    ``base``: the layer's one-region HSC plan (input side, ``svd`` blocks, untied ranks);
    ``contributions``: the same clusters' contributions gathered on each region of ``tiling``
    (summed, they are the base's statistics). One rank per cluster, as the base; region r's columns
    for cluster c are ``S_rc P_c (P_cᵀ S_rc P_c)⁻¹`` on the base's basis P_c, whose nested energies
    (:func:`regional_least_squares`) are the rank components. Same MACs as the base, one C_out × K
    map per extra region in parameters.
    """

    family = "hsc"

    def __init__(self, info: LayerInfo, base: HSCPlan, tiling: Tiling, contributions: ClusterContributions) -> None:
        if base.tiling.n_regions != 1 or base.side != "input" or base.structure != "svd" or base.tied:
            raise ValueError("a regional expansion of input clusters needs the one-region, input-side, "
                             "untied svd-block HSC plan")
        if tiling.n_regions < 2 or contributions.tiling.regions != tiling.regions:
            raise ValueError("a regional expansion needs at least two regions, with the contributions gathered on them")
        self.base, self.tiling = base, tiling
        self.clusters = base.clusters[0]
        factors = base.factors[0]
        self.bases = [f.factors([len(f.rank_blocks[0].energies)])[1] for f in factors]  # P_c, C_out × r_max
        self._fits: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        energies = [torch.zeros(P.shape[1], dtype=torch.float64) for P in self.bases]
        for r in range(tiling.n_regions):
            fits = []
            for c, P in enumerate(self.bases):
                e, Q, L = regional_least_squares(contributions.output_moment(r, c).to(P), P)
                energies[c] += e.cpu()
                fits.append((Q, L))
            self._fits.append(fits)
        blocks = [RankBlock(e.numpy(), label=f"c{c}", min_rank=0) for c, e in enumerate(energies)]
        n, g = tiling.n_regions, len(self.clusters)
        super().__init__(info, blocks, total_energy=base.total_energy,
                         form=f"{n} regions, regional 1x1 on {g} input clusters")

    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        """The base's (the regions' 1×1s cover disjoint pixels), plus, in parameters, the extra
        regions' 1×1s (C_out × K and a bias each)."""
        cost = self.base.factorised_cost(ranks, metric)
        if metric == "macs" or sum(ranks) == 0:
            return cost
        return cost + _maps_params(self.info.module, self.tiling.n_regions - 1, sum(ranks))

    def build(self, ranks: list[int]) -> nn.Module:
        m: nn.Conv2d = self.info.module
        kept = [c for c, k in enumerate(ranks) if k > 0]
        if not kept:  # no features: the base's constant (the layer's bias)
            return self.base.build(ranks)
        K = sum(ranks[c] for c in kept)
        new = RegionalExpansionConv2d(m.in_channels, m.out_channels, conv_geometry(m), self.tiling, K,
                                      base="clusters", clusters=[self.clusters[c] for c in kept],
                                      ranks=[ranks[c] for c in kept], bias=m.bias is not None,
                                      device=m.weight.device, dtype=m.weight.dtype)
        for dst, c in zip(new.first.cores(), kept):
            dst.copy_(self.base.factors[0][c].factors([ranks[c]])[0])
        for fits, e in zip(self._fits, new.expands):
            maps = [_least_squares_map(fits[c][0][:, :ranks[c]], fits[c][1][:ranks[c], :ranks[c]]) for c in kept]
            e.weight.data.copy_(torch.cat(maps, 1)[:, :, None, None])
            if m.bias is not None:
                e.bias.data.copy_(m.bias.detach())
        return new

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        return {"tiling": self.tiling.to_dict(), "regions": self.tiling.n_regions,
                "cluster_sizes": [len(c) for c in self.clusters], "ranks": list(ranks)}
