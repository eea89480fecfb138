"""Choosing, per layer, among alternative factorised forms by what they cost on the device.

A compressor may offer several forms of one layer — HSC offers the partitioner's regions, one
region with the same kind of channel clusters, and plain data-aware SVD. Counted in MACs the
region form never loses (each region gets its own basis at the same cost per pixel), but in
measured time it can lose badly: more, smaller kernels. So under a latency budget each form's
trade-off between error and time is traced by the greedy steps the budget selector takes, the
forms of a layer are merged into one lower convex envelope, and the layers' envelopes are
water-filled to the budget: every layer gets the form on which the allocation lands. The rank
selector then runs as usual on the chosen forms.

Errors are the plans' own normalised proxies (discarded / total energy of their spectra), so the
forms of a layer are compared on the same scale the selector uses across layers.
"""

from __future__ import annotations

import math

from hsc_plugin.greedy import greedy
from hsc_plugin.plan import LayerPlan

__all__ = ["frontier", "choose_forms"]


def frontier(plan: LayerPlan, metric: str, points: int = 32) -> list[tuple[float, float]]:
    """(cost, normalised error) along a greedy path of ``plan`` from its minimum ranks to dense.

    Each move adds about ``1/points`` of a block's full rank to the block with the most error
    removed per unit of cost (or jumps to the dense layer where that is cheaper), as the budget
    selector does one unit at a time; scores are re-evaluated lazily (:func:`hsc_plugin.greedy.greedy`),
    so a layer of many blocks costs about ``points × blocks`` evaluations instead of
    ``(rank units) × blocks``.
    """
    ranks = plan.min_ranks()
    cost = plan.cost(ranks, metric)
    path = [(cost, plan.discarded(ranks))]
    units = [max(b.step, math.ceil(b.max_rank / max(1, points))) for b in plan.blocks]

    def propose(j: int) -> float | None:
        if plan.is_dense(ranks):
            return None
        new = plan.next_ranks(ranks, j, metric, units[j])
        if new is None:
            return None
        dc = plan.cost(new, metric) - cost
        return plan.gain(ranks, new) / dc if dc > 0 else math.inf

    def accept(j: int) -> bool:
        nonlocal ranks, cost
        ranks = plan.next_ranks(ranks, j, metric, units[j]) or ranks
        cost = plan.cost(ranks, metric)
        path.append((cost, plan.discarded(ranks)))
        return True

    greedy(range(len(plan.blocks)), propose, accept, lazy=True, by_key=True)
    return path


def _lower_hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower-left convex envelope of (cost, error, form) points: error falls as cost rises,
    with ever smaller returns."""
    pts = sorted(points, key=lambda p: (p[0], p[1]))
    pareto: list[tuple[float, float, int]] = []
    for p in pts:
        if not pareto or p[1] < pareto[-1][1]:
            pareto.append(p)
    hull: list[tuple[float, float, int]] = []
    for p in pareto:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the chord from hull[-2] to p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def choose_forms(alternatives: list[list[LayerPlan]], metric: str, target: float | None,
                 objective: str = "sum") -> list[int]:
    """For each layer, the index of the form to use so that the layers together fit ``target``.

    ``objective="sum"``: each layer starts at the cheapest point of its envelope; the moves with
    the most error removed per unit of cost are taken while the total fits (the least total
    error). ``"max"``: the least error ε every layer can stay under — each layer takes the form
    that reaches ε most cheaply (the same relative error everywhere, as "ranks scaled to the
    budget" gives a single form). Layers with one form get index 0; without a target the first
    (preferred) form is kept everywhere.
    """
    if target is None or all(len(a) == 1 for a in alternatives):
        return [0] * len(alternatives)
    hulls = []
    for forms in alternatives:
        pts = [(c, e, f) for f, plan in enumerate(forms) for c, e in frontier(plan, metric)]
        hulls.append(_lower_hull(pts))
    if objective == "max":
        return _uniform(hulls, target)
    at = [0] * len(hulls)
    total = sum(h[0][0] for h in hulls)

    def propose(i: int) -> float | None:  # the next step along layer i's envelope
        h, k = hulls[i], at[i]
        if k + 1 >= len(h):
            return None
        dc, de = h[k + 1][0] - h[k][0], h[k][1] - h[k + 1][1]
        return de / dc if dc > 0 else math.inf

    def accept(i: int) -> bool:
        nonlocal total
        h, k = hulls[i], at[i]
        step = h[k + 1][0] - h[k][0]
        if total + step > target:
            return False  # the rest of this layer's envelope costs more per step: it stays here
        total += step
        at[i] = k + 1
        return True

    greedy(range(len(hulls)), propose, accept, by_key=True)
    return [h[k][2] for h, k in zip(hulls, at)]


def _uniform(hulls: list[list[tuple[float, float, int]]], target: float) -> list[int]:
    """Forms for the smallest error bound ε that fits: per layer the cheapest point with error ≤ ε."""
    def pick(eps: float) -> tuple[float, list[int]]:
        chosen = [min((p for p in h if p[1] <= eps), key=lambda p: p[0], default=h[-1]) for h in hulls]
        return sum(p[0] for p in chosen), [p[2] for p in chosen]

    lo, hi = 0.0, 1.0
    best = pick(hi)[1]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        cost, forms = pick(mid)
        if cost <= target:
            hi, best = mid, forms
        else:
            lo = mid
    return best
