"""Built-in rank selectors: ``energy``, ``fixed``, ``budget`` and ``vbmf``.

They see only :class:`~hsc_plugin.plan.RankProblem` (blocks of ranked components with costs),
so each works with every compressor.
"""

from __future__ import annotations

import math

import numpy as np

from hsc_plugin.decomposition import evbmf_rank
from hsc_plugin.greedy import greedy
from hsc_plugin.plan import RankProblem
from hsc_plugin.registry import hookimpl
from hsc_plugin.strategy import RankSelector

__all__ = ["EnergySelector", "FixedSelector", "BudgetSelector", "ScaledSelector", "VBMFSelector", "greedy_fill"]


def _fraction(name: str, value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


class EnergySelector(RankSelector):
    """Per block, the smallest rank keeping a fraction ``energy`` (τ) of the block's energy.

    τ = 1 keeps full rank (exact). Energies are singular values squared (data-free) or
    eigenvalues of the output second moment (data-aware), so τ is the share of the weight's or
    the output's energy kept.
    """

    name = "energy"

    def __init__(self, energy: float = 0.95) -> None:
        self.energy = _fraction("energy (τ)", energy)

    def select(self, problem: RankProblem) -> list[list[int]]:
        out = []
        for plan in problem.plans:
            ranks = []
            for b in plan.blocks:
                if self.energy >= 1.0 or b.total <= 0:
                    ranks.append(b.max_rank if self.energy >= 1.0 else b.min_rank)
                    continue
                cum = np.cumsum(b.energies)
                k = int(np.searchsorted(cum, self.energy * b.total * (1 - 1e-12)) + 1)
                ranks.append(b.round(k))
            out.append(ranks)
        return out


class FixedSelector(RankSelector):
    """Per block, ``ceil(rank_ratio × full rank)``: the same relative rank everywhere."""

    name = "fixed"

    def __init__(self, rank_ratio: float = 0.5) -> None:
        self.rank_ratio = _fraction("rank_ratio", rank_ratio)

    def select(self, problem: RankProblem) -> list[list[int]]:
        return [[b.round(math.ceil(self.rank_ratio * b.max_rank)) for b in p.blocks] for p in problem.plans]


class VBMFSelector(RankSelector):
    """Per block, the rank found by empirical variational Bayesian matrix factorisation.

    Data-free and parameter-free (Kim et al. 2016 use it for Tucker-2); needs the block's matrix.
    """

    name = "vbmf"

    def select(self, problem: RankProblem) -> list[list[int]]:
        out = []
        for plan in problem.plans:
            ranks = []
            for b in plan.blocks:
                if b.matrix is None:
                    raise ValueError(
                        f"Rank selector 'vbmf' needs each block's matrix, which layer {plan.name!r} "
                        "does not provide (use it with data-free Global SVD or Tucker-2)"
                    )
                ranks.append(b.round(max(1, evbmf_rank(b.the_matrix()))))
            out.append(ranks)
        return out


class BudgetSelector(RankSelector):
    """Global greedy water-filling across every block of every layer to meet a budget.

    Starting from the minimum ranks, repeatedly take the step (one more component of one block,
    or a jump to the dense layer where factorising no longer saves) with the largest normalised
    error reduction per unit of cost, while the total stays within the budget. Error reductions
    are normalised by the layer's total energy, so layers of different scale compete fairly.
    Coupled blocks (Tucker-2's two modes) are re-scored lazily after each move.
    """

    name = "budget"
    needs_budget = True

    def select(self, problem: RankProblem) -> list[list[int]]:
        if problem.target is None:
            raise ValueError(f"Rank selector {self.name!r} needs a budget (e.g. budget=Budget(3.0))")
        return greedy_fill(problem, [p.min_ranks() for p in problem.plans])


class ScaledSelector(BudgetSelector):
    """One energy threshold τ for every block, found by bisection to meet the budget, then a
    greedy fill of what is left.

    "Ranks scaled to the budget", the usual way Tucker-2 baselines are run: every layer keeps the
    same share of its spectrum. It is also the safer choice when blocks are coupled (Tucker-2's
    two modes), where a pure greedy from rank 1 can starve a layer.
    """

    name = "scaled"

    def select(self, problem: RankProblem) -> list[list[int]]:
        if problem.target is None:
            raise ValueError(f"Rank selector {self.name!r} needs a budget (e.g. budget=Budget(3.0))")
        lo, hi = 0.0, 1.0
        best = [p.min_ranks() for p in problem.plans]
        for _ in range(40):
            tau = 0.5 * (lo + hi)
            ranks = [p.finalise(r, problem.metric) for p, r in
                     zip(problem.plans, EnergySelector(max(tau, 1e-9)).select(problem))]
            if problem.cost(ranks) <= problem.target:
                lo, best = tau, ranks
            else:
                hi = tau
        return greedy_fill(problem, best)


def greedy_fill(problem: RankProblem, ranks: list[list[int]]) -> list[list[int]]:
    """Greedy water-filling from ``ranks`` until no step fits in ``problem.target``."""
    if problem.target is None:
        raise ValueError("greedy_fill needs a budget target")
    metric, target = problem.metric, problem.target
    ranks = [list(r) for r in ranks]
    costs = [p.cost(r, metric) for p, r in zip(problem.plans, ranks)]
    total = float(sum(costs))

    def propose(key: tuple[int, int]) -> float | None:  # one more step of block j of layer i
        i, j = key
        plan = problem.plans[i]
        new = plan.next_ranks(ranks[i], j, metric)
        if new is None:
            return None
        dc = plan.cost(new, metric) - costs[i]
        return plan.gain(ranks[i], new) / dc if dc > 0 else math.inf

    def accept(key: tuple[int, int]) -> bool:
        nonlocal total
        i, j = key
        plan = problem.plans[i]
        new = plan.next_ranks(ranks[i], j, metric)
        if new is None:
            return False
        new_cost = plan.cost(new, metric)
        if total - costs[i] + new_cost > target:
            return False
        total += new_cost - costs[i]
        ranks[i], costs[i] = new, new_cost
        return True

    keys = [(i, j) for i, p in enumerate(problem.plans) for j in range(len(p.blocks))]
    greedy(keys, propose, accept, linked=lambda k: [(k[0], j) for j in range(len(problem.plans[k[0]].blocks))])
    # Coarse layers can leave a gap below the target: one step that overshoots by less than the
    # gap lands closer to the requested ratio.
    best: tuple[float, int, list[int]] | None = None
    if problem.upper_bound:  # e.g. milliseconds: the target is a ceiling
        return ranks
    for i, plan in enumerate(problem.plans):
        for j in range(len(plan.blocks)):
            new = plan.next_ranks(ranks[i], j, metric)
            if new is not None:
                over = total - costs[i] + plan.cost(new, metric) - problem.target
                if 0 < over < problem.target - total and (best is None or over < best[0]):
                    best = (over, i, new)
    if best is not None:
        ranks[best[1]] = best[2]
    return ranks


@hookimpl
def hsc_rank_selectors() -> list[type]:
    return [EnergySelector, FixedSelector, BudgetSelector, ScaledSelector, VBMFSelector]
