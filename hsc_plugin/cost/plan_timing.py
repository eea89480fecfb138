"""Latency side of the pipeline: timing every plan's forms on this device (the latency metric)
and the guard that keeps dense any built module measured slower than the layer it replaces."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hsc_plugin.budget import BudgetError
from hsc_plugin.calibration import LayerInfo, progress_enabled
from hsc_plugin.cost.latency_model import LatencyCostModel
from hsc_plugin.cost.timing import measure_latency
from hsc_plugin.plan import LayerPlan
from hsc_plugin.report import LayerReport, layer_report


def points(plan: LayerPlan) -> list[list[float]]:
    """The (MACs, ms) samples of a plan's measured latency curve, for the report."""
    return getattr(plan.measured_costs.get("latency"), "points", lambda: [])()


def time_plans(name: str, progress: Any, dense_fallback: bool, cm: LatencyCostModel, candidates: list[list[LayerPlan]], work: nn.Module,
                infos: dict[str, LayerInfo], target_names: list[str], example: torch.Tensor,
                reports: dict[str, LayerReport], before: Any) -> tuple[list[list[LayerPlan]], dict[str, Any]]:
    """Time the model, every target layer and every form of every plan at a few ranks (the
    latency metric); drop the forms whose cheapest factorisation is not faster here, and keep
    dense the layers left with none."""
    shape = tuple(example.shape[1:])
    dense_ms: dict[str, float] = {}
    kept: list[list[LayerPlan]] = []
    by_name = {forms[0].name: forms for forms in candidates}
    bar = tqdm(target_names, desc=f"{name}: timing", unit="layer", leave=False,
               disable=not progress_enabled(progress))
    with torch.no_grad():
        for n in bar:
            forms = by_name.get(n)
            if forms is None:
                dense_ms[n] = cm.time(infos[n].module, infos[n].in_shape)
                continue
            dense_ms[n], curves = cm.layer_curves(infos[n].module, forms)  # timed together, interleaved
            fast: list[LayerPlan] = []
            fastest = math.inf
            for p, curve in zip(forms, curves):
                p.dense_cost["latency"] = dense_ms[n]
                p.measured_costs["latency"] = curve
                ms = p.metric_cost(p.min_ranks(), "latency")
                fastest = min(fastest, ms)
                if not (dense_fallback and ms >= dense_ms[n]):
                    fast.append(p)
            if not fast:
                reports[n] = layer_report(
                    n, infos[n].module, "dense",
                    f"factorising does not pay in measured time: the smallest rank takes {fastest:.4f} ms "
                    f">= dense {dense_ms[n]:.4f} ms (batch {cm.batch})", before.module_macs.get(n, 0))
                continue
            kept.append(fast)
        model_ms = cm.time(work, shape)  # after the layers: their kernels are warm by now
    # Additive model: time = what the target layers take alone + the rest (pooling, norms,
    # launches). Layers timed alone can sum to more than the model (caches are colder), so
    # the rest is clipped at zero and ratios are taken against the model's own prediction.
    targets_ms = float(sum(dense_ms.values()))
    rest_ms = max(0.0, model_ms - targets_ms)
    latency = {"batch": cm.batch, "device": str(example.device), "before_ms": model_ms,
               "predicted_before_ms": rest_ms + targets_ms, "targets_before_ms": targets_ms,
               "cost_model": cm.config(),
               "layers": {forms[0].name: {"dense_ms": dense_ms[forms[0].name], "curve_macs_ms": points(forms[0])}
                          for forms in kept}}
    for forms in kept:
        if len(forms) > 1:  # every form's curve; compress() records which one was chosen
            latency["layers"][forms[0].name]["forms"] = {p.form or str(i): points(p) for i, p in enumerate(forms)}
    if not kept:
        raise BudgetError("No targeted layer is faster factorised than dense on this device "
                          f"(batch {cm.batch}); a latency budget cannot be met by factorising")
    return kept, latency

def measured_slower(latency_batch: int, new_modules: dict[str, nn.Module], infos: dict[str, LayerInfo]) -> dict[str, str]:
    """Layers whose factorised module is not faster than the dense layer, measured here."""
    out: dict[str, str] = {}
    for name, new in new_modules.items():
        info = infos[name]
        kw = {"batch": latency_batch, "runs": 15, "warmup": 3, "threads": None}
        dense = measure_latency(info.module, info.in_shape, **kw)["median_ms"]
        fact = measure_latency(new, info.in_shape, **kw)["median_ms"]
        if fact >= dense:
            out[name] = (f"factorised form measured slower here ({fact:.3f} ms vs {dense:.3f} ms dense "
                         f"at batch {latency_batch}); kept dense")
    return out

