"""The compression engine every compressor runs through, as named stages.

``run`` reads top to bottom; each stage is a function of what the previous ones returned:

1. :func:`prepare` — check the inputs, copy the model, resolve and trace the target layers, count
   the dense costs, decide the call's :class:`~hsc_plugin.plan.PlanContext`;
2. :func:`calibrate_and_plan` — per group of layers whose statistics fit in memory: the
   calibration pass(es), then the compressor's plan (alternative forms) for each layer;
3. :func:`hsc_plugin.cost.plan_timing.time_plans` — latency budgets only: every form timed on the device;
4. :func:`allocations` — forms chosen and ranks selected against the budget, modules built
   (:func:`hsc_plugin.allocation.allocate`, re-allocating around layers the latency guard measured
   slower); also any other allocation the compressor asks to be compared with (HSC: its baselines');
5. :func:`hsc_plugin.selection.select` — each candidate built into a copy of the model, recovered
   without labels (BN re-estimation, bias correction) and measured on the calibration data; the
   lowest output error wins;
6. :func:`measure` — each new module's own output error, and the costs of what executes;
7. :func:`hsc_plugin.report.build_report` and the budget check; then the copy (or, with
   ``inplace=True``, the user's model) is returned.

The compressor object is never written to: what a call decides lives in the stages' values.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hsc_plugin.allocation import Allocation, keep_families, restrict, statistics_groups
from hsc_plugin.budget import Budget, BudgetError
from hsc_plugin.calibration import CalibrationError, LayerInfo, first_batch, first_samples, measure_errors, progress_enabled, \
    run_calibration, skip_samples, trace_layers
from hsc_plugin.cost.latency_model import LatencyCostModel
from hsc_plugin.decomposition import DecompositionWarning
from hsc_plugin.latency_loop import allocate_measured
from hsc_plugin.cost.macs import ModelCost, count_params, measure_costs
from hsc_plugin.plan import LayerPlan, PlanContext, planning
from hsc_plugin.cost.plan_timing import time_plans
from hsc_plugin.registry import create
from hsc_plugin.selection import Selected, select
from hsc_plugin.report import CompressionResult, LayerReport, build_report, check_budget, layer_report
from hsc_plugin.strategy import RankSelector
from hsc_plugin.targets import TargetSpec, resolve_targets

if TYPE_CHECKING:
    from hsc_plugin.compressors.base import Compressor

__all__ = ["run", "Prepared", "prepare", "calibrate_and_plan", "measure"]


@dataclass
class Prepared:
    """Stage 1's result: the working copy, its traced target layers and what the call decided."""

    model: nn.Module
    work: nn.Module
    calib: Any
    budget: Budget | None
    example: torch.Tensor
    context: PlanContext
    selector: RankSelector
    names: list[str]
    infos: dict[str, LayerInfo]
    before: ModelCost
    live: list[str]  # targets that can be planned (executed once per forward)
    reports: dict[str, LayerReport] = field(default_factory=dict)  # layers left as they are, and why
    notes: dict[str, list[str]] = field(default_factory=dict)  # per layer: decompositions that needed a fallback
    held: torch.Tensor | None = None  # samples held out of every fit, to choose among candidates (``holdout``)
    fit: Any = None  # the calibration data the fits see: ``calib`` without the held-out samples

    @property
    def target_names(self) -> list[str]:
        return [n for n in self.names if n in self.infos]


