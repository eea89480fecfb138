"""HSC: hierarchical spatio-channel low-rank compression (the compressor).

Level 1 splits each layer's output map into regions (a partitioner plugin on per-cell output
second moments); level 2 clusters channels per region by co-activation (a clusterer plugin);
level 3 keeps, per (region, cluster) block, the top eigenvectors of the block's output second
moment — the reduced-rank-regression optimum, whose discarded eigenvalues are the calibration
error — with ranks chosen by the shared rank selectors (``budget`` water-fills across layers,
regions and clusters).

``channel_side="output"`` clusters output channels (each cluster gets its own basis of filters);
``channel_side="input"`` clusters input channels and gives each its own low-rank path summed at
the output (a block-term decomposition), whose rank units cost |c|·k² + C_out MACs per pixel
instead of C_in·k² + C_out.

The statistics live in :mod:`~hsc_plugin.compressors.hsc_statistics`, the plan (costs, building
the layer) in :mod:`~hsc_plugin.compressors.hsc_plan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hsc_plugin.allocation import CandidateAllocation
from hsc_plugin.calibration import Accumulator, InputChannelMoment, LayerInfo, OutputMoment
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.compressors.global_svd import SVDPlan
from hsc_plugin.compressors.hsc_plan import HSCPlan
from hsc_plugin.compressors.hsc_statistics import (FINE_CELLS, CellStats, ClusterContributions, ProjectedCellStats,
                                                   pointwise)
from hsc_plugin.compressors.regional_plan import (RegionalClustersPlan, RegionalExpansionPlan, RegionalSVDPlan,
                                                  RegionalTucker2Plan)
from hsc_plugin.compressors.tucker2 import Tucker2Plan
from hsc_plugin.decomposition import Moment
from hsc_plugin.plan import LayerPlan, PlanContext
from hsc_plugin.registry import available, create, lookup
from hsc_plugin import strategy
from hsc_plugin.strategy import (Block, BlockFactoriser, ChannelClusterer, SpatialPartitioner, balance_clusters,
                                 coactivation)
from hsc_plugin.tiling import Tiling

__all__ = ["HSC", "HSCPlan", "CellStats", "coactivation", "balance_clusters"]


class HSC(Compressor):
    """Hierarchical spatio-channel compression (regions → channel clusters → per-block ranks).

    Options (besides the shared ones of :class:`Compressor`): ``partition`` (name or
    :class:`SpatialPartitioner`; ``grid`` sets the grid partitioner's ``(rows, cols)``),
    ``clusterer`` (name or :class:`ChannelClusterer`) with ``n_clusters`` (``None`` = automatic),
    ``channel_side`` (``"input"`` or ``"output"``), ``cells`` (the statistics grid; default: what
    the partitioner needs — its own cells for ``grid``/``none``, 2^max_depth a side (4×4) for
    ``quadtree``, the 8×8 fine grid for other adaptive ones; statistics memory is cells × C²
    float64 per layer, layers in groups under ``max_stats_gb``) and
    ``min_region`` (minimum region side in output pixels, default
    :data:`~hsc_plugin.strategy.MIN_REGION` = 16: smaller maps get fewer regions) and
    ``alternatives``: with a budget (MACs, parameters or latency), offer each conv in every form
    — the partitioner's regions with each block factoriser, with and without clusters, one region
    with clusters, data-aware SVD and Tucker-2 and their regional expansions — and water-fill the
    forms' error-vs-cost paths in the budget's metric (:mod:`hsc_plugin.form_choice`), so a layer
    is split only where that pays at the budget; ``False`` takes the partitioner's form everywhere.
    ``baselines`` / ``data_free_baselines`` / ``regional_baselines``: the baselines' own
    allocations, rebuilt from HSC's statistics, compete with HSC's (the model with the lowest
    calibration output error is kept) — data-free too, and under MAC and parameter budgets each
    also with its convs' final 1×1 fitted per region (:class:`RegionalExpansionPlan`).
    Grouped convs and Linear layers are compressed as one region, one cluster (data-aware SVD).
    Strategy options are forwarded by name: a partitioner that takes ``min_region`` (or ``grid``)
    gets it, a clusterer that takes ``n_clusters`` / ``seed`` gets them — built-in or not.
    """

    name = "hsc"

    def __init__(
        self,
        *,
        partition: str | SpatialPartitioner = "grid",
        grid: tuple[int, int] | int | None = None,
        clusterer: str | ChannelClusterer = "agglomerative",
        n_clusters: int | None = 4,
        channel_side: str = "input",
        balanced: bool = False,
        cells: tuple[int, int] | int | None = None,
        min_region: int | None = None,
        block: str | BlockFactoriser = "svd",
        alternatives: bool = True,
        baselines: tuple[str, ...] = ("global_svd", "tucker2"),
        data_free_baselines: bool = True,
        regional_baselines: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.alternatives = bool(alternatives)
        if balanced and channel_side != "input":
            raise ValueError("balanced=True applies to channel_side='input' (equal input clusters run as one grouped conv)")
        self.balanced = bool(balanced)
        if channel_side not in ("input", "output"):
            raise ValueError(f"channel_side must be 'input' or 'output', got {channel_side!r}")
        self.partition, self.grid, self.clusterer, self.n_clusters = partition, grid, clusterer, n_clusters
        self.channel_side = channel_side
        self.cells = None if cells is None else (cells, cells) if isinstance(cells, int) else tuple(cells)
        self.min_region = strategy.min_region(min_region)
        self.data_aware = True
        # ``grid`` set by the user must be taken (an error for a partitioner without one);
        # ``min_region``, ``n_clusters`` and ``seed`` go to whichever strategy declares them.
        self._partitioner = create("partitioner", partition, SpatialPartitioner,
                                   offered={"min_region": self.min_region},
                                   **({"grid": grid} if grid is not None else {}))
        self._clusterer = create("clusterer", clusterer, ChannelClusterer,
                                 offered={"n_clusters": n_clusters, "seed": self.seed})
        self.block = block
        self.baselines = tuple(baselines)
        self.data_free_baselines = bool(data_free_baselines)
        self.regional_baselines = bool(regional_baselines)
        for b in self.baselines:
            lookup("compressor", b)  # an unknown name is an error now, not after calibration
        self._block = create("block_factoriser", block, BlockFactoriser, offered={"seed": self.seed})
        if self.balanced and self._block.needs_inputs:
            raise ValueError("balanced=True runs input clusters as one grouped conv of svd blocks; use block='svd'")

    def needs_calibration(self) -> bool:
        return True

    def options(self) -> dict[str, Any]:
        out = super().options()
        out["partition"] = self._partitioner.config()
        out["clusterer"] = self._clusterer.config()
        out["block"] = self._block.config()
        return out

    def own_families(self) -> tuple[str, ...] | None:
        return ("hsc", "svd", "tucker2")  # data-free plans measure weight error, not output error

    def candidate_allocations(self, context: PlanContext) -> list[CandidateAllocation]:
        """HSC's forms at one error bound for every layer, and the baselines' own allocations rebuilt
        from HSC's statistics (their plans are among HSC's forms; data-free ones too): the model whose
        calibration output error is lowest is kept, so HSC is never worse than data-aware SVD or
        Tucker-2 (or their data-free versions) on the calibration data."""
        if not self.alternatives:
            return []
        out = [CandidateAllocation("hsc (uniform error)", self.own_families() or (), "scaled", "max", compete=True)]
        for name in self.baselines:
            cls = lookup("compressor", name)
            if not cls.form_family:
                continue
            kinds = [("data-aware", tuple(cls.form_family))]
            if self.data_free_baselines:
                kinds.append(("data-free", tuple(f"{f}-datafree" for f in cls.form_family)))
            for kind, fams in kinds:
                out.append(CandidateAllocation(f"{name} ({kind})", fams, cls.budget_selector))
            if self._regional_baselines(context):  # the same spending, each conv's final 1×1 per region
                for kind, fams in kinds:
                    out.append(CandidateAllocation(f"{name} ({kind}, regional 1x1s)",
                                                   tuple(f"{f}-regional" for f in fams) + fams, cls.budget_selector))
        return out

    def _regional_baselines(self, context: PlanContext | None) -> bool:
        """Whether the baselines' allocations are also tried with a 1×1 per region: under MAC and
        parameter budgets. (Under a latency budget every form is timed, and these are the baselines'
        own reductions with slower, cropped outputs: four more forms per conv to time for forms that
        the latency budget would not choose.)"""
        return self.regional_baselines and context is not None and context.has_budget and context.metric != "latency"

    @staticmethod
    def _spatial(info: LayerInfo) -> bool:
        return isinstance(info.module, nn.Conv2d) and info.module.groups == 1

    def _competes(self, info: LayerInfo, context: PlanContext | None) -> bool:
        """Whether the layer's forms compete for the budget (HSC's level 4): with a budget, unless
        ``alternatives=False``."""
        return self.alternatives and context is not None and context.has_budget

    @staticmethod
    def _tucker(info: LayerInfo) -> bool:
        """Whether Tucker-2 is a form of its own here (a k×k conv; 1×1 convs and Linear are SVDs)."""
        return isinstance(info.module, nn.Conv2d) and info.module.kernel_size != (1, 1)

    def _factorisers(self, competes: bool, info: LayerInfo) -> list[BlockFactoriser]:
        """The chosen block factoriser, and — when forms compete — every built-in one as well, except
        Tucker-2 on a 1×1 conv: there it is an SVD with an extra 1×1 (the Tucker-2 compressor uses
        the SVD there too), and each of its blocks would hold a C_out² basis (resnet50's 2048-channel
        1×1s: 0.5 GB per layer)."""
        if not competes:
            return [self._block]
        out = [self._block]
        for name in ("svd", "tucker2"):
            if name == "tucker2" and not self._tucker(info):
                continue
            if name != self._block.name and name in available("block_factoriser"):
                out.append(create("block_factoriser", name, BlockFactoriser))
        return out

    def _grid(self, info: LayerInfo) -> tuple[int, int]:
        h, w = info.out_hw
        cells = self.cells if self.cells is not None else self._partitioner.statistics_grid(FINE_CELLS)
        return (max(1, min(cells[0], h)), max(1, min(cells[1], w)))

    def _needs(self, info: LayerInfo, context: PlanContext | None) -> tuple[bool, bool]:
        """(output cell moments, input cell moments) this layer's forms need."""
        competes = self._competes(info, context)
        out_moments = self.channel_side == "output" or self._partitioner.uses_moments or competes
        inputs = self.channel_side == "input" or competes or self._block.needs_inputs
        return out_moments, inputs

    def _projected(self, info: LayerInfo, context: PlanContext | None) -> bool:
        """Whether the layer's output cell moments are projected from its input cell moments (a
        :func:`pointwise` conv whose forms need both)."""
        out_moments, inputs = self._needs(info, context)
        return out_moments and inputs and pointwise(info.module)

    def statistics_bytes(self, info: LayerInfo, context: PlanContext | None = None) -> int:
        m = info.module
        if not self._spatial(info):
            inputs = self._tucker(info) and self._competes(info, context)
            return 8 * (int(m.weight.shape[0]) ** 2 + 1 + (m.in_channels ** 2 + 1 if inputs else 0))
        grid = self._grid(info)
        out_moments, inputs = self._needs(info, context)
        # projected output moments are derived after the pass, one layer at a time, while planning
        return ((0 if self._projected(info, context) else CellStats.nbytes(m.out_channels, grid, out_moments))
                + (CellStats.nbytes(m.in_channels, grid) if inputs else 0))

    def statistics(self, info: LayerInfo, context: PlanContext | None = None) -> list[Accumulator]:
        m = info.module
        dev = m.weight.device
        if not self._spatial(info):  # grouped convs and Linear: one region, one cluster
            accs: list[Accumulator] = [OutputMoment(m.weight.shape[0], dev)]
            if self._tucker(info) and self._competes(info, context):
                accs.append(InputChannelMoment(m.in_channels, dev))
            return accs
        grid = self._grid(info)
        out_moments, inputs = self._needs(info, context)
        # Output cell moments serve the partitioner, output clusters and every one-cluster form;
        # input cell moments the input clusters and Tucker-2 blocks. The input clusters' own output
        # statistics come in the second pass, once the clusters are known.
        if inputs:
            ins = CellStats(m.in_channels, grid, info.out_hw, "input", dev)
            if self._projected(info, context):  # W S_in Wᵀ per cell: no C_out² Gram per pixel
                return [ProjectedCellStats(m, ins), ins]
        outs = CellStats(m.out_channels, grid, info.out_hw, "output", dev, moments=out_moments)
        return [outs, ins] if inputs else [outs]

    def _cluster(self, S: torch.Tensor) -> list[list[int]]:
        A = coactivation(S)
        labels = self._clusterer.cluster(A)
        clusters = [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]
        if self.balanced and len(clusters) > 1:
            clusters = balance_clusters(clusters, A)
        return clusters

    def second_statistics(self, info: LayerInfo, stats: list[Accumulator],
                          context: PlanContext | None = None) -> list[Accumulator]:
        if not self._spatial(info) or self.channel_side != "input":
            return []
        tiling = self._partitioner.partition(stats[0])
        inputs: CellStats = stats[1]  # type: ignore[assignment]
        clusters = [self._cluster(inputs.region(*reg)) for reg in tiling.regions]
        out = [ClusterContributions(info.module, tiling, clusters, inputs)]
        if self._competes(info, context) and tiling.n_regions > 1:
            # The whole map's clusters, gathered per region: summed, the one-region form's statistics;
            # per region, its regional 1×1s' (RegionalClustersPlan).
            whole = self._cluster(inputs.S.sum(dim=(0, 1)))
            out.append(ClusterContributions(info.module, tiling, [whole] * tiling.n_regions, inputs))
        return out

    def plan(self, info: LayerInfo, stats: list[Accumulator],
             context: PlanContext | None = None) -> LayerPlan | list[LayerPlan] | str:
        if not self._spatial(info):
            S = Moment(matrix=stats[0].S)  # one eigen-decomposition for both forms
            svd = SVDPlan(info, S, note="grouped conv / Linear: one region, one cluster (data-aware SVD)")
            if not self._competes(info, context):
                return svd
            forms: list[LayerPlan] = [svd]
            if len(stats) > 1:
                forms.append(Tucker2Plan(info, S, stats[1].S, form="data-aware Tucker-2 (per group)"))
            return forms + self._data_free(info)
        outs: CellStats = stats[0]  # type: ignore[assignment]
        ins = next((a for a in stats[1:] if isinstance(a, CellStats)), None)
        contributions = [a for a in stats if isinstance(a, ClusterContributions)]
        competes = self._competes(info, context)
        tiling = contributions[0].tiling if contributions else self._partitioner.partition(outs)
        forms: list[LayerPlan] = []
        whole_clusters = contributions[1].merged() if len(contributions) > 1 else None
        for fac in self._factorisers(competes, info):
            primary = self._clustered(info, tiling, fac, outs, ins, contributions[:1])
            if not competes:
                return primary
            forms.append(primary)
            if tiling.n_regions > 1:
                if self.channel_side == "input" and whole_clusters is not None:  # one region, same kind of clusters
                    one = self._blocks(info, whole_clusters.tiling, fac, outs, ins, whole_clusters, "input")
                    forms.append(one)
                    if one.structure == "svd" and not one.tied and len(one.clusters[0]) > 1:
                        # their reduction on the whole map, a 1×1 per region
                        forms.append(RegionalClustersPlan(info, one, tiling, contributions[1]))
                elif self.channel_side == "output":
                    forms.append(self._clustered(info, Tiling.full(tiling.grid), fac, outs, ins, []))
                if any(len(cl) > 1 for cl in primary.clusters):  # regions, no clusters
                    forms.append(self._blocks(info, tiling, fac, outs, ins, None, "output"))
        whole = Moment(matrix=outs.S.sum(dim=(0, 1)))  # one eigen-decomposition for every whole-map form
        regional = RegionalSVDPlan(info, tiling, outs, whole=whole) if tiling.n_regions > 1 else None
        if regional is not None:  # SVD's reduction on the whole map, a 1×1 per region
            forms.append(regional)
        svd = SVDPlan(info, whole, form="1 region, 1 cluster (data-aware SVD)")
        forms.append(svd)
        baselines: list[LayerPlan] = [svd]
        if self._tucker(info) and ins is not None:
            tucker2 = Tucker2Plan(info, whole, ins.S.sum(dim=(0, 1)), form="1 region, data-aware Tucker-2")
            forms.append(tucker2)
            baselines.append(tucker2)
            if regional is not None:  # Tucker-2's 1×1 + core on the whole map, a 1×1 per region
                forms.append(RegionalTucker2Plan(info, regional, tucker2))
        free = self._data_free(info)
        regionals: list[LayerPlan] = []
        if regional is not None and self._regional_baselines(context):  # the baselines' spending, a 1×1 per region
            regionals = [RegionalExpansionPlan(info, p, tiling, outs) for p in baselines + free]
        return forms + free + regionals

    def _data_free(self, info: LayerInfo) -> list[LayerPlan]:
        """The data-free baselines' plans (weight SVD, weight Tucker-2), for their allocations only."""
        if not self.data_free_baselines:
            return []
        out: list[LayerPlan] = [SVDPlan(info, None, form="1 region, data-free SVD")]
        if self._tucker(info):
            out.append(Tucker2Plan(info, None, None, form="1 region, data-free Tucker-2"))
        return out

    def _clustered(self, info: LayerInfo, tiling: Tiling, fac: BlockFactoriser, outs: CellStats,
                   ins: CellStats | None, contributions: list[ClusterContributions]) -> HSCPlan:
        """The partitioner's regions with this side's channel clusters, blocks by ``fac``."""
        if self.channel_side == "input":
            return self._blocks(info, tiling, fac, outs, ins, contributions[0], "input")
        return self._blocks(info, tiling, fac, outs, ins, None, "output", clustered=True)

    def _blocks(self, info: LayerInfo, tiling: Tiling, fac: BlockFactoriser, outs: CellStats, ins: CellStats | None,
                contributions: ClusterContributions | None, side: str, clustered: bool = False) -> HSCPlan:
        """An HSC plan: per region, its clusters' blocks factorised by ``fac``."""
        W = info.weight64()
        clusters, factors = [], []
        moments = contributions.moments() if contributions is not None else None
        for r, reg in enumerate(tiling.regions):
            S_in = ins.region(*reg) if ins is not None else None
            if contributions is not None:  # input clusters
                cl = contributions.clusters[r]
                blocks = [Block(_columns(info, W, idx), moments[r][c], S_in[idx][:, idx] if S_in is not None else None,
                                f"r{r}c{c}") for c, idx in enumerate(cl)]
            else:  # output clusters (one cluster: the whole region)
                S = outs.region(*reg)
                cl = self._cluster(S) if clustered else [list(range(S.shape[0]))]
                blocks = [Block(W[idx], Moment(matrix=S[idx][:, idx]), S_in, f"r{r}c{c}") for c, idx in enumerate(cl)]
            clusters.append(cl)
            factors.append([fac.factorise(b) for b in blocks])
        tied = self.balanced and side == "input" and factors[0][0].structure == "svd"
        return HSCPlan(info, tiling, side, clusters, factors, tied=tied)


def _columns(info: LayerInfo, W: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``W[:, idx]``, one copy per layer and cluster (the block factorisers and forms share it)."""
    return info.derived(("columns", tuple(idx)), lambda: W[:, idx])
