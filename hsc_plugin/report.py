"""The result of a compression: the model and a JSON-safe per-layer report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["LayerReport", "Report", "CompressionResult"]


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
        head = f"{'layer':<28} {'status':<11} {'ranks':<18} {'MACs before':>12} {'after':>12} {'err':>7}"
        lines = [head, "-" * len(head)]
        for L in self.layers:
            ranks = ",".join(f"{k}={v}" for k, v in L.ranks.items()) if L.ranks else "-"
            err = L.error if L.error is not None else L.predicted_error
            lines.append(
                f"{L.name[:28]:<28} {L.status:<11} {ranks[:18]:<18} {L.macs_before:>12,} "
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
        if self.latency is not None:
            pred = self.latency.get("predicted_after_ms")
            lines.append(
                f"latency at batch {self.latency['batch']} on {self.latency['device']}: "
                f"{self.latency['before_ms']:.3f} ms -> {self.latency['after_ms']:.3f} ms measured"
                + (f" ({pred:.3f} ms predicted)" if pred is not None else "")
            )
            chosen = [f"{n}: {e['form']}" for n, e in self.latency.get("layers", {}).items() if e.get("form")]
            if chosen:
                lines.append("forms chosen by measured time: " + "; ".join(chosen))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


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
    from hsc_plugin.costs import count_params

    params = count_params(module)
    return LayerReport(name=name, type=type(module).__name__, status=status, reason=reason,
                       macs_before=macs, macs_after=macs, params_before=params, params_after=params)