def run(compressor: "Compressor", model: nn.Module, calib: Any = None, *, targets: TargetSpec = None,
        exclude: TargetSpec = None, budget: Budget | None = None, inplace: bool = False,
        example_input: torch.Tensor | None = None) -> CompressionResult:
    """Compress ``model`` with ``compressor``: the stages above, in order."""
    t0 = time.perf_counter()
    prep = prepare(compressor, model, calib, targets, exclude, budget, example_input)
    with planning(prep.context):
        candidates, n_samples = calibrate_and_plan(compressor, prep)
    latency: dict[str, Any] | None = None
    cost_model: LatencyCostModel | None = None
    if prep.context.metric == "latency":
        cost_model = compressor.cost_model or LatencyCostModel(compressor.latency_batch)
        candidates, latency = time_plans(compressor.name, compressor.progress, compressor.dense_fallback, cost_model,
                                         candidates, prep.work, prep.infos, prep.target_names, prep.example,
                                         prep.reports, prep.before)
    allocs = allocations(compressor, prep, candidates, latency, cost_model)
    # Forms no allocation kept, and the layers' shared float64 weights and eigen-decompositions,
    # are freed before the selection builds and runs models (resnet50: ~2 GB of plans).
    del candidates
    for info in prep.infos.values():
        info.release()
    chosen = select(compressor, prep, allocs)
    errors, after = measure(compressor, prep, chosen)
    report = build_report(compressor, prep, chosen, errors, after, n_samples, latency)
    check_budget(compressor.name, report, prep.budget, chosen.alloc.base_ref)
    if latency is not None and cost_model is not None:
        if cost_model.tune_pointwise and not cost_model.channels_last:  # run as timed: tuned, measured again
            tuned = cost_model.deployed(chosen.model, tuple(prep.example.shape[1:]), inplace=True)
            latency["pointwise_matmul"] = [r["name"] for r in tuned.tuned_pointwise if r["execution"] == "matmul"]
        latency["after_ms"] = cost_model.time(chosen.model, tuple(prep.example.shape[1:]))
    out = _finish(prep, chosen, inplace)
    report.seconds = time.perf_counter() - t0
    return CompressionResult(out, report)


# -- stage 1 ---------------------------------------------------------------------------------------
def prepare(compressor: "Compressor", model: nn.Module, calib: Any, targets: TargetSpec, exclude: TargetSpec,
            budget: Budget | None, example_input: torch.Tensor | None) -> Prepared:
    """Check the inputs, copy the model and trace its targets; nothing is written to ``model``."""
    _check_model(model)
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget must be a hsc_plugin.Budget, got {type(budget).__name__}")
    if compressor.needs_calibration() and calib is None:
        raise CalibrationError(
            f"Compressor {compressor.name!r} with these options needs calibration data (calib=...)"
        )
    example = _example(model, calib, example_input)
    selector = compressor.rank_selector(budget)
    context = PlanContext(metric=budget.metric if budget is not None else "macs", has_budget=budget is not None,
                          rank_multiple=compressor.rank_multiple, dense_fallback=compressor.dense_fallback)
    work = copy.deepcopy(model)
    work.eval()
    names, skipped = resolve_targets(work, targets, exclude, compressor.supported_types)
    if not names:
        raise ValueError("No layer to compress: no Conv2d/Linear layer matches the targets")
    traced = trace_layers(work, names, example)  # first: a model that cannot run the input fails here, clearly
    before = measure_costs(work, example)
    infos = {n: replace(i, macs=before.module_macs.get(n, 0), params=count_params(i.module)) for n, i in traced.items()}
    modules = dict(work.named_modules())
    reports = {n: layer_report(n, modules[n], "skipped", reason, before.module_macs.get(n, 0))
               for n, reason in skipped.items()}
    live: list[str] = []
    for n in names:
        if n not in infos:
            reports[n] = layer_report(n, modules[n], "skipped", "not executed by the forward pass", 0)
        elif infos[n].calls > 1:
            reports[n] = layer_report(n, modules[n], "skipped", f"called {infos[n].calls} times per forward (shared)",
                                      before.module_macs.get(n, 0))
        else:
            live.append(n)
    held, fit = _holdout(compressor, calib, budget, context)
    return Prepared(model, work, calib, budget, example, context, selector, names, infos, before, live, reports,
                    held=held, fit=fit)


MIN_HELD_OUT = 8
"""Fewest held-out samples a choice among candidates is made on; below it (``holdout`` times the
selection samples) nothing is held out and a warning says so."""


def _holdout(compressor: "Compressor", calib: Any, budget: Budget | None,
             context: PlanContext) -> tuple[torch.Tensor | None, Any]:
    """(the held-out samples, the data the fits see): with ``holdout`` > 0, calibration data, a budget
    and candidate allocations to choose among, the first ``holdout`` × ``selection_samples`` samples
    are held out; otherwise nothing is, and the fits see all of ``calib``."""
    from hsc_plugin.selection import _distributed

    if (calib is None or budget is None or compressor.holdout <= 0 or _distributed()
            or not compressor.candidate_allocations(context)):
        return None, calib
    sel = first_samples(calib, compressor.selection_samples)
    n = int(compressor.holdout * sel.shape[0])
    if n < MIN_HELD_OUT or n >= sel.shape[0]:
        warnings.warn(f"{compressor.name}: holdout={compressor.holdout:g} of {sel.shape[0]} selection samples is "
                      f"{n}, outside [{MIN_HELD_OUT}, {sel.shape[0] - 1}]: nothing is held out, the candidates "
                      "are compared on the fitting data", stacklevel=4)
        return None, calib
    return sel[:n], skip_samples(calib, n)


