"""The one budget object every compressor accepts: "3× fewer MACs" (or parameters)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Budget"]

Metric = Literal["macs", "params"]
Scope = Literal["model", "targets"]


@dataclass(frozen=True)
class Budget:
    """Divide the cost of the model (or of the targeted layers) by ``ratio``.

    ``metric`` is what is counted: ``"macs"`` (multiply-accumulates per sample, measured with
    ``FlopCounterMode``; FLOPs = 2 × MACs) or ``"params"``. ``scope="model"`` divides the whole
    model's cost, so layers that cannot be factorised count against the budget; ``"targets"``
    divides only the targeted layers' cost. A compressor meets the ratio within ``tolerance``
    (relative) or raises :class:`BudgetError`.
    """

    ratio: float
    metric: Metric = "macs"
    scope: Scope = "model"
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not self.ratio > 1.0:
            raise ValueError(f"Budget ratio must be a number > 1 (e.g. 3.0 for 3× fewer), got {self.ratio!r}")
        if self.ratio == float("inf"):
            raise ValueError("Budget ratio must be finite")
        if self.metric not in ("macs", "params"):
            raise ValueError(f"Budget metric must be 'macs' or 'params', got {self.metric!r}")
        if self.scope not in ("model", "targets"):
            raise ValueError(f"Budget scope must be 'model' or 'targets', got {self.scope!r}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"Budget tolerance must be in (0, 1), got {self.tolerance!r}")

    @classmethod
    def parse(cls, text: str, metric: Metric = "macs", scope: Scope = "model") -> "Budget":
        """``"3x"``, ``"3"``, ``"3.5×"`` → ``Budget(3.0)``; ``"params=4x"`` sets the metric."""
        m = re.fullmatch(r"\s*(?:(macs|params)\s*=\s*)?([0-9]*\.?[0-9]+)\s*[x×]?\s*", text, re.I)
        if not m:
            raise ValueError(f"Cannot parse budget {text!r}; expected e.g. '3x' or 'params=4x'")
        return cls(float(m.group(2)), metric=(m.group(1) or metric).lower(), scope=scope)  # type: ignore[arg-type]

    def target_cost(self, base_cost: float) -> float:
        return base_cost / self.ratio

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BudgetError(ValueError):
    """The requested budget cannot be met (and why)."""
