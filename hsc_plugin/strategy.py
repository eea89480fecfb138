"""The strategy interfaces: what a plugin implements to become a rank selector, a spatial
partitioner or a channel clusterer. Built-ins live in ``hsc_plugin.strategies``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from hsc_plugin.plan import RankProblem

__all__ = ["RankSelector", "SpatialPartitioner", "ChannelClusterer", "Strategy"]


class Strategy(ABC):
    """Base of every pluggable strategy: a registry ``name`` and keyword-only options."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"

    def config(self) -> dict[str, Any]:
        """JSON-safe description, for reports."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class RankSelector(Strategy):
    """Chooses the rank of every block of every layer (``select`` returns ranks per plan)."""

    kind = "rank_selector"
    needs_budget: ClassVar[bool] = False

    @abstractmethod
    def select(self, problem: RankProblem) -> list[list[int]]: ...


class SpatialPartitioner(Strategy):
    """Tiles a layer's output map into rectangles from per-cell statistics."""

    kind = "partitioner"
    # Whether ``partition`` reads the cells' output second moments (``cell_stats.S``). A fixed
    # tiling reads only the grid and the map size, which spares the C_out² statistics per cell.
    uses_moments: ClassVar[bool] = True

    @abstractmethod
    def partition(self, cell_stats: Any) -> Any: ...

    def statistics_grid(self, fine: tuple[int, int]) -> tuple[int, int]:
        """The cell grid this partitioner needs statistics on. Adaptive partitioners need the
        compressor's ``fine`` grid; a fixed tiling needs only its own cells, which keeps the
        calibration statistics (cells × C² per layer) small on large models."""
        return fine


class ChannelClusterer(Strategy):
    """Groups channels from a co-activation (|correlation|) matrix; returns a label per channel."""

    kind = "clusterer"

    @abstractmethod
    def cluster(self, coactivation: np.ndarray) -> np.ndarray: ...
