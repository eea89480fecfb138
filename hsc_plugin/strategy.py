"""The strategy interfaces: what a plugin implements to become a rank selector, a spatial
partitioner or a channel clusterer. Built-ins live in ``hsc_plugin.strategies``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from hsc_plugin.decomposition import Moment
from hsc_plugin.plan import RankBlock, RankProblem
from hsc_plugin.tiling import cell_edges

__all__ = ["RankSelector", "SpatialPartitioner", "ChannelClusterer", "BlockFactoriser", "Block", "BlockFactors",
           "Strategy", "coactivation", "balance_clusters", "MIN_REGION"]

MIN_REGION = 16
"""Default smallest region side, in output pixels, for the built-in partitioners and HSC.

A region runs as its own crop (with the kernel's halo re-read), its own kernels and a concatenation,
and its factors are fitted on its positions alone: both costs grow as regions shrink, and neither
is in the MACs. Against 4-pixel regions in the same runs: on the MRI AlexNet (maps of 32, 16 and
8 pixels) HSC's models at 3× and 6× fewer MACs ran 1.2–1.75× faster, with lower test error at 3×
and 3 % more at 6×; at the paper's scale (512 px, maps of 127, 63 and 31 pixels, 6×) 2–26 %
faster for 1.4 % more held-out error (``benchmarks/results/min_region_mri.md``, ``paper_scale_selection.md``).
``min_region=4`` brings the small regions back.
Read when a partitioner or HSC is created without ``min_region`` (:func:`min_region`).
"""


def min_region(value: int | None) -> int:
    """``value``, or :data:`MIN_REGION` when it is ``None``: the smallest region side, validated."""
    try:
        out = MIN_REGION if value is None else int(value)
    except (TypeError, ValueError):
        out = 0
    if isinstance(value, bool) or out < 1 or (isinstance(value, float) and value != out):
        raise ValueError(f"min_region must be a positive whole number of pixels, got {value!r}")
    return out


class Strategy(ABC):
    """Base of every pluggable strategy: a registry ``name`` and keyword-only options."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this strategy takes (keyword parameters of ``__init__``), so a compressor can
        forward its own options of the same names (see :func:`hsc_plugin.registry.create`)."""
        import inspect

        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and klass is not object:
                for p in list(inspect.signature(klass.__init__).parameters.values())[1:]:
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                        names.append(p.name)
        return names

    def config(self) -> dict[str, Any]:
        """JSON-safe description, for reports."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class RankSelector(Strategy):
    """Chooses the rank of every block of every layer (``select`` returns ranks per plan)."""

    kind = "rank_selector"
    needs_budget: ClassVar[bool] = False

    @abstractmethod
    def select(self, problem: RankProblem) -> list[list[int]]: ...


class SpatialPartitioner(Strategy):
    """Tiles a layer's output map into rectangles from per-cell statistics."""

    kind = "partitioner"
    # Whether ``partition`` reads the cells' output second moments (``cell_stats.S``). A fixed
    # tiling reads only the grid and the map size, which spares the C_out² statistics per cell.
    uses_moments: ClassVar[bool] = True

    @abstractmethod
    def partition(self, cell_stats: Any) -> Any: ...

    def statistics_grid(self, fine: tuple[int, int]) -> tuple[int, int]:
        """The cell grid this partitioner needs statistics on. Adaptive partitioners need the
        compressor's ``fine`` grid; a fixed tiling needs only its own cells, which keeps the
        calibration statistics (cells × C² per layer) small on large models."""
        return fine


class ChannelClusterer(Strategy):
    """Groups channels from a co-activation (|correlation|) matrix; returns a label per channel."""

    kind = "clusterer"

    @abstractmethod
    def cluster(self, coactivation: np.ndarray) -> np.ndarray: ...


@dataclass
class Block:
    """One (region, cluster) sub-problem of an HSC layer: approximate ``y_b = W_b * x_b`` over the
    region's pixels, where ``W_b`` is the layer's weight restricted to the block's output channels
    (output-side clusters) or input channels (input-side clusters)."""

    weight: torch.Tensor  # (|out_b|, |in_b|, kh, kw), float64
    output: Moment  # second moment of y_b over the region (|out_b| square, or a thin factor)
    inputs: torch.Tensor | None = None  # per-pixel second moment of x_b over the region (|in_b| square)
    label: str = ""


class BlockFactors(ABC):
    """A factorised block: its rank components (what a rank selector sees), the output energy any
    ranks keep, and the factors at those ranks in one of the two structures the HSC layer runs.

    ``structure = "svd"``: ``factors(ranks) = (reduce, expand)``, a k×k conv with ``k`` filters
    (k, |in|, kh, kw) then a 1×1 back to the block's outputs (|out|, k). ``structure = "tucker2"``:
    ``(first, core, expand)``: 1×1 (r_in, |in|) → k×k core (r_out, r_in, kh, kw) → 1×1 (|out|, r_out).
    The first rank of a block may be 0 (the block is dropped: its outputs are the bias).
    """

    structure: ClassVar[str] = "svd"

    def __init__(self, rank_blocks: list[RankBlock], total: float) -> None:
        self.rank_blocks = rank_blocks
        self.total = float(total)

    def retained(self, ranks: list[int]) -> float:
        """Output energy kept at these ranks (default: the kept components' energies add up)."""
        return float(sum(b.energies[:r].sum() for r, b in zip(ranks, self.rank_blocks)))

    @abstractmethod
    def factors(self, ranks: list[int]) -> tuple[torch.Tensor, ...]: ...


class BlockFactoriser(Strategy):
    """Factorises one (region, cluster) block of an HSC layer (HSC's level 3).

    ``needs_inputs``: whether :meth:`factorise` reads the block's input channel moment (then HSC
    gathers per-region input statistics). With one region and one cluster, the built-in ``svd``
    gives data-aware SVD and ``tucker2`` data-aware Tucker-2.
    """

    kind = "block_factoriser"
    needs_inputs: ClassVar[bool] = False

    @abstractmethod
    def factorise(self, block: Block) -> BlockFactors: ...


def coactivation(S: torch.Tensor) -> np.ndarray:
    """|corr| of channels from an uncentred second moment: |S_ij| / sqrt(S_ii S_jj)."""
    d = S.diagonal().clamp_min(1e-30).sqrt()
    return (S.abs() / d[:, None] / d[None, :]).clamp(0, 1).cpu().numpy()


def balance_clusters(clusters: list[list[int]], A: np.ndarray) -> list[list[int]]:
    """Equal-size clusters (sizes differ by at most one) that keep most of a clustering.

    Channels are ordered cluster by cluster, each cluster's channels by their mean co-activation
    with it (most typical first), and the order is cut into equal consecutive chunks. Equal sizes
    and a tied rank let the input side run as one grouped conv (ALDS's k-SVD form).
    """
    order: list[int] = []
    for cl in sorted(clusters, key=len, reverse=True):
        typical = A[np.ix_(cl, cl)].mean(axis=1)
        order += [cl[i] for i in np.argsort(-typical, kind="stable")]
    n, total = len(clusters), len(order)
    edges = cell_edges(total, n)
    return [sorted(order[edges[i]:edges[i + 1]]) for i in range(n)]