def _example(model: nn.Module, calib: Any, example_input: torch.Tensor | None) -> torch.Tensor:
    """One input sample, for tracing shapes and counting costs."""
    param = next(model.parameters())
    if calib is not None:
        example = first_batch(calib)[:1]
    elif example_input is not None:
        example = example_input[:1]
    else:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if not (isinstance(cfg, dict) and "input_size" in cfg):
            raise CalibrationError(
                "Cannot infer the input shape: pass calib=... or example_input=torch.randn(1, C, H, W)"
            )
        example = torch.randn(1, *cfg["input_size"], dtype=param.dtype, device=param.device)
    if not torch.is_floating_point(example):
        raise CalibrationError(f"Inputs must be floating point, got dtype {example.dtype}")
    return example.to(device=param.device, dtype=param.dtype)


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


# -- stage 2 ---------------------------------------------------------------------------------------
def calibrate_and_plan(compressor: "Compressor", prep: Prepared) -> tuple[list[list[LayerPlan]], int]:
    """Per group of layers: gather their statistics, plan each layer, free the statistics.

    Returns, per layer that can save cost, its forms (preferred first), and the number of
    calibration samples seen.
    """
    from hsc_plugin.compressors.base import call_hook

    ctx = prep.context
    candidates: list[list[LayerPlan]] = []
    n_samples = 0
    groups = statistics_groups(compressor, prep.live, prep.infos, ctx)
    bar = tqdm(total=len(prep.live), desc=f"{compressor.name}: decompose", unit="layer", leave=False,
               disable=not progress_enabled(compressor.progress))
    for g, group in enumerate(groups):
        tag = f" {g + 1}/{len(groups)}" if len(groups) > 1 else ""
        stats, seen = _calibrate(compressor, prep, group, ctx, tag)
        n_samples = seen or n_samples
        for n in group:
            bar.update(1)
            with _decomposition_notes(prep, n):
                result = call_hook(compressor.plan, prep.infos[n], stats.pop(n), context=ctx)
            forms = _plan_layer(compressor, prep, prep.infos[n], result)
            if forms:
                candidates.append(forms)
        del stats
    bar.close()
    return candidates, n_samples


@contextmanager
def _decomposition_notes(prep: Prepared, name: str) -> Iterator[None]:
    """Eigen/SVD fallbacks while planning a layer: recorded for its report and warned once, by name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DecompositionWarning)
        yield
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, DecompositionWarning)})
    for w in caught:
        if not issubclass(w.category, DecompositionWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if notes:
        prep.notes[name] = notes
        warnings.warn(f"layer {name!r}: {'; '.join(notes)}", DecompositionWarning, stacklevel=2)


def _calibrate(compressor: "Compressor", prep: Prepared, group: list[str], ctx: PlanContext,
               tag: str) -> tuple[dict[str, list[Any]], int]:
    """The group's first-pass statistics and, where the compressor asks, a second pass."""
    from hsc_plugin.compressors.base import call_hook

    stats = {n: call_hook(compressor.statistics, prep.infos[n], context=ctx) for n in group}
    if not any(stats.values()):
        return stats, 0
    n = run_calibration(prep.work, stats, prep.fit, progress=compressor.progress, stop_early=True,
                        desc=f"{compressor.name}: calibration{tag}")
    extra = {m: call_hook(compressor.second_statistics, prep.infos[m], stats[m], context=ctx) for m in group}
    if any(a.needs_pass for accs in extra.values() for a in accs):  # some are not derived from the first pass
        run_calibration(prep.work, extra, prep.fit, progress=compressor.progress, stop_early=True,
                        desc=f"{compressor.name}: calibration 2{tag}")
    if any(extra.values()):
        stats = {m: stats[m] + extra[m] for m in group}
    return stats, n


