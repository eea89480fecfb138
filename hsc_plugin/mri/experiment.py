"""The comparison at the heart of the paper: compress one trained classifier with every method at
the same budgets and measure what matters (accuracy with bootstrap SEs, macro-F1, per-class F1,
MACs, parameters, measured CPU latency, compression time and memory).

Used by ``benchmarks/hsc_mri.py``, ``hsc demo`` and ``hsc reproduce``.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hsc_plugin.api import compress
from hsc_plugin.budget import Budget
from hsc_plugin.cost.macs import measure_costs
from hsc_plugin.cost.ort import ort_available, ort_interleaved
from hsc_plugin.cost.timing import measure_interleaved
from hsc_plugin.deploy import fold_bn
from hsc_plugin.mri.data import CLASSES
from hsc_plugin.mri.metrics import bootstrap_se, classification_metrics
from hsc_plugin.mri.report import speedup_cell
from hsc_plugin.mri.train import evaluate, finetune

__all__ = ["Setting", "DEFAULT_SETTINGS", "PAPER_SETTINGS", "QUICK_SETTINGS", "evaluate_model", "run_comparison", "calibration_subset"]


@dataclass(frozen=True)
class Setting:
    """One compressor configuration of the comparison."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


# HSC settings span the three levels: regions (none / grid / quadtree), clusters, channel side. The
# region settings take regions of 4 pixels and up (``min_region=4``): at this net's 128 px input the
# default (16) would leave every map but the first whole, and these rows study the regions.
DEFAULT_SETTINGS: tuple[Setting, ...] = (
    Setting("global_svd (data-free)", "global_svd"),
    Setting("global_svd (data-aware)", "global_svd", {"data_aware": True}),
    Setting("tucker2 (data-free)", "tucker2"),
    Setting("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    Setting("hsc 1x1 regions, 4 input clusters", "hsc", {"partition": "none", "channel_side": "input", "n_clusters": 4}),
    Setting("hsc 2x2 regions, 1 cluster", "hsc", {"grid": (2, 2), "clusterer": "single", "channel_side": "output", "min_region": 4}),
    Setting("hsc 2x2 regions, 4 output clusters", "hsc", {"grid": (2, 2), "channel_side": "output", "n_clusters": 4, "min_region": 4}),
    Setting("hsc 2x2 regions, 2 input clusters", "hsc", {"grid": (2, 2), "channel_side": "input", "n_clusters": 2, "min_region": 4}),
    Setting("hsc 2x2 regions, 4 input clusters", "hsc", {"grid": (2, 2), "channel_side": "input", "n_clusters": 4, "min_region": 4}),
    Setting("hsc quadtree, 4 input clusters", "hsc", {"partition": "quadtree", "channel_side": "input", "n_clusters": 4, "min_region": 4}),
)

# The reproduction: both baselines both ways, HSC's defaults (every form competing, its baselines'
# allocations among the candidates) and HSC's regions alone (the form of the paper, for contrast).
PAPER_SETTINGS: tuple[Setting, ...] = (
    Setting("global_svd (data-free)", "global_svd"),
    Setting("global_svd (data-aware)", "global_svd", {"data_aware": True}),
    Setting("tucker2 (data-free)", "tucker2"),
    Setting("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    Setting("hsc (defaults)", "hsc"),
    Setting("hsc regions only (2x2 regions, 4 input clusters)", "hsc", {"alternatives": False, "min_region": 4}),
)

QUICK_SETTINGS: tuple[Setting, ...] = (
    Setting("global_svd (data-aware)", "global_svd", {"data_aware": True}),
    Setting("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    Setting("hsc (defaults)", "hsc"),
)


def calibration_subset(data: TensorDataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded training images (without labels) for calibration."""
    x = data.tensors[0]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx]


def evaluate_model(model: nn.Module, test: TensorDataset, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class F1 and their bootstrap standard errors on ``test``."""
    y_true, y_pred = evaluate(model, test)
    m = classification_metrics(y_true, y_pred, len(CLASSES))
    se = bootstrap_se(y_true, y_pred, len(CLASSES), n_resamples=n_boot, seed=seed)
    out = {"accuracy": m["accuracy"], "accuracy_se": se["accuracy"], "macro_f1": m["macro_f1"],
           "macro_f1_se": se["macro_f1"], "metrics": m, "bootstrap_se": se}
    for i, name in enumerate(CLASSES):
        out[f"f1_{name}"] = _per_class(m, "f1", i)
        out[f"f1_{name}_se"] = _per_class(se, "f1", i)
    return out


def _per_class(d: dict[str, Any], key: str, i: int) -> float:
    v = d[key]
    return float(v[i] if isinstance(v, (list, tuple)) else v.get(i, v.get(str(i))))


def model_slug(label: str, ratio: float) -> str:
    """Folder name of a saved compressed model (``run_comparison(save_dir=...)``)."""
    return f"{ratio:g}x-" + "".join(ch if ch.isalnum() else "_" for ch in label)


LATENCY_CONFIGS: tuple[tuple[int, bool], ...] = ((1, False), (32, False), (1, True), (32, True))
"""(batch, channels_last) of the latency columns."""


LATENCY_THREADS = 2
"""CPU threads of every latency column (``measure_interleaved``'s default; ORT's intra-op threads)."""

ORT_BATCHES: tuple[int, ...] = (1, 32)
"""Batch sizes of the ONNX Runtime column."""


def latency_columns(model: nn.Module, input_shape: tuple[int, ...], runs: int,
                    dense: nn.Module | None = None, ort: bool = False) -> dict[str, Any]:
    """The table's latency columns: CPU ms (2 threads, median of ``runs`` after warm-up) at batch 1
    and 32, in the default NCHW layout and in channels_last (model and input), the layout a CPU
    deployment should use: PyTorch's NCHW max-pool alone took a quarter of the uncompressed model's
    time at batch 32 here; with ``ort``, the same in ONNX Runtime (:func:`ort_columns`).

    With ``dense`` (the uncompressed model) each configuration times the two interleaved (dense,
    model, dense, ...), so a load spike hits both alike instead of becoming a speed-up; the row
    keeps the dense median it is compared with (``dense_latency_*_ms``). ``latency_*_disturbed``
    says the spread of a timing was too wide to trust (the table then prints "disturbed").
    """
    out: dict[str, Any] = {}
    for batch, cl in LATENCY_CONFIGS:
        key = f"latency{'_cl' if cl else ''}_b{batch}"
        models = {"model": model} if dense is None else {"dense": dense, "model": model}
        t = measure_interleaved(models, input_shape, batch=batch, runs=runs, channels_last=cl)
        out[f"{key}_ms"] = t["model"]["median_ms"]
        out[f"{key}_disturbed"] = any(bool(v["disturbed"]) for v in t.values())
        if dense is not None:
            out[f"dense_{key}_ms"] = t["dense"]["median_ms"]
    if ort:
        out.update(ort_columns(model, input_shape, runs, dense))
    return out


def ort_columns(model: nn.Module, input_shape: tuple[int, ...], runs: int,
                dense: nn.Module | None = None) -> dict[str, Any]:
    """The ONNX Runtime column: the model (and ``dense``) with BatchNorm folded (``fold_bn``, as a
    deployment would), exported the way hsc_plugin exports, one CPU session each with
    :data:`LATENCY_THREADS` intra-op threads, timed interleaved at :data:`ORT_BATCHES` (medians of
    ``runs``). Fields ``ort_b{n}_ms``, ``ort_b{n}_disturbed``, ``dense_ort_b{n}_ms`` and
    ``ort_exporter``; ``ort_note`` instead when it could not be measured (the table says why)."""
    if not ort_available():
        return {"ort_note": "not measured (onnxruntime not installed)"}
    models = {"model": fold_bn(model)} if dense is None else {"dense": fold_bn(dense), "model": fold_bn(model)}
    try:
        res = ort_interleaved(models, input_shape, batches=ORT_BATCHES, runs=runs, threads=LATENCY_THREADS)
    except Exception as exc:  # an export that fails is a result, not the end of the latency pass
        first = (str(exc).splitlines() or [""])[0][:120]
        return {"ort_note": f"not measured ({type(exc).__name__}: {first})"}
    out: dict[str, Any] = {"ort_exporter": res[ORT_BATCHES[0]]["model"]["exporter"]}
    for batch, t in res.items():
        out[f"ort_b{batch}_ms"] = t["model"]["median_ms"]
        out[f"ort_b{batch}_disturbed"] = any(bool(v["disturbed"]) for v in t.values())
        if dense is not None:
            out[f"dense_ort_b{batch}_ms"] = t["dense"]["median_ms"]
    return out


def _costs_and_latency(model: nn.Module, input_shape: tuple[int, ...], latency: bool, runs: int,
                       dense: nn.Module | None = None, ort: bool = False) -> dict[str, Any]:
    c = measure_costs(model, torch.zeros(1, *input_shape))
    row: dict[str, Any] = {"macs": c.macs, "params": c.params}
    if latency:
        row.update(latency_columns(model, input_shape, runs, dense, ort))
    return row


def _timing_warnings(row: dict[str, Any], base: dict[str, Any]) -> str:
    """What a compressed row's timings should not be trusted for, or ''."""
    notes = []
    keys = [(f"latency{'_cl' if cl else ''}_b{batch}_ms", f"{'NHWC ' if cl else ''}b{batch}")
            for batch, cl in LATENCY_CONFIGS] + [(f"ort_b{b}_ms", f"ORT b{b}") for b in ORT_BATCHES]
    for key, name in keys:
        text = speedup_cell(row, base, key)
        if text == "disturbed" or "suspect" in text:
            notes.append(f"{name} {text}")
    return f"  timing: {'; '.join(notes)}" if notes else ""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_comparison(
    model: nn.Module,
    train: TensorDataset,
    test: TensorDataset,
    *,
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS,
    ratios: tuple[float, ...] = (3.0, 6.0),
    n_calib: int = 256,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-3,
    finetune_optimizer: str = "sgd",
    finetune_augment: bool = False,
    latency: bool = True,
    latency_runs: int = 20,
    ort: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool | None = True,
    log: Callable[[str], None] = print,
    save_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Rows for the original model and for every (setting, ratio): compress-only, and fine-tuned
    (distilled from the original) when ``finetune_epochs > 0``. The fine-tuning default (SGD,
    lr 1e-3, no augmentation) is what did not hurt a near-optimal data-aware model on brain-MRI:
    AdamW (lr 5e-4 to 2e-5) or augmented batches (which also re-estimate BatchNorm statistics on
    a shifted distribution) cost 0.7-1.5 points at 3x (benchmarks/results/finetune_recipes_mri.md). ``save_dir`` keeps every
    compressed model (``hsc_plugin.save`` format). ``ort`` adds the ONNX Runtime latency column
    (:func:`ort_columns`) when ``latency``."""
    model = model.eval()
    input_shape = tuple(test.tensors[0].shape[1:])
    calib = calibration_subset(train, n_calib, seed)
    base = {"method": "original", "setting": "uncompressed", "ratio": 1.0, "stage": "-"}
    t0 = time.perf_counter()
    base.update(_costs_and_latency(model, input_shape, latency, latency_runs, ort=ort))
    base.update(evaluate_model(model, test, n_boot=n_boot, seed=seed))
    rows = [base]
    log(f"original: acc {base['accuracy']:.4f}  MACs {base['macs']:,}  "
        f"(evaluate{' + time' if latency else ''} {time.perf_counter() - t0:.1f}s)")
    for ratio in ratios:
        for s in settings:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            try:
                result = compress(model, s.method, calib=calib, budget=Budget(ratio), seed=seed,
                                  progress=progress, **s.options)
            except ValueError as exc:  # a budget a method cannot meet is a result, not a crash
                log(f"{s.label} @ {ratio:g}x: {exc}")
                rows.append({"method": s.method, "setting": s.label, "ratio": ratio, "stage": "failed",
                             "error": str(exc)})
                continue
            seconds = time.perf_counter() - t0
            if save_dir is not None:  # for measuring latency later, on an idle machine
                from hsc_plugin.serialization import save

                save(result, f"{save_dir}/{model_slug(s.label, ratio)}")
            row = {"method": s.method, "setting": s.label, "ratio": ratio, "stage": "compress-only",
                   "options": s.options, "compress_s": seconds, "peak_rss_mb": _peak_rss_mb(),
                   "achieved_ratio": result.report.achieved_ratio,
                   # which candidate allocation was kept, and every candidate's calibration output error
                   "allocation": result.report.allocation, "calibration_error": result.report.calibration_error,
                   "candidates": dict(result.report.candidates)}
            row.update(_costs_and_latency(result.model, input_shape, latency, latency_runs, dense=model, ort=ort))
            row.update(evaluate_model(result.model, test, n_boot=n_boot, seed=seed))
            rows.append(row)
            log(f"{s.label} @ {ratio:g}x: acc {row['accuracy']:.4f}  MACs {row['macs']:,}  "
                f"(compress {seconds:.1f}s, evaluate{' + time against the original' if latency else ''} "
                f"{time.perf_counter() - t0 - seconds:.1f}s){_timing_warnings(row, base)}")
            if finetune_epochs > 0:
                t1 = time.perf_counter()
                tuned = finetune(copy.deepcopy(result.model), train, epochs=finetune_epochs, lr=finetune_lr,
                                 optimizer=finetune_optimizer, augment=finetune_augment, teacher=model, seed=seed,
                                 progress=progress)
                ft = dict(row, stage="fine-tuned")  # same modules as compress-only: same MACs and timings
                ft.update(evaluate_model(tuned, test, n_boot=n_boot, seed=seed))
                rows.append(ft)
                log(f"  fine-tuned: acc {ft['accuracy']:.4f}  ({time.perf_counter() - t1:.1f}s)")
    return rows
