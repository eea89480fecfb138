"""``uniform_macs``: every layer keeps the same fraction of its dense cost.

The built-in ``budget`` selector spends the budget where it removes the most error per MAC, so
some layers end up almost dense and others at rank 1. ``uniform_macs`` is the simple baseline it
is usually compared with: every factorised layer gets the same share ``f`` of its own dense
cost (MACs, or parameters when the budget counts parameters), and ``f`` is found by bisection so
that the whole model meets the budget.

It only uses what every rank selector sees — :class:`hsc_plugin.RankProblem`, whose plans say what
any ranks cost — so it works with every compressor (``global_svd``, ``tucker2``, ``hsc`` and
third-party ones).
"""

from __future__ import annotations

import math

from hsc_plugin import LayerPlan, RankProblem, RankSelector

__all__ = ["UniformMACsSelector"]

_ITERATIONS = 40  # bisection steps: 2**-40 is far below one rank step of any real layer


class UniformMACsSelector(RankSelector):
    """The same fraction of its dense cost for every layer.

    * With a budget (``compress(..., budget=Budget(3.0), rank="uniform_macs")``): the fraction is
      the largest one whose total cost fits the budget; the few MACs that rounding to whole ranks
      leaves are then given, one rank step at a time, to the layer furthest below its share.
    * Without a budget: pass the selector as an object with a fixed fraction,
      ``compress(..., rank=UniformMACsSelector(fraction=0.3))`` — every layer keeps about 30% of
      its cost.

    Within a layer with several blocks (Tucker-2's input and output ranks, HSC's blocks) every
    block keeps the same fraction of its full rank.
    """

    name = "uniform_macs"

    def __init__(self, fraction: float | None = None) -> None:
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.fraction = None if fraction is None else float(fraction)

    @property
    def needs_budget(self) -> bool:  # type: ignore[override]
        """A budget is required unless a fixed ``fraction`` was given (then none is taken)."""
        return self.fraction is None

    def select(self, problem: RankProblem) -> list[list[int]]:
        metric = problem.metric
        if problem.target is None:
            if self.fraction is None:
                raise ValueError(
                    f"Rank selector {self.name!r} needs a budget (e.g. budget=Budget(3.0)) or a fixed "
                    "fraction (rank=UniformMACsSelector(fraction=0.3))"
                )
            return [_ranks_for_share(p, self.fraction, metric) for p in problem.plans]

        lo, hi = 0.0, 1.0
        best = [p.min_ranks() for p in problem.plans]
        for _ in range(_ITERATIONS):
            f = 0.5 * (lo + hi)
            ranks = [_ranks_for_share(p, f, metric) for p in problem.plans]
            if problem.cost(ranks) <= problem.target:
                lo, best = f, ranks
            else:
                hi = f
        return _top_up(problem, best)


def _dense(plan: LayerPlan, metric: str) -> float:
    return max(float(plan.dense_cost[metric]), 1e-12)


def _ranks_at(plan: LayerPlan, rho: float) -> list[int]:
    """Every block at the same fraction ``rho`` of its full rank (rounded down, then to the block's step)."""
    return [b.round(max(b.min_rank, math.floor(rho * b.max_rank + 1e-9))) for b in plan.blocks]


def _ranks_for_share(plan: LayerPlan, share: float, metric: str) -> list[int]:
    """The largest equal relative ranks whose cost is at most ``share`` × the dense cost."""
    if share >= 1.0:
        return plan.full_ranks()
    allowed = share * _dense(plan, metric)
    best = plan.min_ranks()
    lo, hi = 0.0, 1.0
    for _ in range(_ITERATIONS):
        rho = 0.5 * (lo + hi)
        ranks = _ranks_at(plan, rho)
        if plan.cost(ranks, metric) <= allowed:
            lo, best = rho, ranks
        else:
            hi = rho
    return best


def _top_up(problem: RankProblem, ranks: list[list[int]]) -> list[list[int]]:
    """Spend what rounding left: one rank step at a time to the layer with the smallest share."""
    assert problem.target is not None
    metric = problem.metric
    plans = problem.plans
    ranks = [list(r) for r in ranks]
    costs = [p.cost(r, metric) for p, r in zip(plans, ranks)]
    total = float(sum(costs))
    while True:
        best: tuple[float, int, list[int], float] | None = None
        for i, plan in enumerate(plans):
            share = costs[i] / _dense(plan, metric)
            if best is not None and share >= best[0]:
                continue
            # within the layer, grow the block that is relatively smallest first
            order = sorted(range(len(plan.blocks)), key=lambda j: ranks[i][j] / max(plan.blocks[j].max_rank, 1))
            for j in order:
                new = plan.next_ranks(ranks[i], j, metric)
                if new is None:
                    continue
                cost = plan.cost(new, metric)
                if total - costs[i] + cost <= problem.target:
                    best = (share, i, new, cost)
                    break
        if best is None:
            return ranks
        _, i, new, cost = best
        total += cost - costs[i]
        ranks[i], costs[i] = new, cost
