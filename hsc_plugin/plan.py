"""What a rank selector sees: layers as blocks of ranked components with costs.

A compressor turns each target layer into a :class:`LayerPlan`: one or more :class:`RankBlock`
(a block is a set of components ordered by importance — singular values, eigenvalues of an
output second moment — whose ``energies`` are the error each component removes) and a cost
function of the blocks' ranks. Rank selectors only ever see this, so one selector serves every
compressor: Global SVD has one block per layer, Tucker-2 two coupled blocks (input and output
mode), HSC one block per (region, cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from hsc_plugin.calibration import LayerInfo

__all__ = ["RankBlock", "LayerPlan", "RankProblem", "PlanContext"]


@dataclass(frozen=True)
class PlanContext:
    """What one ``compress()`` call decided, handed to a compressor's ``statistics`` and ``plan``.

    A compressor object holds only its options; everything that depends on the call (the budget's
    metric, rank rounding, whether a layer may stay dense) travels here, so one compressor can run
    several compressions, even at once.
    """

    metric: str = "macs"  # the budget's metric ("macs" without a budget)
    has_budget: bool = False  # forms compete only for a budget
    rank_multiple: int = 1
    dense_fallback: bool = True

    @property
    def counted(self) -> str:
        """The metric a plan can count without timing (latency budgets start from MACs)."""
        return "macs" if self.metric == "latency" else self.metric


_CONTEXT: ContextVar[PlanContext] = ContextVar("hsc_plan_context", default=PlanContext())


@contextmanager
def planning(context: PlanContext):
    """Plans created inside (by any compressor, built-in or not) take ``context`` by default."""
    token = _CONTEXT.set(context)
    try:
        yield context
    finally:
        _CONTEXT.reset(token)


@dataclass
class RankBlock:
    """Ordered components of one block; ``energies[i]`` is the error removed by component i."""

    energies: np.ndarray
    label: str = ""
    min_rank: int = 1
    step: int = 1
    # The matrix whose spectrum this is (for VBMF), or a function that makes it: a mode-1
    # unfolding is a copy of the weight, made only if a selector asks for it.
    matrix: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def the_matrix(self) -> torch.Tensor | None:
        """``matrix``, made now if it was given as a function."""
        return self.matrix() if callable(self.matrix) else self.matrix

    def __post_init__(self) -> None:
        self.energies = np.clip(np.asarray(self.energies, dtype=np.float64).reshape(-1), 0.0, None)
        self.min_rank = min(self.min_rank, self.max_rank)

    @property
    def max_rank(self) -> int:
        return int(self.energies.shape[0])

    @property
    def total(self) -> float:
        return float(self.energies.sum())

    def round(self, rank: int) -> int:
        """Clamp to [min_rank, max_rank] and round up to a multiple of ``step`` (or to full)."""
        rank = max(self.min_rank, min(int(rank), self.max_rank))
        if self.step > 1 and rank % self.step:
            rank = min(self.max_rank, rank + self.step - rank % self.step)
        return rank


class LayerPlan(ABC):
    """How one layer can be factorised: its blocks, its cost at any ranks, and the builder.

    A configuration whose every block is at full rank means "keep the layer dense" (exact, and
    never more expensive than the factorised form at full rank).
    """

    def __init__(self, info: LayerInfo, blocks: list[RankBlock], dense_cost: dict[str, float] | None = None,
                 total_energy: float | None = None, *, context: PlanContext | None = None, note: str = "",
                 form: str = "") -> None:
        ctx = context if context is not None else _CONTEXT.get()
        self.info = info
        self.name = info.name
        self.blocks = blocks
        # What the dense layer costs: counted by the pipeline when it traced the layer.
        self.dense_cost = dict(dense_cost) if dense_cost else info.dense_cost()
        self.total_energy = total_energy if total_energy is not None else sum(b.total for b in blocks)
        self.dense_fallback = ctx.dense_fallback
        for b in blocks:  # ranks rounded to the call's multiple; droppable blocks (rank 0) stay droppable
            b.step = max(b.step, ctx.rank_multiple)
            if b.min_rank > 0:
                b.min_rank = min(max(b.min_rank, ctx.rank_multiple), b.max_rank)
        # Costs measured rather than counted (e.g. "latency" from a LatencyCostModel): metric →
        # function of the ranks, attached by the pipeline's timing stage.
        self.measured_costs: dict[str, Callable[[list[int]], float]] = {}
        self.note = note  # shown in the report (e.g. "Tucker-2 reduces to an SVD here")
        self.form = form  # which of a layer's alternative forms this is (see hsc_plugin.form_choice)

    family: str = ""  # the kind of factorisation ("svd", "tucker2", "hsc" …), for allocations restricted to one

    # -- costs -------------------------------------------------------------------------------
    @abstractmethod
    def factorised_cost(self, ranks: list[int], metric: str) -> float:
        """Cost (MACs per sample or params) of the factorised layer at these ranks."""

    @abstractmethod
    def build(self, ranks: list[int]) -> nn.Module:
        """The factorised module at these ranks (with the layer's dtype and device)."""

    def metric_cost(self, ranks: list[int], metric: str) -> float:
        """Cost of the factorised layer in any metric, measured ones included."""
        fn = self.measured_costs.get(metric)
        return fn(ranks) if fn is not None else self.factorised_cost(ranks, metric)

    def is_dense(self, ranks: list[int]) -> bool:
        return self.dense_fallback and all(r >= b.max_rank for r, b in zip(ranks, self.blocks))

    def cost(self, ranks: list[int], metric: str) -> float:
        if self.is_dense(ranks):
            return self.dense_cost[metric]
        return self.metric_cost(ranks, metric)

    # -- rank moves ----------------------------------------------------------------------------
    def min_ranks(self) -> list[int]:
        return [b.round(b.min_rank) for b in self.blocks]

    def full_ranks(self) -> list[int]:
        return [b.max_rank for b in self.blocks]

    def next_ranks(self, ranks: list[int], index: int, metric: str, units: int | None = None) -> list[int] | None:
        """Ranks after one more step of block ``index`` (``units`` components; default its step);
        jumps to dense where that is cheaper."""
        block = self.blocks[index]
        if ranks[index] >= block.max_rank:
            return None
        new = list(ranks)
        new[index] = block.round(ranks[index] + (block.step if units is None else units))
        if self.dense_fallback and not self.is_dense(new):
            if self.metric_cost(new, metric) >= self.dense_cost[metric]:
                return self.full_ranks()
        return new

    def finalise(self, ranks: list[int], metric: str) -> list[int]:
        """Round ranks and keep the layer dense when the factorised form would not be cheaper."""
        ranks = [b.round(r) for r, b in zip(ranks, self.blocks)]
        if self.dense_fallback and self.metric_cost(ranks, metric) >= self.dense_cost[metric]:
            return self.full_ranks()
        return ranks

    def retained(self, ranks: list[int]) -> float:
        return float(sum(b.energies[:r].sum() for r, b in zip(ranks, self.blocks)))

    def gain(self, old: list[int], new: list[int]) -> float:
        """Normalised error removed by moving from ``old`` to ``new`` ranks."""
        if self.total_energy <= 0:
            return 0.0
        return (self.retained(new) - self.retained(old)) / self.total_energy

    def discarded(self, ranks: list[int]) -> float:
        """Share of the energy these ranks discard (0 for the dense layer)."""
        if self.is_dense(ranks) or self.total_energy <= 0:
            return 0.0
        return max(0.0, 1.0 - self.retained(ranks) / self.total_energy)

    def predicted_error(self, ranks: list[int]) -> float:
        """Relative error the spectra predict: sqrt(discarded / total energy)."""
        return self.discarded(ranks) ** 0.5

    def describe(self, ranks: list[int]) -> dict[str, Any]:
        """Extra per-layer report fields (tiling, clusters …); JSON-safe."""
        return {"note": self.note} if self.note else {}


@dataclass
class RankProblem:
    """All plans of a compression run and the budget they must share."""

    plans: list[LayerPlan]
    metric: str = "macs"
    target: float | None = None  # allowed total cost of the plans' layers; None = no budget
    options: dict[str, Any] = field(default_factory=dict)  # free-form extras for third-party selectors
    upper_bound: bool = False  # the target is a ceiling (milliseconds): never step over it

    def cost(self, ranks: list[list[int]]) -> float:
        return sum(p.cost(r, self.metric) for p, r in zip(self.plans, ranks))
