"""The compressor interface and the one compression pipeline every compressor runs through.

A compressor says two things per layer: which calibration statistics it needs
(:meth:`Compressor.statistics`) and how the layer can be factorised (:meth:`Compressor.plan`, a
:class:`~hsc_plugin.plan.LayerPlan`). Everything else — target selection, shape tracing, the
calibration pass, rank selection against the budget, building, measuring what executes,
checking the budget and the report — is shared, so all compressors behave the same way.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from hsc_plugin.budget import Budget, BudgetError
from hsc_plugin.calibration import (
    Accumulator,
    CalibrationError,
    LayerInfo,
    first_batch,
    measure_errors,
    progress_enabled,
    run_calibration,
    trace_layers,
)
from hsc_plugin.cost_model import LatencyCostModel
from hsc_plugin.costs import count_params, measure_costs
from hsc_plugin.forms import choose_forms
from hsc_plugin.plan import LayerPlan, RankProblem
from hsc_plugin.registry import create
from hsc_plugin.plan_timing import measured_slower, points, time_plans
from hsc_plugin.report import CompressionResult, LayerReport, Report, layer_report
from hsc_plugin.strategy import RankSelector
from hsc_plugin.targets import SUPPORTED_TYPES, TargetSpec, resolve_targets

__all__ = ["Compressor", "set_submodule"]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _example_from_model(model: nn.Module) -> torch.Tensor | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        p = next(model.parameters())
        return torch.randn(1, *cfg["input_size"], dtype=p.dtype, device=p.device)
    return None


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError("The model has no parameters: nothing to compress")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"The model's parameters are on several devices {sorted(map(str, devices))}; "
                         "move it to one device first")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"Parameter {name!r} contains NaN or Inf; cannot factorise it")


class Compressor(ABC):
    """Base class of every compressor (``hsc``, ``global_svd``, ``tucker2`` and third-party ones).

    Options shared by all compressors (subclasses add their own keyword-only options):

    * ``rank``: rank selector name or object (``"budget"`` when a budget is given, else
      ``"energy"``); ``energy`` (τ) and ``rank_ratio`` configure the built-in selectors.
    * ``data_aware``: use calibration statistics so the kept factors minimise the output error.
    * ``dense_fallback``: keep a layer (or block) dense when factorising it would not save cost.
    * ``rank_multiple``: round ranks up to a multiple (e.g. 8, for fast kernels).
    * ``progress``: tqdm bars (default: when stderr is a terminal); ``seed``: for strategies that
      draw random numbers; ``measure_error``: measure each layer's output error on ``calib``.
    * ``latency_guard``: time every factorised layer against its dense layer on this device (at
      ``latency_batch``) and keep dense the ones that are not faster, re-allocating the budget to
      the others — fewer MACs are worth nothing where the kernels do not realise them.
    * ``max_stats_gb``: calibration statistics of layers are gathered in groups that fit in this
      many GiB (one calibration pass per group, freed once planned); ``None``: all at once.
    * ``cost_model``: the :class:`~hsc_plugin.cost_model.LatencyCostModel` used by latency budgets
      (``Budget(2.0, metric="latency")``, ``Budget(ms=4.0)``); default: one timing at
      ``latency_batch`` on the model's device.
    """

    name: ClassVar[str]
    budget_selector: ClassVar[str] = "budget"  # the rank selector used when only a budget is given
    supported_types: ClassVar[tuple[type[nn.Module], ...]] = SUPPORTED_TYPES

    def __init__(
        self,
        *,
        rank: str | RankSelector | None = None,
        energy: float | None = None,
        rank_ratio: float | None = None,
        data_aware: bool = False,
        dense_fallback: bool = True,
        rank_multiple: int = 1,
        progress: bool | None = None,
        seed: int = 0,
        measure_error: bool = True,
        calib_batch_size: int = 64,
        latency_guard: bool = False,
        latency_batch: int = 1,
        cost_model: LatencyCostModel | None = None,
        max_stats_gb: float | None = 4.0,
    ) -> None:
        if rank_multiple < 1:
            raise ValueError(f"rank_multiple must be >= 1, got {rank_multiple}")
        self.rank = rank
        self.energy = energy
        self.rank_ratio = rank_ratio
        self.data_aware = bool(data_aware)
        self.dense_fallback = bool(dense_fallback)
        self.rank_multiple = int(rank_multiple)
        self.progress = progress
        self.seed = int(seed)
        self.measure_error = bool(measure_error)
        self.calib_batch_size = int(calib_batch_size)
        self.latency_guard = bool(latency_guard)
        self.latency_batch = int(latency_batch)
        if cost_model is not None and not isinstance(cost_model, LatencyCostModel):
            raise TypeError(f"cost_model must be a LatencyCostModel, got {type(cost_model).__name__}")
        self.cost_model = cost_model
        if max_stats_gb is not None and not max_stats_gb > 0:
            raise ValueError(f"max_stats_gb must be > 0 (or None for no limit), got {max_stats_gb!r}")
        self.max_stats_gb = max_stats_gb
        # The metric of the budget being compressed to, set by compress(): a compressor may gather
        # the statistics of alternative forms only when they will be timed (a latency budget).
        self._budget_metric = "macs"

    # -- what subclasses implement ---------------------------------------------------------------
    def needs_calibration(self) -> bool:
        """Whether :meth:`statistics` will ask for data (calib is then mandatory)."""
        return self.data_aware

    @abstractmethod
    def statistics(self, info: LayerInfo) -> list[Accumulator]:
        """Accumulators to attach to this layer during the calibration pass (may be empty)."""

    def second_statistics(self, info: LayerInfo, stats: list[Accumulator]) -> list[Accumulator]:
        """Accumulators for a second calibration pass, chosen from the first pass's statistics
        (e.g. per-cluster statistics once clusters are known). Default: none."""
        return []

    def statistics_bytes(self, info: LayerInfo) -> int:
        """Memory :meth:`statistics` will allocate for this layer (first pass), for grouping
        layers under ``max_stats_gb``. Default: create them and count (then drop them)."""
        return sum(t.numel() * t.element_size() for a in self.statistics(info) for t in a.tensors())

    @abstractmethod
    def plan(self, info: LayerInfo, stats: list[Accumulator]) -> LayerPlan | list[LayerPlan] | str:
        """How to factorise the layer, or a string saying why it is left as it is.

        A list offers alternative forms, preferred first (e.g. HSC's regions, one region, SVD):
        under a latency budget the form is chosen per layer by measured time
        (:func:`hsc_plugin.forms.choose_forms`); otherwise the first is used."""

    # -- shared machinery --------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.kind == p.KEYWORD_ONLY and p.name not in names:
                        names.append(p.name)
        return names

    def options(self) -> dict[str, Any]:
        """The options this compressor was created with (JSON-safe, for the report)."""
        out: dict[str, Any] = {}
        for k in self.option_names():
            v = getattr(self, k, None)
            out[k] = v.config() if hasattr(v, "config") else v
        return out

    def rank_selector(self, budget: Budget | None) -> RankSelector:
        spec = self.rank if self.rank is not None else (self.budget_selector if budget is not None else "energy")
        opts = {k: v for k, v in (("energy", self.energy), ("rank_ratio", self.rank_ratio)) if v is not None}
        selector = create("rank_selector", spec, RankSelector, **opts)
        if budget is not None and not selector.needs_budget:
            raise ValueError(
                f"Rank selector {selector.name!r} does not take a budget; drop the budget or use "
                "rank='budget'"
            )
        if budget is None and selector.needs_budget:
            raise ValueError(f"Rank selector {selector.name!r} needs a budget, e.g. budget=Budget(3.0)")
        return selector

    def compress(
        self,
        model: nn.Module,
        calib: Any = None,
        *,
        targets: TargetSpec = None,
        exclude: TargetSpec = None,
        budget: Budget | None = None,
        inplace: bool = False,
        example_input: torch.Tensor | None = None,
    ) -> CompressionResult:
        """Compress ``model``; the input model is untouched unless ``inplace=True``.

        Nothing is written into ``model`` before every step has succeeded, so an error never leaves
        it half-modified.
        """
        t0 = time.perf_counter()
        _check_model(model)
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget must be a hsc_plugin.Budget, got {type(budget).__name__}")
        if self.needs_calibration() and calib is None:
            raise CalibrationError(
                f"Compressor {self.name!r} with these options needs calibration data (calib=...)"
            )
        param = next(model.parameters())
        if calib is not None:
            example = first_batch(calib)[:1]
        elif example_input is not None:
            example = example_input[:1]
        else:
            example = _example_from_model(model)
            if example is None:
                raise CalibrationError(
                    "Cannot infer the input shape: pass calib=... or example_input=torch.randn(1, C, H, W)"
                )
        if not torch.is_floating_point(example):
            raise CalibrationError(f"Inputs must be floating point, got dtype {example.dtype}")
        example = example.to(device=param.device, dtype=param.dtype)
        selector = self.rank_selector(budget)
        metric = budget.metric if budget is not None else "macs"
        self._budget_metric = metric
        counted = "macs" if metric == "latency" else metric  # what a plan can count without timing

        work = copy.deepcopy(model)
        work.eval()
        names, skipped = resolve_targets(work, targets, exclude, self.supported_types)
        if not names:
            raise ValueError("No layer to compress: no Conv2d/Linear layer matches the targets")
        infos = trace_layers(work, names, example)
        before = measure_costs(work, example)
        reports: dict[str, LayerReport] = {}
        modules = dict(work.named_modules())
        for n, reason in skipped.items():
            reports[n] = self._layer_report(n, modules[n], "skipped", reason, before.module_macs.get(n, 0))
        live: list[str] = []
        for n in names:
            if n not in infos:
                reports[n] = self._layer_report(n, modules[n], "skipped", "not executed by the forward pass", 0)
            elif infos[n].calls > 1:
                reports[n] = self._layer_report(n, modules[n], "skipped",
                                                f"called {infos[n].calls} times per forward (shared)",
                                                before.module_macs.get(n, 0))
            else:
                live.append(n)

        candidates: list[list[LayerPlan]] = []  # per layer: its forms, preferred first
        n_samples = 0
        groups = self._statistics_groups(live, infos)
        bar = tqdm(total=len(live), desc=f"{self.name}: decompose", unit="layer", leave=False,
                   disable=not progress_enabled(self.progress))
        for g, group in enumerate(groups):
            tag = f" {g + 1}/{len(groups)}" if len(groups) > 1 else ""
            # accumulators are created only when their group's turn comes
            stats = {n: self.statistics(infos[n]) for n in group}
            if any(stats.values()):
                n_samples = run_calibration(work, stats, calib, progress=self.progress, stop_early=True,
                                            desc=f"{self.name}: calibration{tag}")
                extra = {n: self.second_statistics(infos[n], stats[n]) for n in group}
                if any(extra.values()):
                    run_calibration(work, extra, calib, progress=self.progress, stop_early=True,
                                    desc=f"{self.name}: calibration 2{tag}")
                    stats = {n: stats[n] + extra[n] for n in group}
                    del extra
            for n in group:
                bar.update(1)
                info = infos[n]
                dense = {"macs": float(before.module_macs.get(n, 0)), "params": float(count_params(info.module))}
                result = self.plan(info, stats.pop(n))
                if isinstance(result, str):
                    reports[n] = self._layer_report(n, info.module, "dense", result, int(dense["macs"]))
                    continue
                forms = result if isinstance(result, list) else [result]
                if metric != "latency":
                    forms = forms[:1]  # counted costs never favour another form (see hsc_plugin.forms)
                for plan in forms:
                    plan.dense_cost = dict(dense)
                    plan.dense_fallback = self.dense_fallback
                    for b in plan.blocks:
                        b.step = max(b.step, self.rank_multiple)
                        if b.min_rank > 0:  # a droppable block (HSC's rank 0: bias only) stays droppable
                            b.min_rank = min(max(b.min_rank, self.rank_multiple), b.max_rank)
                saving = [p for p in forms if not self.dense_fallback
                          or p.factorised_cost(p.min_ranks(), counted) < dense[counted]]
                if not saving:
                    cheapest = min(p.factorised_cost(p.min_ranks(), counted) for p in forms)
                    reports[n] = self._layer_report(
                        n, info.module, "dense",
                        f"factorising cannot save {counted}: the smallest rank costs "
                        f"{cheapest:,.0f} >= dense {dense[counted]:,.0f}",
                        int(dense["macs"]))
                    continue
                candidates.append(saving)
            del stats
        bar.close()
        target_names = [n for n in names if n in infos]
        latency: dict[str, Any] | None = None
        cost_model = self._cost_model() if metric == "latency" else None
        if cost_model is not None:
            candidates, latency = self._time_plans(cost_model, candidates, work, infos, target_names, example,
                                                   reports, before)
        plans = [forms[0] for forms in candidates]
        if not plans:
            raise ValueError("No targeted layer can be factorised so as to save cost; see the layer list "
                             f"{ {n: r.reason for n, r in reports.items()} }")

        base_ref = 0.0
        if budget is not None:
            if metric == "latency":
                assert latency is not None
                base_ref = latency["predicted_before_ms"] if budget.scope == "model" else latency["targets_before_ms"]
            elif budget.scope == "model":
                base_ref = float(before.of(metric))
            else:
                base_ref = float(sum(self._module_cost(before, modules[n], n, metric) for n in target_names))
        slower: dict[str, str] = {}
        for _ in range(4):  # re-allocate after layers measured slower are kept dense
            plans = [p for p in plans if p.name not in slower]
            if not plans:
                raise BudgetError("Every factorised layer measured slower than its dense layer on this device")
            target: float | None = None
            if budget is not None:
                plan_dense = sum(p.dense_cost[metric] for p in plans)
                fixed = base_ref - plan_dense
                target = budget.target_cost(base_ref) - fixed
                live_forms = [forms for forms in candidates if forms[0].name not in slower]
                plans = [forms[i] for forms, i in zip(live_forms, choose_forms(live_forms, metric, target))]
                floor = sum(p.cost(p.min_ranks(), metric) for p in plans)
                if target < floor:
                    best = base_ref / (fixed + floor)
                    raise BudgetError(
                        f"Cannot reach {budget.describe()} ({budget.scope}): "
                        f"{plan_dense / base_ref:.0%} of the {metric} are in "
                        + ("layers whose factorised form is faster on this device" if metric == "latency"
                           else "factorisable layers")
                        + (f" (after keeping {len(slower)} slower layers dense)" if slower else "")
                        + f", so the most this method can reach at minimum rank is {best:.2f}x"
                    )
            problem = RankProblem(plans, metric, target, options={"upper_bound": budget is not None and budget.ms is not None})
            all_ranks = selector.select(problem)
            all_ranks = [p.finalise(r, metric) for p, r in zip(plans, all_ranks)]
            new_modules: dict[str, nn.Module] = {}
            for p, r in zip(plans, all_ranks):
                if not p.is_dense(r):
                    new_modules[p.name] = p.build(r)
            newly = self._measured_slower(new_modules, infos) if self.latency_guard else {}
            if not newly:
                break
            slower.update(newly)
        for n, reason in slower.items():
            reports[n] = self._layer_report(n, infos[n].module, "dense", reason, before.module_macs.get(n, 0))
        # A budget met only by taking layers to their floor, where their spectra say that loses
        # most of the output (relative error > 0.5), is met at the cost of the model's accuracy.
        floored = {p.name for p, r in zip(plans, all_ranks) if budget is not None and not p.is_dense(r)
                   and r == p.min_ranks() and p.predicted_error(r) > 0.5}
        if floored:
            warnings.warn(f"{self.name}: {budget.describe()} is met only with {len(floored)} layer(s) at their minimum "
                          f"rank ({', '.join(sorted(floored))}); expect a large accuracy loss (see the report)",
                          stacklevel=3)
        errors = self._measure_errors(work, new_modules, calib) if (calib is not None and self.measure_error) else {}
        for n, m in new_modules.items():
            set_submodule(work, n, m)
        after = measure_costs(work, example)
        after_modules = dict(work.named_modules())

        for p, r in zip(plans, all_ranks):
            dense = p.is_dense(r)
            rep = self._layer_report(
                p.name, p.info.module, "dense" if dense else "factorised",
                "factorising at the selected rank would not save cost" if dense
                else "at its minimum rank, predicted error > 0.5: the budget left no room" if p.name in floored
                else "",
                int(p.dense_cost["macs"]))
            if not dense:
                rep.ranks = {b.label or str(i): int(k) for i, (b, k) in enumerate(zip(p.blocks, r))}
            rep.predicted_error = p.predicted_error(r)
            rep.error = errors.get(p.name, 0.0 if dense else None)
            rep.details = p.describe(r)
            if p.form and not dense:
                rep.details["form"] = p.form
            if not dense:
                rep.module = type(new_modules[p.name]).__name__
                rep.macs_after = int(after.module_macs.get(p.name, 0))
                rep.params_after = count_params(new_modules[p.name])
            reports[p.name] = rep

        achieved = met = None
        if budget is not None:
            if metric == "latency":  # as the cost model predicts it; the measured time is reported
                assert latency is not None
                after_ref = base_ref - sum(p.dense_cost[metric] - p.cost(r, metric) for p, r in zip(plans, all_ranks))
                latency["predicted_after_ms"] = after_ref if budget.scope == "model" else None
            elif budget.scope == "model":
                after_ref = float(after.of(metric))
            else:
                after_ref = float(sum(self._module_cost(after, after_modules[n], n, metric) for n in target_names))
            achieved = base_ref / max(after_ref, 1e-12)
            met = budget.met(base_ref, after_ref)
            if not met:
                got = f"{after_ref:.3f} ms" if budget.ms is not None else f"{achieved:.3f}x"
                raise BudgetError(
                    f"{self.name} reached {got} instead of {budget.describe()} "
                    f"(tolerance {budget.tolerance:.0%}); layers are too coarse for this budget"
                )
        if latency is not None and cost_model is not None:
            latency["after_ms"] = cost_model.time(work, tuple(example.shape[1:]))
            for p in plans:
                entry = latency["layers"].get(p.name)
                if entry is not None and "forms" in entry:
                    entry["form"], entry["curve_macs_ms"] = p.form, points(p)
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        report = Report(
            method=self.name,
            options=self.options(),
            layers=sorted(reports.values(), key=lambda L: order.get(L.name, math.inf)),
            macs_before=before.macs, macs_after=after.macs,
            params_before=before.params, params_after=after.params,
            budget=budget.to_dict() if budget is not None else None,
            achieved_ratio=achieved, budget_met=met,
            calibration_samples=n_samples,
            input_shape=list(example.shape[1:]),
            latency=latency,
        )
        if inplace:
            for n, m in new_modules.items():
                set_submodule(model, n, m.train(model.training))
            out = model
        else:
            work.train(model.training)
            out = work
        report.seconds = time.perf_counter() - t0
        return CompressionResult(out, report)

    def _statistics_groups(self, live: list[str], infos: dict[str, LayerInfo]) -> list[list[str]]:
        """Layers in groups whose calibration statistics fit in ``max_stats_gb``: one calibration
        pass per group, statistics freed once the group is planned. A single layer larger than
        the limit gets a group of its own. Second-pass statistics (HSC's per-cluster moments)
        come on top and are of the same order."""
        limit = self.max_stats_gb * 2**30 if self.max_stats_gb is not None else math.inf
        groups: list[list[str]] = []
        used = 0.0
        for n in live:
            size = self.statistics_bytes(infos[n])
            if not groups or used + size > limit:
                groups.append([])
                used = 0.0
            groups[-1].append(n)
            used += size
        return groups

    def _cost_model(self) -> LatencyCostModel:
        return self.cost_model if self.cost_model is not None else LatencyCostModel(self.latency_batch)

    def _time_plans(self, cm: LatencyCostModel, candidates: list[list[LayerPlan]], work: nn.Module,
                    infos: dict[str, LayerInfo], target_names: list[str], example: torch.Tensor,
                    reports: dict[str, LayerReport], before: Any) -> tuple[list[list[LayerPlan]], dict[str, Any]]:
        return time_plans(self.name, self.progress, self.dense_fallback, cm, candidates, work, infos,
                          target_names, example, reports, before)

    def _measured_slower(self, new_modules: dict[str, nn.Module], infos: dict[str, LayerInfo]) -> dict[str, str]:
        return measured_slower(self.latency_batch, new_modules, infos)

    @staticmethod
    def _module_cost(cost, module: nn.Module, name: str, metric: str) -> float:
        return float(cost.module_macs.get(name, 0)) if metric == "macs" else float(count_params(module))

    @staticmethod
    def _layer_report(name: str, module: nn.Module, status: str, reason: str, macs: int) -> LayerReport:
        return layer_report(name, module, status, reason, macs)

    def _measure_errors(self, work: nn.Module, new_modules: dict[str, nn.Module], calib: Any) -> dict[str, float]:
        return measure_errors(work, new_modules, calib, desc=f"{self.name}: measuring error", progress=self.progress)
