"""The one budget object every compressor accepts: "3× fewer MACs", parameters or milliseconds."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Budget"]

Metric = Literal["macs", "params", "latency"]
Scope = Literal["model", "targets"]


@dataclass(frozen=True)
class Budget:
    """Divide the cost of the model (or of the targeted layers) by ``ratio`` — or, for latency,
    bring it under ``ms`` milliseconds.

    ``metric`` is what is counted: ``"macs"`` (multiply-accumulates per sample, measured with
    ``FlopCounterMode``; FLOPs = 2 × MACs), ``"params"``, or ``"latency"``: milliseconds per
    forward measured on the model's own device by a per-layer cost model (fewer MACs are worth
    nothing where the kernels do not realise them; see :class:`hsc_plugin.LatencyCostModel`).
    ``Budget(ms=4.0)`` is a latency budget in milliseconds. ``scope="model"`` divides the whole
    model's cost, so layers that cannot be factorised count against the budget; ``"targets"``
    divides only the targeted layers' cost. A compressor meets the ratio within ``tolerance``
    (relative) or raises :class:`BudgetError`; latency is met as the cost model predicts it, and
    the report also gives the measured time.
    """

    ratio: float | None = None
    metric: Metric = "macs"
    scope: Scope = "model"
    tolerance: float = 0.02
    ms: float | None = None

    def __post_init__(self) -> None:
        if self.ms is not None:
            if self.ratio is not None:
                raise ValueError("Give a Budget either a ratio or ms (milliseconds), not both")
            if not isinstance(self.ms, (int, float)) or not 0 < self.ms < float("inf"):
                raise ValueError(f"Budget ms must be a positive number of milliseconds, got {self.ms!r}")
            if self.metric not in ("macs", "latency"):
                raise ValueError(f"A budget in milliseconds is a latency budget, not {self.metric!r}")
            object.__setattr__(self, "metric", "latency")
        else:
            if self.ratio is None or isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                    or not self.ratio > 1.0:
                raise ValueError(f"Budget ratio must be a number > 1 (e.g. 3.0 for 3× fewer), got {self.ratio!r}")
            if self.ratio == float("inf"):
                raise ValueError("Budget ratio must be finite")
        if self.metric not in ("macs", "params", "latency"):
            raise ValueError(f"Budget metric must be 'macs', 'params' or 'latency', got {self.metric!r}")
        if self.scope not in ("model", "targets"):
            raise ValueError(f"Budget scope must be 'model' or 'targets', got {self.scope!r}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"Budget tolerance must be in (0, 1), got {self.tolerance!r}")

    @classmethod
    def parse(cls, text: str, metric: Metric = "macs", scope: Scope = "model") -> "Budget":
        """``"3x"``, ``"3"``, ``"3.5×"`` → ``Budget(3.0)``; ``"params=4x"`` / ``"latency=2x"`` set
        the metric; ``"4.5ms"`` is a latency budget in milliseconds."""
        ms = re.fullmatch(r"\s*(?:latency\s*=\s*)?([0-9]*\.?[0-9]+)\s*ms\s*", text, re.I)
        if ms:
            return cls(ms=float(ms.group(1)), scope=scope)
        m = re.fullmatch(r"\s*(?:(macs|params|latency)\s*=\s*)?([0-9]*\.?[0-9]+)\s*[x×]?\s*", text, re.I)
        if not m:
            raise ValueError(f"Cannot parse budget {text!r}; expected e.g. '3x', 'params=4x', 'latency=2x' or '4.5ms'")
        return cls(float(m.group(2)), metric=(m.group(1) or metric).lower(), scope=scope)  # type: ignore[arg-type]

    def target_cost(self, base_cost: float) -> float:
        """The allowed cost, given the cost before compression (same units as the metric)."""
        if self.ms is not None:
            return float(self.ms)
        assert self.ratio is not None
        return base_cost / self.ratio

    def met(self, base_cost: float, cost: float) -> bool:
        """Whether ``cost`` meets the budget within the tolerance (an ms budget is an upper bound)."""
        if self.ms is not None:
            return cost <= self.ms * (1.0 + self.tolerance)
        assert self.ratio is not None
        return abs(base_cost / max(cost, 1e-12) / self.ratio - 1.0) <= self.tolerance

    def describe(self) -> str:
        """``"3x fewer macs"``, ``"2x lower latency"``, ``"4.5 ms latency"``."""
        if self.ms is not None:
            return f"{self.ms:g} ms latency"
        return f"{self.ratio:g}x {'lower' if self.metric == 'latency' else 'fewer'} {self.metric}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetError(ValueError):
    """The requested budget cannot be met (and why)."""
