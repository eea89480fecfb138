"""A per-layer latency cost model measured on the user's device, so budgets can be in milliseconds.

MACs are a poor proxy for time: a factorised layer runs two or three small kernels where the dense
layer ran one, and on a big GPU (or at batch 1 on a CPU) launches and memory traffic dominate.
The model times the dense layer and the factorised layer at a few ranks, on the layer's own
input shape and device, and interpolates time as a function of the factorised layer's MACs
(monotone, piecewise linear). A rank selector then spends the budget where time is really saved,
and keeps dense any layer whose smallest factorisation is not faster.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from hsc_plugin.plan import LayerPlan

__all__ = ["LatencyCostModel"]


class LatencyCostModel:
    """Times modules on their own device; subclass and override :meth:`time` to plug in another
    timer (a device profile, a roofline model, or a fake one in tests).

    ``batch`` is the batch size the model is optimised for (latency at batch 1 and throughput at
    batch 64 favour different layers); ``fractions`` are the rank levels (fractions of each
    block's full rank) sampled per layer; ``channels_last`` times modules and inputs in the NHWC
    layout a CPU deployment should use (kernels rank differently in it: PyTorch's NCHW max-pool
    is ~10× slower than its NHWC one on this project's CPU). ``tune_pointwise``: time (and return)
    the factorised layers with each 1×1 factor run as a conv or a matmul, whichever is measured
    faster here (:func:`~hsc_plugin.tuning.tune_pointwise`; NCHW CPU inference, torch runtime).
    """

    def __init__(
        self,
        batch: int = 1,
        *,
        runs: int = 10,
        warmup: int = 3,
        threads: int | None = None,
        fractions: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75),
        channels_last: bool = False,
        runtime: str = "torch",
        tune_pointwise: bool = False,
    ) -> None:
        if runtime not in ("torch", "onnxruntime"):
            raise ValueError(f"runtime must be 'torch' or 'onnxruntime', got {runtime!r}")
        if tune_pointwise and runtime != "torch":
            raise ValueError("tune_pointwise chooses PyTorch executions; ONNX Runtime picks its own kernels")
        self.tune_pointwise = bool(tune_pointwise)
        self.runtime = runtime
        if batch < 1 or runs < 1:
            raise ValueError(f"batch and runs must be >= 1, got batch={batch}, runs={runs}")
        self.batch = int(batch)
        self.runs = int(runs)
        self.warmup = int(warmup)
        self.threads = threads
        self.fractions = tuple(sorted(set(float(f) for f in fractions)))
        self.channels_last = bool(channels_last)

    def config(self) -> dict[str, object]:
        return {"name": type(self).__name__, "batch": self.batch, "runs": self.runs, "fractions": list(self.fractions),
                "channels_last": self.channels_last, "runtime": self.runtime, "tune_pointwise": self.tune_pointwise}

    def deployed(self, module: nn.Module, input_shape: tuple[int, ...], *, inplace: bool = False) -> nn.Module:
        """``module`` as it will run: itself, or with ``tune_pointwise`` a tuned copy (``inplace``:
        the module itself, tuned) whose factorised layers run each 1×1 factor on the execution
        measured faster at this batch and thread count; ``tuned_pointwise`` lists the choices. The
        built-in timers time this; a subclass overriding :meth:`time` calls it to do the same."""
        if not self.tune_pointwise or self.channels_last:
            return module
        if getattr(module, "_tuned_for", None) == self._tuning_key():  # tuned here already (the pipeline's result)
            return module
        from hsc_plugin.cost.timing import num_threads
        from hsc_plugin.modules import FactorisedModule
        from hsc_plugin.tuning import tune_pointwise

        p = next(module.parameters(), None)
        x = torch.randn(self.batch, *input_shape, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
        mode = module.training
        try:
            with num_threads(self.threads):
                tuned = tune_pointwise(module.eval(), x, runs=self.runs, within=FactorisedModule, inplace=inplace)
        finally:
            module.train(mode)
        tuned._tuned_for = self._tuning_key()
        return tuned.train(mode)

    def _tuning_key(self) -> tuple[int, int | None, int]:
        """What a tuning depends on: the batch, the thread count and the timing runs."""
        return (self.batch, self.threads, self.runs)

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        """Median milliseconds of one forward of ``module`` on a ``(batch, *input_shape)`` input."""
        if self.runtime == "onnxruntime":
            from hsc_plugin.cost.ort import ort_latency_ms

            return ort_latency_ms(module, tuple(input_shape), batch=self.batch, runs=self.runs,
                                  warmup=self.warmup, threads=self.threads)
        from hsc_plugin.cost.timing import measure_latency

        return measure_latency(self.deployed(module, tuple(input_shape)), tuple(input_shape), batch=self.batch,
                               runs=self.runs, warmup=self.warmup,
                               threads=self.threads, channels_last=self.channels_last)["median_ms"]

    def time_many(self, modules: dict[str, nn.Module], input_shape: tuple[int, ...], *,
                  block: int = 1) -> dict[str, float]:
        """Median milliseconds of several modules on one input shape. The built-in torch timer runs
        them round-robin (A, B, A, B …: :func:`~hsc_plugin.cost.timing.measure_interleaved`; with
        ``block`` > 1 in warm turns, A A A, B B B …, the first call of each untimed), so a busy
        machine slows every candidate alike instead of faking a speed-up; a subclass that overrides
        :meth:`time` (another device, a fake one) is asked for each in turn."""
        if type(self).time is not LatencyCostModel.time or self.runtime != "torch":
            return {k: self.time(m, input_shape) for k, m in modules.items()}
        from hsc_plugin.cost.timing import measure_interleaved

        modules = {k: self.deployed(m, tuple(input_shape)) for k, m in modules.items()}
        res = measure_interleaved(modules, tuple(input_shape), batch=self.batch, runs=self.runs, warmup=self.warmup,
                                  threads=self.threads, channels_last=self.channels_last, block=block)
        return {k: float(v["median_ms"]) for k, v in res.items()}

    def _samples(self, plan: "LayerPlan") -> list[tuple[int, ...]]:
        samples: dict[tuple[int, ...], None] = {}
        for f in self.fractions:
            # At least rank 1 per block: a block dropped to rank 0 outputs only its bias, which is
            # fast and useless; below the smallest sample the time is held at that sample's, so
            # dropping blocks never looks like a way to save time.
            samples[tuple(b.round(max(b.min_rank, 1, math.ceil(f * b.max_rank))) for b in plan.blocks)] = None
        return list(samples)

    def layer_curves(self, dense: nn.Module,
                     plans: list["LayerPlan"]) -> tuple[float, list[Callable[[list[int]], float]]]:
        """The dense layer's time and each plan's time-vs-ranks curve, all measured together
        (interleaved with the dense layer, see :meth:`time_many`)."""
        modules: dict[str, nn.Module] = {"dense": dense}
        keys: list[list[tuple[str, float]]] = []
        with torch.no_grad():
            for i, plan in enumerate(plans):
                row = []
                for ranks in self._samples(plan):
                    key = f"{i}:{ranks}"
                    modules[key] = plan.build(list(ranks))
                    row.append((key, plan.factorised_cost(list(ranks), "macs")))
                keys.append(row)
            ms = self.time_many(modules, plans[0].info.in_shape if plans else (1,))
        return ms["dense"], [_curve(plan, [(macs, ms[k]) for k, macs in row]) for plan, row in zip(plans, keys)]

    def curve(self, plan: "LayerPlan") -> Callable[[list[int]], float]:
        """Milliseconds of the plan's factorised layer as a function of its ranks."""
        with torch.no_grad():
            ms = self.time_many({str(r): plan.build(list(r)) for r in self._samples(plan)}, plan.info.in_shape)
        return _curve(plan, [(plan.factorised_cost(list(r), "macs"), ms[str(r)]) for r in self._samples(plan)])


def _curve(plan: "LayerPlan", points: list[tuple[float, float]]) -> "_Interpolated":
    points = sorted(points)
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.maximum.accumulate(np.array([p[1] for p in points], dtype=np.float64))  # more MACs never faster
    return _Interpolated(plan, xs, ys)


class _Interpolated:
    """Piecewise-linear time over MACs: constant below the first sample, linear extrapolation
    beyond the last."""

    def __init__(self, plan: "LayerPlan", xs: np.ndarray, ys: np.ndarray) -> None:
        self.plan, self.xs, self.ys = plan, xs, ys
        if len(xs) >= 2 and xs[-1] > xs[0]:
            self.slope = max(0.0, float((ys[-1] - ys[0]) / (xs[-1] - xs[0])))
        else:
            self.slope = 0.0

    def __call__(self, ranks: list[int]) -> float:
        m = self.plan.factorised_cost(ranks, "macs")
        if m > self.xs[-1]:
            return float(self.ys[-1] + self.slope * (m - self.xs[-1]))
        return float(np.interp(m, self.xs, self.ys))

    def points(self) -> list[list[float]]:
        return [[float(x), float(y)] for x, y in zip(self.xs, self.ys)]
