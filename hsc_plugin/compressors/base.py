"""The compressor interface: what a compressor (built-in or third-party) implements.

A compressor says two things per layer: which calibration statistics it needs
(:meth:`Compressor.statistics`) and how the layer can be factorised (:meth:`Compressor.plan`, a
:class:`~hsc_plugin.plan.LayerPlan`). Everything else — target selection, shape tracing, the
calibration passes, form choice, rank selection against the budget, building, measuring what
executes, the budget check and the report — is the shared engine in :mod:`hsc_plugin.pipeline`,
so all compressors behave the same way.

A new compressor is one new file in this package: subclass :class:`Compressor`, give it a
``name`` and keyword-only options, and list it in ``hsc_compressors`` (``compressors/__init__.py``)
or in a third-party package's own hook implementation.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from hsc_plugin.allocation import CandidateAllocation
from hsc_plugin.budget import Budget
from hsc_plugin.calibration import Accumulator, LayerInfo
from hsc_plugin.cost.latency_model import LatencyCostModel
from hsc_plugin.plan import LayerPlan, PlanContext
from hsc_plugin.registry import create
from hsc_plugin.report import CompressionResult
from hsc_plugin.strategy import RankSelector
from hsc_plugin.targets import SUPPORTED_TYPES, TargetSpec

__all__ = ["Compressor", "set_submodule"]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class Compressor(ABC):
    """Base class of every compressor (``hsc``, ``global_svd``, ``tucker2`` and third-party ones).

    A compressor object holds only its options: what one call decides (the budget's metric, rank
    rounding …) reaches :meth:`statistics` and :meth:`plan` as a frozen
    :class:`~hsc_plugin.plan.PlanContext`, so one object can run many compressions.

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
      many GiB (one calibration pass per group, freed once planned); ``None``: all at once. It
      also bounds the uncompressed layers' outputs the recovery stage keeps for the sequential
      refit (computed once and shared by every candidate; past the limit each refit recomputes them).
    * ``cost_model``: the :class:`~hsc_plugin.cost.latency_model.LatencyCostModel` used by latency budgets
      (``Budget(2.0, metric="latency")``, ``Budget(ms=4.0)``); default: one timing at
      ``latency_batch`` on the model's device. ``latency_rounds``: under a latency budget on the
      whole model, each allocation is timed whole with the cost model and, when its measured
      speed-up is outside [target, 1.1 × target], re-aimed at most this many times on the curves
      already timed (:mod:`hsc_plugin.latency_loop`); 0: the per-layer prediction alone (open loop).
    * ``bn_reestimation`` / ``bias_correction``: label-free recovery on the calibration inputs after
      factorising (:mod:`hsc_plugin.recovery`), each kept only where it lowers the model's output
      error on the calibration data; defaults by measurement (``benchmarks/results/recovery_mri.md``).
      ``sequential_refit`` (on by measurement, ``benchmarks/results/sequential_mri.md``): first,
      each factorised layer's final linear factor is refitted in forward order on the partially
      compressed model's features towards the uncompressed layer's outputs, compensating earlier
      layers' errors (:mod:`hsc_plugin.refit`; per region and cluster for HSC's own module).
      ``selection_samples``: how many calibration samples recovery and the choice among candidate
      allocations run on (the first ones; fewer is faster on large models). ``selection_gmacs``:
      the work that stage may take, in GMACs of dense forward passes (default 2000, about a minute
      on 2 CPU cores); above it the refit runs on the chosen candidate only, then not at all, and
      the stage runs on fewer samples (:func:`hsc_plugin.selection.selection_plan`; a warning says
      so). ``None``: no cap. ``holdout``: the fraction of those samples held out of every fit (the
      statistics and the recovery) and used only to choose among candidate allocations, when the
      compressor compares several (HSC): a candidate with more fitted parameters (a 1×1 per region)
      is then judged on data it was not fitted to. 0 (default): the choice is made on the fitting
      data, so it is never worse there than any baseline it reproduces
      (``benchmarks/results/holdout_mri.md`` measures both).
    """

    name: ClassVar[str]
    budget_selector: ClassVar[str] = "budget"  # the rank selector used when only a budget is given
    # The plan families this compressor's factorisation is made of (see LayerPlan.family), so that a
    # compressor offering many forms (HSC) can reproduce this one's allocation among its candidates.
    form_family: ClassVar[tuple[str, ...]] = ()
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
        latency_rounds: int = 3,
        max_stats_gb: float | None = 4.0,
        bn_reestimation: bool = True,
        bias_correction: bool = False,
        sequential_refit: bool = True,
        selection_samples: int = 256,
        selection_gmacs: float | None = 2000.0,
        holdout: float = 0.0,
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
        if isinstance(latency_rounds, bool) or not isinstance(latency_rounds, int) or latency_rounds < 0:
            raise ValueError(f"latency_rounds must be an integer >= 0 (0: open loop), got {latency_rounds!r}")
        self.latency_rounds = latency_rounds
        if max_stats_gb is not None and not max_stats_gb > 0:
            raise ValueError(f"max_stats_gb must be > 0 (or None for no limit), got {max_stats_gb!r}")
        self.max_stats_gb = max_stats_gb
        self.bn_reestimation = bool(bn_reestimation)
        self.bias_correction = bool(bias_correction)
        if not isinstance(sequential_refit, bool):
            raise TypeError(f"sequential_refit must be True or False, got {sequential_refit!r}")
        self.sequential_refit = sequential_refit
        if selection_samples < 1:
            raise ValueError(f"selection_samples must be >= 1, got {selection_samples}")
        self.selection_samples = int(selection_samples)
        if selection_gmacs is not None and not selection_gmacs > 0:
            raise ValueError(f"selection_gmacs must be > 0 (or None for no limit), got {selection_gmacs!r}")
        self.selection_gmacs = None if selection_gmacs is None else float(selection_gmacs)
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 <= holdout <= 0.5:
            raise ValueError(f"holdout must be a fraction in [0, 0.5], got {holdout!r}")
        self.holdout = float(holdout)

    # -- what subclasses implement ---------------------------------------------------------------
    # ``context`` is optional in every hook below: an implementation that does not name it is
    # called without it (and plans it creates still pick the call's context up by default).
    def needs_calibration(self) -> bool:
        """Whether :meth:`statistics` will ask for data (calib is then mandatory)."""
        return self.data_aware

    @abstractmethod
    def statistics(self, info: LayerInfo, context: PlanContext | None = None) -> list[Accumulator]:
        """Accumulators to attach to this layer during the calibration pass (may be empty)."""

    def second_statistics(self, info: LayerInfo, stats: list[Accumulator],
                          context: PlanContext | None = None) -> list[Accumulator]:
        """Accumulators for a second calibration pass, chosen from the first pass's statistics
        (e.g. per-cluster statistics once clusters are known). Default: none."""
        return []

    def statistics_bytes(self, info: LayerInfo, context: PlanContext | None = None) -> int:
        """Memory :meth:`statistics` will allocate for this layer (first pass), for grouping
        layers under ``max_stats_gb``. Default: create them and count (then drop them)."""
        accs = call_hook(self.statistics, info, context=context)
        return sum(t.numel() * t.element_size() for a in accs for t in a.tensors())

    @abstractmethod
    def plan(self, info: LayerInfo, stats: list[Accumulator],
             context: PlanContext | None = None) -> LayerPlan | list[LayerPlan] | str:
        """How to factorise the layer, or a string saying why it is left as it is.

        A list offers alternative forms, preferred first (e.g. HSC's regions, one region, SVD):
        they compete per layer for the budget (:func:`hsc_plugin.form_choice.choose_forms`)."""

    def recovers(self) -> bool:
        """Whether any label-free recovery step is on (it needs calibration data)."""
        return self.bn_reestimation or self.bias_correction or self.sequential_refit

    def own_families(self) -> tuple[str, ...] | None:
        """The plan families this compressor's own allocation may choose from (None: every form its
        plan offers); other families are there only for :meth:`candidate_allocations`."""
        return None

    def candidate_allocations(self, context: PlanContext) -> list["CandidateAllocation"]:
        """Other allocations to try besides this compressor's own; the pipeline keeps whichever
        compressed model has the lowest output error on the calibration data. Default: none."""
        return []

    # -- options -----------------------------------------------------------------------------------
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
        selector = create("rank_selector", spec, RankSelector, offered={"seed": self.seed}, **opts)
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
        it half-modified. The stages are in :mod:`hsc_plugin.pipeline`.
        """
        from hsc_plugin.pipeline import run

        return run(self, model, calib, targets=targets, exclude=exclude, budget=budget, inplace=inplace,
                   example_input=example_input)


def call_hook(fn: Any, *args: Any, context: PlanContext | None = None) -> Any:
    """Call a compressor hook with ``context`` if its signature takes it (third-party compressors
    written before the context existed take only their positional arguments)."""
    try:
        takes = "context" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables: assume the old signature
        takes = False
    return fn(*args, context=context) if takes else fn(*args)
