"""The result of a compression: the model and a JSON-safe per-layer report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from hsc_plugin.allocation import Allocation
    from hsc_plugin.budget import Budget
    from hsc_plugin.compressors.base import Compressor
    from hsc_plugin.cost.macs import ModelCost
    from hsc_plugin.pipeline import Prepared
    from hsc_plugin.selection import Selected

__all__ = ["LayerReport", "Report", "CompressionResult", "layer_report", "build_report", "check_budget"]


@dataclass
class LayerReport:
    """One targeted layer: what was done to it and what it costs before and after."""

    name: str
    type: str
    status: str  # "factorised" | "dense" (kept) | "skipped"
    reason: str = ""
    module: str = ""  # class of the replacement
    ranks: dict[str, int] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    predicted_error: float | None = None  # discarded / total energy of the spectra
    error: float | None = None  # measured relative output error on the calibration data
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Per-layer and whole-model costs before/after, the budget asked for and what was met."""

    method: str
    options: dict[str, Any]
    layers: list[LayerReport]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    budget: dict[str, Any] | None = None
    achieved_ratio: float | None = None  # in the budget's metric and scope
    budget_met: bool | None = None
    calibration_samples: int = 0
    input_shape: list[int] = field(default_factory=list)
    seconds: float = 0.0
    # Latency budgets only: measured ms before/after (model, at the cost model's batch), the
    # cost model's prediction, and each layer's measured dense time and time-vs-MACs curve.
    latency: dict[str, Any] | None = None
    # Relative L2 error of the compressed model's outputs against the original's on the calibration
    # inputs (after recovery): what compressors are compared by, label-free.
    calibration_error: float | None = None
    allocation: str = ""  # which candidate allocation was kept (HSC: its own or a baseline's)
    candidates: dict[str, float] = field(default_factory=dict)  # every candidate's calibration error
    recovery: dict[str, Any] | None = None  # what label-free recovery did (steps, errors, seconds)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_ratio"] = self.macs_ratio
        d["params_ratio"] = self.params_ratio
        d["flops_before"] = 2 * self.macs_before
        d["flops_after"] = 2 * self.macs_after
        return json.loads(json.dumps(d, default=_json_default))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        """A plain-text per-layer table and the totals."""
        head = (f"{'layer':<28} {'status':<11} {'form':<36} {'ranks':<18} {'MACs before':>12} {'after':>12} "
                f"{'err':>7}")
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ranks = ",".join(f"{k}={v}" for k, v in L.ranks.items()) if L.ranks else "-"
            err = L.error if L.error is not None else L.predicted_error
            form = L.details.get("form") or (L.module if L.status == "factorised" else "-")
            lines.append(
                f"{L.name[:28]:<28} {L.status:<11} {form[:36]:<36} {ranks[:18]:<18} {L.macs_before:>12,} "
                f"{L.macs_after:>12,} {'' if err is None else f'{err:.4f}':>7}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"model MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.2f}x), "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.2f}x)"
        )
        if self.budget is not None:
            asked = f"{self.budget['ms']} ms" if self.budget.get("ms") is not None else f"{self.budget['ratio']}x"
            lines.append(
                f"budget {asked} {self.budget['metric']} ({self.budget['scope']}): "
                f"achieved {self.achieved_ratio:.3f}x, met={self.budget_met}"
            )
        if self.calibration_error is not None:
            tried = ", ".join(f"{k} {v:.4f}" for k, v in self.candidates.items()) if len(self.candidates) > 1 else ""
            held = (self.recovery or {}).get("held_out")
            lines.append(f"calibration output error {self.calibration_error:.4f}"
                         + (f" on {held['samples']} held-out samples (fit {held['fit_error']:.4f})" if held else "")
                         + (f" (allocation kept: {self.allocation}; candidates{self._stage()}: {tried})" if tried else ""))
        if self.latency is not None:
            pred = self.latency.get("predicted_after_ms")
            lines.append(
                f"latency at batch {self.latency['batch']} on {self.latency['device']}: "
                f"{self.latency['before_ms']:.3f} ms -> {self.latency['after_ms']:.3f} ms measured"
                + (f" ({pred:.3f} ms predicted)" if pred is not None else "")
            )
            rounds = self.latency.get("rounds")
            if rounds:
                kept = next((r for r in rounds if r.get("kept")), rounds[-1])
                lines.append(f"closed loop: {len(rounds)} round(s), measured speed-up "
                             + " -> ".join(f"{r['speedup']:.2f}x" + (" (fastest)" if r.get("fastest") else "")
                                           for r in rounds)
                             + f"; kept round {kept['round']} ({kept['measured_ms']:.3f} ms measured, "
                             f"{kept['predicted_ms']:.3f} ms predicted)")
            chosen = [f"{n}: {e['form']}" for n, e in self.latency.get("layers", {}).items() if e.get("form")]
            if chosen:
                lines.append("forms chosen by measured time: " + "; ".join(chosen))
            if "pointwise_matmul" in self.latency:
                mm = self.latency["pointwise_matmul"]
                lines.append(f"1x1 factors run as a matmul (tune_pointwise, measured faster): {len(mm)}"
                             + (f" ({', '.join(mm)})" if mm else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _stage(self) -> str:
        """How the candidates were compared, where the selection cap changed it: their errors are
        then not all after the same recovery, or not on every sample."""
        stage = (self.recovery or {}).get("selection") or {}
        refits = bool((self.options or {}).get("sequential_refit"))  # off by the user: nothing to say
        how = {"winner": "compared before the refit, which only the kept one had",
               "none": "compared without the refit"}.get(stage.get("refit", ""), "") if refits else ""
        if stage and stage.get("samples", 0) < stage.get("asked_samples", 0):
            how += (", " if how else "") + f"on {stage['samples']} of {stage['asked_samples']} samples"
        return f" ({how}, selection_gmacs)" if how else ""


def _json_default(o: Any) -> Any:
    if hasattr(o, "config"):
        return o.config()
    if hasattr(o, "tolist"):
        return o.tolist()
    return repr(o)


@dataclass
class CompressionResult:
    """``model``: the compressed model (a copy unless ``inplace=True``); ``report``: see Report."""

    model: nn.Module
    report: Report

    def __iter__(self):  # allows ``model, report = compress(...)``
        yield self.model
        yield self.report


def layer_report(name: str, module: nn.Module, status: str, reason: str, macs: int) -> LayerReport:
    """The report of a layer left as it is (skipped or kept dense): before equals after."""
    from hsc_plugin.cost.macs import count_params

    params = count_params(module)
    return LayerReport(name=name, type=type(module).__name__, status=status, reason=reason,
                       macs_before=macs, macs_after=macs, params_before=params, params_after=params)


def _factorised_report(plan: Any, ranks: list[int], alloc: "Allocation", modules: dict[str, nn.Module],
                       errors: dict[str, float], after: "ModelCost") -> LayerReport:
    """The report of a planned layer: its ranks, form, errors and costs after."""
    from hsc_plugin.cost.macs import count_params

    dense = plan.is_dense(ranks)
    reason = ("factorising at the selected rank would not save cost" if dense
              else "at its minimum rank, predicted error > 0.5: the budget left no room" if plan.name in alloc.floored
              else "")
    rep = layer_report(plan.name, plan.info.module, "dense" if dense else "factorised", reason,
                       int(plan.dense_cost["macs"]))
    rep.predicted_error = plan.predicted_error(ranks)
    rep.error = errors.get(plan.name, 0.0 if dense else None)
    rep.details = plan.describe(ranks)
    if not dense:
        new = modules[plan.name]
        rep.ranks = {b.label or str(i): int(k) for i, (b, k) in enumerate(zip(plan.blocks, ranks))}
        if plan.form:
            rep.details["form"] = plan.form
        rep.module = type(new).__name__
        rep.macs_after = int(after.module_macs.get(plan.name, 0))
        rep.params_after = count_params(new)
    return rep


def _achieved(prep: "Prepared", alloc: "Allocation", model: nn.Module, after: "ModelCost",
              latency: dict[str, Any] | None) -> tuple[float | None, bool | None]:
    """(ratio achieved, budget met) in the budget's metric and scope."""
    from hsc_plugin.allocation import module_cost

    budget, metric, base_ref = prep.budget, prep.context.metric, alloc.base_ref
    if budget is None:
        return None, None
    if metric == "latency":  # as the cost model predicts it; the measured time is reported
        assert latency is not None
        after_ref = alloc.predicted(metric)
        latency["predicted_after_ms"] = after_ref if budget.scope == "model" else None
        if alloc.measured_ms is not None:  # closed loop: the whole model as measured is what counts
            from hsc_plugin.latency_loop import measured_ceiling

            ceiling = measured_ceiling(budget, latency["before_ms"])
            return latency["before_ms"] / max(alloc.measured_ms, 1e-12), \
                alloc.measured_ms <= ceiling * (1 + budget.tolerance)
    elif budget.scope == "model":
        after_ref = float(after.of(metric))
    else:
        modules = dict(model.named_modules())
        after_ref = float(sum(module_cost(after, modules[n], n, metric) for n in prep.target_names))
    return base_ref / max(after_ref, 1e-12), budget.met(base_ref, after_ref)


def build_report(compressor: "Compressor", prep: "Prepared", chosen: "Selected", errors: dict[str, float],
                 after: "ModelCost", n_samples: int, latency: dict[str, Any] | None) -> Report:
    """The whole report: every targeted layer in model order, costs before and after, the budget,
    the calibration error and which candidate allocation was chosen."""
    from hsc_plugin.cost.plan_timing import points

    alloc, modules = chosen.alloc, chosen.modules
    reports = dict(prep.reports)
    for p, r in zip(alloc.plans, alloc.ranks):
        reports[p.name] = _factorised_report(p, r, alloc, modules, errors, after)
    achieved, met = _achieved(prep, alloc, chosen.model, after, latency)
    if latency is not None:
        if alloc.rounds:
            latency["rounds"] = alloc.rounds
        for p in alloc.plans:
            entry = latency["layers"].get(p.name)
            if entry is not None and "forms" in entry:
                entry["form"], entry["curve_macs_ms"] = p.form, points(p)
    for n, notes in prep.notes.items():
        if n in reports:
            reports[n].details["decomposition"] = notes
    order = {n: i for i, (n, _) in enumerate(prep.model.named_modules())}
    report = Report(
        method=compressor.name, options=compressor.options(),
        layers=sorted(reports.values(), key=lambda L: order.get(L.name, math.inf)),
        macs_before=prep.before.macs, macs_after=after.macs,
        params_before=prep.before.params, params_after=after.params,
        budget=prep.budget.to_dict() if prep.budget is not None else None,
        achieved_ratio=achieved, budget_met=met, calibration_samples=n_samples,
        input_shape=list(prep.example.shape[1:]), latency=latency,
        calibration_error=chosen.error, allocation=chosen.name, candidates=chosen.candidates,
        recovery=chosen.recovery,
    )
    return report


def check_budget(name: str, report: Report, budget: "Budget | None", base_ref: float) -> None:
    """Raise :class:`~hsc_plugin.budget.BudgetError` when the budget was not met within tolerance."""
    from hsc_plugin.budget import BudgetError

    if budget is None or report.budget_met:
        return
    achieved = report.achieved_ratio or 0.0
    got = f"{base_ref / max(achieved, 1e-12):.3f} ms" if budget.ms is not None else f"{achieved:.3f}x"
    raise BudgetError(
        f"{name} reached {got} instead of {budget.describe()} "
        f"(tolerance {budget.tolerance:.0%}); layers are too coarse for this budget"
    )
