"""The paper's scale: torchvision AlexNet (4 classes) at 512 px, every method, MAC and latency budgets.

Weights are untrained (seeded): a conv's run time depends only on its shapes (channels, kernel,
ranks, input size), never on the values of its weights, so an untrained model times exactly as a
trained one. The ranks a data-aware method picks do depend on the weights and the calibration
activations; those are MRI images upsampled to 512 px and repeated to 3 channels.

Timings interleave dense and compressed runs (dense, compressed, dense, …) after a warm-up so slow
drifts of a shared machine hit both alike; speed-up is the per-pair ratio, median with quartiles.

    python benchmarks/paper_scale.py --data ../shared/data/brain-mri-128
    python benchmarks/paper_scale.py --size 128 --runs 3 --methods global_svd --budgets 3x --batches 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from hsc_plugin import Budget, BudgetError, LatencyCostModel, compress, measure_costs  # noqa: E402

METHODS = {
    "hsc": ("hsc", {}),
    "global_svd": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {"data_aware": True}),
}
BUDGETS = {"3x": (3.0, "macs"), "6x": (6.0, "macs"), "lat2x": (2.0, "latency"), "lat3x": (3.0, "latency")}
PAPER = "paper (HSC, 8.21 GFLOPs AlexNet): 1.38× measured speed-up, 26 % of the MAC ratio"


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def interleaved_speedup(dense: nn.Module, comp: nn.Module, x: torch.Tensor, runs: int, warmup: int = 2) -> tuple[float, float, float]:
    """Quartiles of dense_time / compressed_time over ``runs`` interleaved pairs."""
    ratios = []
    with torch.inference_mode():
        for _ in range(warmup):
            dense(x), comp(x)
        for _ in range(runs):
            t0 = time.perf_counter(); dense(x); t1 = time.perf_counter(); comp(x); t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
    return _quartiles(ratios)


def warm_speedups(dense: nn.Module, models: dict[str, nn.Module], x: torch.Tensor, runs: int, block: int = 3,
                  warmup: int = 1) -> dict[str, tuple[float, float, float]]:
    """Per model, quartiles of dense_time / its time over ``runs`` rounds of warm turns (each round
    a dense turn, then one of every model): each model runs ``block`` times in a row and all but the
    first call are timed (the first refills the caches the other model evicted), as the closed
    latency loop measures (``hsc_plugin.latency_loop``)."""

    def turn(m: nn.Module) -> float:
        m(x)
        t0 = time.perf_counter()
        for _ in range(block - 1):
            m(x)
        return time.perf_counter() - t0

    ratios: dict[str, list[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for i in range(warmup + runs):
            d = turn(dense)
            for n, m in models.items():
                t = turn(m)
                if i >= warmup:
                    ratios[n].append(d / t)
    return {n: _quartiles(r) for n, r in ratios.items()}


def warm_speedup(dense: nn.Module, comp: nn.Module, x: torch.Tensor, runs: int, block: int = 3,
                 warmup: int = 1) -> tuple[float, float, float]:
    """:func:`warm_speedups` of one compressed model."""
    return warm_speedups(dense, {"comp": comp}, x, runs, block, warmup)["comp"]


def calibration(data: str, n: int, size: int) -> torch.Tensor:
    from hsc_plugin.mri import load_split
    from hsc_plugin.mri.experiment import calibration_subset

    return upsampled(calibration_subset(load_split(data, "train", 128), n, 0), size)


def upsampled(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey MRI images as the paper-scale AlexNet's input: resized to ``size`` px, 3 channels."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def paper_model(data: str, n_calib: int, size: int) -> tuple[nn.Module, torch.Tensor, int]:
    """The seeded untrained AlexNet (4 classes), its calibration images and its dense MACs."""
    import torchvision

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    base = torchvision.models.alexnet(weights=None, num_classes=4).eval()
    calib = calibration(data, n_calib, size)
    return base, calib, measure_costs(base, calib[:1]).macs


def benchmark_model(name: str, data: str, n_calib: int | None, size: int) -> tuple[nn.Module, torch.Tensor, int, str]:
    """``"alexnet"``: :func:`paper_model` (``n_calib`` images, 32 by default); ``"mri"``: the committed
    MRI checkpoint with its calibration images (256 by default). Returns the model, calibration
    images, dense MACs and a title."""
    if name == "mri":
        from _common import checkpoint_model_and_data

        base, _, _, calib = checkpoint_model_and_data(data)
        calib = calib[:n_calib or 256]
        return (base, calib, measure_costs(base, calib[:1]).macs,
                f"the MRI AlexNet (committed checkpoint, {calib.shape[-1]} px, 1 channel)")
    base, calib, macs = paper_model(data, n_calib or 32, size)
    return base, calib, macs, f"AlexNet, 4 classes, {size} px (the paper's scale)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--tune-pointwise", action="store_true",
                    help="latency budgets: LatencyCostModel(tune_pointwise=True); the dense model as it is")
    ap.add_argument("--out", default=None, help="e.g. benchmarks/results/paper_scale.md")
    args = ap.parse_args()
    base, calib, dense_macs = paper_model(args.data, args.calib, args.size)
    threads = torch.get_num_threads()
    lines = [f"# Paper scale: torchvision AlexNet, 4 classes, {args.size} px, {dense_macs / 1e9:.2f} GMACs dense", "",
             "Weights are untrained (seeded, `weights=None`): run time depends only on layer shapes and ranks, "
             "not on learned values. Calibration: "
             f"{args.calib} MRI images upsampled to {args.size} px, 3 channels. Threads: {threads}. "
             f"Timings interleaved, {args.runs} pairs after warm-up; speed-up median [q1, q3]. `warm speed-up`: "
             f"{args.runs} pairs of warm turns (each model 3 calls in a row, the first untimed: it refills the "
             "caches the other model flushed), as the closed latency loop times a round.", "",
             f"Command: `python benchmarks/paper_scale.py {' '.join(sys.argv[1:])}`", "", PAPER, "",
             "| method | budget | batch | layout | MAC ratio | speed-up | warm speed-up | share of MAC ratio "
             "| ORT speed-up (CPU EP) | allocation kept (forms per layer) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ort_ok = not args.no_ort
    if ort_ok:
        try:
            from hsc_plugin.cost.ort import ort_interleaved
        except ImportError:
            ort_ok = False
    cache: dict[tuple, nn.Module | str] = {}
    kept: dict[tuple, str] = {}  # which candidate allocation the method kept, and its layers' forms
    for mname in args.methods:
        method, kw = METHODS[mname]
        for bname in args.budgets:
            ratio, metric = BUDGETS[bname]
            for batch in args.batches:
                for layout in args.layouts:
                    cl = layout == "channels_last"
                    if metric == "latency":
                        budget = Budget(ratio, metric="latency")
                        extra = {"cost_model": LatencyCostModel(batch, channels_last=cl,
                                                                tune_pointwise=args.tune_pointwise)}
                    else:
                        budget, extra = Budget(ratio), {}
                    key = (mname, bname) if metric == "macs" else (mname, bname, batch, layout)
                    if key not in cache:  # a MAC budget's model does not depend on the timing config
                        try:
                            res = compress(base, method, calib=calib, budget=budget, progress=False, **kw, **extra)
                            cache[key] = res.model.eval()
                            forms = Counter(L.details.get("form") or L.module for L in res.report.layers
                                            if L.status == "factorised")
                            kept[key] = f"{res.report.allocation}: " + "; ".join(f"{n}× {f}" for f, n in forms.items())
                            mm = (res.report.latency or {}).get("pointwise_matmul")
                            if mm is not None:
                                kept[key] += f"; {len(mm)} 1x1 factor(s) as a matmul"
                            loop = (res.report.latency or {}).get("rounds") or []
                            if loop:  # the closed loop's whole-model speed-ups, as the compressor measured them
                                kept[key] += "; closed loop " + " → ".join(
                                    f"{r['speedup']:.2f}×" + (" (fastest)" if r.get("fastest") else "")
                                    + (" (kept)" if r.get("kept") else "") for r in loop)
                        except BudgetError as e:  # a refusal is a result: say it in the table
                            cache[key] = str(e)
                    comp = cache[key]
                    if isinstance(comp, str):
                        lines.append(f"| {mname} | {bname} | {batch} | {layout} | refused: {comp} | | | | | |")
                        print(lines[-1], flush=True)
                        continue
                    macs = dense_macs / measure_costs(comp, calib[:1]).macs
                    x = torch.randn(batch, 3, args.size, args.size)
                    d, c = base, comp
                    if cl:
                        d = copy.deepcopy(base).to(memory_format=torch.channels_last)
                        c = copy.deepcopy(comp).to(memory_format=torch.channels_last)
                        x = x.contiguous(memory_format=torch.channels_last)
                    q1, med, q3 = interleaved_speedup(d, c, x, args.runs)
                    w1, wmed, w3 = warm_speedup(d, c, x, args.runs)
                    ort = "–"
                    if ort_ok and not cl:  # ORT has one layout; its sessions interleaved like torch's
                        t = ort_interleaved({"dense": base, "comp": comp}, (3, args.size, args.size),
                                            batches=(batch,), runs=args.runs, threads=threads)[batch]
                        disturbed = t["dense"]["disturbed"] or t["comp"]["disturbed"]
                        ort = "disturbed" if disturbed else f"{t['dense']['median_ms'] / t['comp']['median_ms']:.2f}×"
                    lines.append(f"| {mname} | {bname} | {batch} | {layout} | {macs:.2f}× | {med:.2f}× [{q1:.2f}, {q3:.2f}] "
                                 f"| {wmed:.2f}× [{w1:.2f}, {w3:.2f}] | {100 * med / macs:.0f} % | {ort} "
                                 f"| {kept.get(key, '')} |")
                    print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
