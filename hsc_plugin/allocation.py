"""Spending the budget: which form each layer takes and at which ranks, and building the modules.

The layers' forms compete for the budget (:func:`hsc_plugin.form_choice.choose_forms`), the rank
selector then shares it among the chosen forms' blocks, and the factorised modules are built. With
``latency_guard`` every built module is timed against its dense layer and the slower ones are kept
dense, after which the budget is re-allocated to the others (a few rounds at most).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from hsc_plugin.budget import Budget, BudgetError
from hsc_plugin.calibration import LayerInfo
from hsc_plugin.cost.macs import ModelCost, count_params
from hsc_plugin.form_choice import choose_forms
from hsc_plugin.plan import LayerPlan, PlanContext, RankProblem
from hsc_plugin.cost.plan_timing import measured_slower

if TYPE_CHECKING:
    from hsc_plugin.compressors.base import Compressor
    from hsc_plugin.pipeline import Prepared

__all__ = ["Allocation", "CandidateAllocation", "allocate", "restrict", "keep_families", "statistics_groups", "budget_reference"]

_ROUNDS = 4  # re-allocations after the latency guard keeps layers dense


@dataclass(frozen=True)
class CandidateAllocation:
    """Another way to spend the budget, tried beside a compressor's own (the model with the lowest
    calibration output error is kept): the plan families it may use, in order of preference
    (empty: every form), the rank selector, the form choice's objective ("sum" or "max") and whether
    the families' forms compete or each layer takes its first (a baseline's own plan)."""

    name: str
    families: tuple[str, ...] = ()
    selector: str = "budget"
    objective: str = "sum"
    compete: bool = False  # True: every form of the families competes; False: each layer's first one


@dataclass
class Allocation:
    """What the budget bought: one plan per layer, its ranks, and the modules built from them."""

    plans: list[LayerPlan]
    ranks: list[list[int]]
    modules: dict[str, nn.Module]
    base_ref: float  # the cost the budget divides (model or targets, in the budget's metric)
    floored: set[str] = field(default_factory=set)  # layers at minimum rank with a large predicted error
    slower: dict[str, str] = field(default_factory=dict)  # kept dense by the latency guard, and why
    measured_ms: float | None = None  # closed latency loop: the whole model's time, measured
    rounds: list[dict[str, Any]] = field(default_factory=list)  # closed latency loop: each round's numbers

    def predicted(self, metric: str) -> float:
        """The whole model's (or the targets') cost as the plans predict it, in ``metric``."""
        return self.base_ref - sum(p.dense_cost[metric] - p.cost(r, metric) for p, r in zip(self.plans, self.ranks))

    def error(self) -> float:
        """The selectors' objective: the plans' normalised discarded energy, summed (lower: more accurate)."""
        return float(sum(p.discarded(r) for p, r in zip(self.plans, self.ranks)))


def statistics_groups(compressor: "Compressor", live: list[str], infos: dict[str, LayerInfo],
                      context: PlanContext) -> list[list[str]]:
    """Layers in groups whose calibration statistics fit in ``max_stats_gb``: one calibration
    pass per group, statistics freed once the group is planned. A single layer larger than
    the limit gets a group of its own. Second-pass statistics (HSC's per-cluster moments)
    come on top and are of the same order."""
    from hsc_plugin.compressors.base import call_hook

    limit = compressor.max_stats_gb * 2**30 if compressor.max_stats_gb is not None else math.inf
    groups: list[list[str]] = []
    used = 0.0
    for n in live:
        size = call_hook(compressor.statistics_bytes, infos[n], context=context)
        if not groups or used + size > limit:
            groups.append([])
            used = 0.0
        groups[-1].append(n)
        used += size
    return groups


def module_cost(cost: ModelCost, module: nn.Module, name: str, metric: str) -> float:
    """A module's MACs (as counted in ``cost``) or parameters."""
    return float(cost.module_macs.get(name, 0)) if metric == "macs" else float(count_params(module))


def budget_reference(prep: "Prepared", latency: dict[str, Any] | None) -> float:
    """The cost the budget divides: the model's or the targets', in the budget's metric."""
    budget, metric = prep.budget, prep.context.metric
    if budget is None:
        return 0.0
    if metric == "latency":
        assert latency is not None
        return latency["predicted_before_ms"] if budget.scope == "model" else latency["targets_before_ms"]
    if budget.scope == "model":
        return float(prep.before.of(metric))
    modules = dict(prep.work.named_modules())
    return float(sum(module_cost(prep.before, modules[n], n, metric) for n in prep.target_names))


def keep_families(candidates: list[list[LayerPlan]], families: tuple[str, ...] | None) -> list[list[LayerPlan]]:
    """Every layer's forms of these families (None: all forms); a layer with none keeps its first."""
    if families is None:
        return candidates
    return [[p for p in forms if p.family in families] or forms[:1] for forms in candidates]


def restrict(candidates: list[list[LayerPlan]], families: tuple[str, ...]) -> list[list[LayerPlan]] | None:
    """Each layer's first form of the first family it has (in ``families``' order); None when a
    layer has none (the allocation cannot be reproduced from these candidates)."""
    if not families:  # every form
        return candidates
    out = []
    for forms in candidates:
        pick = next((p for f in families for p in forms if p.family == f), None)
        if pick is None:
            return None
        out.append([pick])
    return out


def allocate(compressor: "Compressor", prep: "Prepared", candidates: list[list[LayerPlan]],
             latency: dict[str, Any] | None, selector: Any = None, objective: str = "sum",
             goal: float | None = None, built: dict[tuple[Any, ...], nn.Module] | None = None,
             ceiling: bool = False, fastest: bool = False) -> Allocation:
    """Choose forms and ranks for the budget and build the modules (see the module docstring);
    ``selector`` overrides the call's rank selector, ``objective`` is the form choice's
    (:func:`hsc_plugin.form_choice.choose_forms`). ``goal`` replaces the budget's cost (the whole
    model's, in the budget's metric: the closed latency loop re-aims it); modules already in
    ``built`` (by layer, form and ranks) are reused and new ones are added to it."""
    selector = selector if selector is not None else prep.selector
    plans = [forms[0] for forms in candidates]
    if not plans:
        raise ValueError("No targeted layer can be factorised so as to save cost; see the layer list "
                         f"{ {n: r.reason for n, r in prep.reports.items()} }")
    budget, metric = prep.budget, prep.context.metric
    base_ref = budget_reference(prep, latency)
    slower: dict[str, str] = {}
    for _ in range(_ROUNDS):
        live = [forms for forms in candidates if forms[0].name not in slower]
        if not live:
            raise BudgetError("Every factorised layer measured slower than its dense layer on this device")
        plans, target = [forms[0] for forms in live], None
        if budget is not None:
            plans, target = _fit_forms(live, budget, metric, base_ref, len(slower), objective, goal, fastest)
        problem = RankProblem(plans, metric, target,
                              upper_bound=budget is not None and (ceiling or budget.ms is not None))
        ranks = [p.finalise(r, metric) for p, r in zip(plans, selector.select(problem))]
        modules = {p.name: _build(p, r, built) for p, r in zip(plans, ranks) if not p.is_dense(r)}
        newly = measured_slower(compressor.latency_batch, modules, prep.infos) if compressor.latency_guard else {}
        if not newly:
            break
        slower.update(newly)
    for n, reason in slower.items():
        from hsc_plugin.report import layer_report

        prep.reports[n] = layer_report(n, prep.infos[n].module, "dense", reason, prep.infos[n].macs)
    floored = _floored(compressor.name, budget, plans, ranks, warn=not fastest)  # the fastest: a probe, maybe refused
    return Allocation(plans, ranks, modules, base_ref, floored, slower)


def _build(plan: LayerPlan, ranks: list[int], built: dict[tuple[Any, ...], nn.Module] | None) -> nn.Module:
    """The plan's module at these ranks, from ``built`` when an earlier round made it."""
    if built is None:
        return plan.build(ranks)
    key = (plan.name, id(plan), tuple(ranks))
    if key not in built:
        built[key] = plan.build(ranks)
    return built[key]


def _fit_forms(live: list[list[LayerPlan]], budget: Budget, metric: str, base_ref: float,
               n_slower: int, objective: str = "sum", goal: float | None = None,
               fastest: bool = False) -> tuple[list[LayerPlan], float]:
    """Each layer's form for the budget (or ``goal``) and what the chosen plans may cost together;
    a budget out of reach even at minimum ranks is a BudgetError that says why (``fastest``: the
    minimum ranks' cost instead)."""
    plan_dense = sum(forms[0].dense_cost[metric] for forms in live)
    fixed = base_ref - plan_dense
    target = (budget.target_cost(base_ref) if goal is None else goal) - fixed
    plans = [forms[i] for forms, i in zip(live, choose_forms(live, metric, target, objective))]
    floor = sum(p.cost(p.min_ranks(), metric) for p in plans)
    if target < floor and fastest:
        return plans, floor * (1 + 1e-9)  # the sum's rounding must not push minimum ranks over
    if target < floor:
        best = base_ref / (fixed + floor)
        raise BudgetError(
            f"Cannot reach {budget.describe()} ({budget.scope}): "
            f"{plan_dense / base_ref:.0%} of the {metric} are in "
            + ("layers whose factorised form is faster on this device" if metric == "latency"
               else "factorisable layers")
            + (f" (after keeping {n_slower} slower layers dense)" if n_slower else "")
            + f", so the most this method can reach at minimum rank is {best:.2f}x"
        )
    return plans, target


def _floored(name: str, budget: Budget | None, plans: list[LayerPlan], ranks: list[list[int]],
             warn: bool = True) -> set[str]:
    """Layers a budget took to their floor where their spectra say that loses most of the output
    (relative error > 0.5): the budget is met at the cost of the model's accuracy, so say so."""
    floored = {p.name for p, r in zip(plans, ranks) if budget is not None and not p.is_dense(r)
               and r == p.min_ranks() and p.predicted_error(r) > 0.5}
    if floored and warn:
        warn_floored(name, budget, floored)  # type: ignore[arg-type]
    return floored


def warn_floored(name: str, budget: Budget, floored: set[str], stacklevel: int = 7) -> None:
    """Say that the budget is met only with these layers at their minimum rank."""
    warnings.warn(f"{name}: {budget.describe()} is met only with {len(floored)} layer(s) at their minimum "
                  f"rank ({', '.join(sorted(floored))}); expect a large accuracy loss (see the report)",
                  stacklevel=stacklevel)