def _plan_layer(compressor: "Compressor", prep: Prepared, info: LayerInfo,
                result: LayerPlan | list[LayerPlan] | str) -> list[LayerPlan]:
    """The forms of a layer that can save cost; a layer with none is reported dense, with why."""
    ctx = prep.context
    dense = info.dense_cost()
    if isinstance(result, str):
        prep.reports[info.name] = layer_report(info.name, info.module, "dense", result, info.macs)
        return []
    forms = result if isinstance(result, list) else [result]
    counted = ctx.counted
    saving = [p for p in forms if not compressor.dense_fallback
              or p.factorised_cost(p.min_ranks(), counted) < dense[counted]]
    if not saving:
        cheapest = min(p.factorised_cost(p.min_ranks(), counted) for p in forms)
        prep.reports[info.name] = layer_report(
            info.name, info.module, "dense",
            f"factorising cannot save {counted}: the smallest rank costs {cheapest:,.0f} >= dense "
            f"{dense[counted]:,.0f}", info.macs)
    return saving


# -- stage 4 ---------------------------------------------------------------------------------------
def allocations(compressor: "Compressor", prep: Prepared, candidates: list[list[LayerPlan]],
                latency: dict[str, Any] | None, cost_model: LatencyCostModel | None = None) -> dict[str, Allocation]:
    """The compressor's own allocation and the others it asks to be compared with, by name. Another
    allocation that cannot be reproduced from these candidates, or cannot meet the budget, is left out;
    so is the compressor's own when it cannot and another can (a warning says so).
    Under a latency budget each one is measured whole and re-aimed (:mod:`hsc_plugin.latency_loop`)."""
    own = keep_families(candidates, compressor.own_families())
    others = compressor.candidate_allocations(prep.context) if prep.budget is not None and prep.calib is not None else []
    out: dict[str, Allocation] = {}
    try:
        out[compressor.name] = allocate_measured(compressor, prep, own, latency, cost_model)
    except BudgetError as exc:  # another candidate may still meet the budget (a latency budget, as measured)
        if not others:
            raise
        refused = exc
    for cand in others:
        restricted = keep_families(candidates, cand.families) if cand.compete else restrict(candidates, cand.families)
        if restricted is None or cand.name in out:
            continue
        try:
            out[cand.name] = allocate_measured(compressor, prep, restricted, latency, cost_model,
                                               objective=cand.objective,
                                               selector=create("rank_selector", cand.selector, RankSelector))
        except BudgetError:
            continue
    if not out:
        raise refused
    if compressor.name not in out:
        warnings.warn(f"{compressor.name}: its own allocation cannot meet the budget ({refused}); the choice is "
                      f"among the other candidates that do: {', '.join(out)}", stacklevel=3)
    return out


# -- stage 6 ---------------------------------------------------------------------------------------
def measure(compressor: "Compressor", prep: Prepared, chosen: Selected) -> tuple[dict[str, float], ModelCost]:
    """Each new module's relative output error on its layer's own calibration inputs (hooks on the
    uncompressed copy, so every module sees the inputs its layer saw), and the costs of what the
    chosen model executes."""
    errors: dict[str, float] = {}
    if prep.calib is not None and compressor.measure_error:
        calib = prep.calib
        stage = (chosen.recovery or {}).get("selection")
        if stage and stage["samples"] < stage["asked_samples"]:  # a work-capped selection: the same subset
            calib = first_samples(prep.calib, stage["samples"])
        errors = measure_errors(prep.work, chosen.modules, calib, desc=f"{compressor.name}: measuring error",
                                progress=compressor.progress)
    return errors, measure_costs(chosen.model, prep.example)


def _finish(prep: Prepared, chosen: Selected, inplace: bool) -> nn.Module:
    """The chosen copy, or — with ``inplace=True``, once everything has succeeded — the user's model
    with the new modules and the recovered state (e.g. re-estimated BatchNorm statistics)."""
    from hsc_plugin.compressors.base import set_submodule

    if inplace:
        for n, m in chosen.modules.items():
            set_submodule(prep.model, n, m.train(prep.model.training))
        prep.model.load_state_dict(chosen.model.state_dict())
        return prep.model
    chosen.model.train(prep.model.training)
    return chosen.model
