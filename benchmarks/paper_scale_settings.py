"""Compressor settings compared at the paper's scale, in output error and in time.

The default settings ask what HSC's capped choice among its candidates costs. HSC builds several
candidate allocations (its own, and the Global SVD and Tucker-2 baselines it contains), recovers
each label-free and keeps the one with the lowest output error. That stage is capped at
``selection_gmacs`` (2000 GMACs of forward passes by default): past it, only the winner is refitted,
or no candidate is. The single-method compressors have one candidate and stay under the cap with
their refit. This compresses the paper-scale AlexNet (4 classes, 512 px, untrained seeded weights,
MRI calibration images upsampled) at one MAC budget with HSC as capped by default, HSC uncapped
(``selection_gmacs=None``: every candidate refitted) and the data-aware baselines, then gives each
model's output error against the dense model (relative L2 of the logits) on the calibration images
and on held-out test images, the time compression took, and its warm speed-up over the dense model
(interleaved, quartiles) at batch 1 and 8 in both layouts. The ``-q16`` settings ask what ranks
rounded to multiples of 16 (``rank_multiple=16``: one AVX-512 register of float32) buy in time and
cost in error.

Untrained weights: the output errors say how well each method reproduces this network's function on
these images, not how a trained net's accuracy would move; the times depend only on the shapes.

    python benchmarks/paper_scale_settings.py --data ../shared/data/brain-mri-128 --out benchmarks/results/paper_scale_selection.md
    python benchmarks/paper_scale_settings.py --data ../shared/data/brain-mri-128 --settings hsc hsc-q16 tucker2 \
        tucker2-q16 global_svd global_svd-q16 --out benchmarks/results/paper_scale_rank_multiple.md
    python benchmarks/paper_scale_settings.py --data ../shared/data/brain-mri-128 --settings hsc-uncapped-q16 \
        tucker2 tucker2-q16 --out benchmarks/results/paper_scale_uncapped_q16.md
    python benchmarks/paper_scale_settings.py --data ../shared/data/brain-mri-128 --settings hsc hsc-mr4 \
        hsc-uncapped tucker2 global_svd   # paper_scale_selection.md, third pass (min_region 16 vs 4)
    python benchmarks/paper_scale_settings.py --size 128 --runs 3 --batches 1 --layouts nchw
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from paper_scale import paper_model, upsampled, warm_speedups  # noqa: E402

from hsc_plugin import Budget, compress, measure_costs  # noqa: E402
from hsc_plugin.recovery import output_error  # noqa: E402

SETTINGS: dict[str, tuple[str, str, dict]] = {  # name → (label, method, options)
    "hsc": ("hsc (defaults)", "hsc", {}),
    "hsc-uncapped": ("hsc, selection_gmacs=None", "hsc", {"selection_gmacs": None}),
    "hsc-mr4": ("hsc, min_region=4 (the default before 2026-12-07)", "hsc", {"min_region": 4}),
    "tucker2": ("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    "global_svd": ("global_svd (data-aware)", "global_svd", {"data_aware": True}),
    "hsc-q16": ("hsc, rank_multiple=16", "hsc", {"rank_multiple": 16}),
    "tucker2-q16": ("tucker2 (data-aware), rank_multiple=16", "tucker2", {"data_aware": True, "rank_multiple": 16}),
    "global_svd-q16": ("global_svd (data-aware), rank_multiple=16", "global_svd",
                       {"data_aware": True, "rank_multiple": 16}),
    "hsc-uncapped-q16": ("hsc, selection_gmacs=None, rank_multiple=16", "hsc",
                         {"selection_gmacs": None, "rank_multiple": 16}),
}
DEFAULT = ["hsc", "hsc-uncapped", "tucker2", "global_svd"]


def held_out(data: str, n: int, size: int) -> torch.Tensor:
    """The first ``n / classes`` test images of each class, upsampled and repeated as the calibration is."""
    from hsc_plugin.mri import load_split

    x, y = load_split(data, "test", 128).tensors
    classes = y.unique()
    return upsampled(x[torch.cat([torch.nonzero(y == c).flatten()[: max(1, n // len(classes))] for c in classes])],
                     size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--settings", nargs="+", default=DEFAULT, choices=list(SETTINGS))
    ap.add_argument("--budget", type=float, default=6.0, help="fewer MACs, whole model")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--held", type=int, default=32, help="held-out test images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, calib, dense_macs = paper_model(args.data, args.calib, args.size)
    test = held_out(args.data, args.held, args.size)
    built, rows = {}, {}
    for key in args.settings:
        name, method, kw = SETTINGS[key]
        t0 = time.perf_counter()
        res = compress(base, method, calib=calib, budget=Budget(args.budget), progress=False, **kw)
        seconds = time.perf_counter() - t0
        model = res.model.eval()
        stage = (res.report.recovery or {}).get("selection") or {}
        with torch.inference_mode():
            errs = (output_error(base, model, calib), output_error(base, model, test))
        ran = f"{stage.get('refit', '–')}, {stage.get('samples', '–')} of {stage.get('asked_samples', '–')}"
        rows[name] = (f"{dense_macs / measure_costs(model, calib[:1]).macs:.2f}×", res.report.allocation or method,
                      ran, f"{errs[0]:.4f}", f"{errs[1]:.4f}", f"{seconds:.0f}")
        built[name] = model
        print(name, rows[name], flush=True)
    speed: dict[str, list[str]] = {n: [] for n in built}
    configs = [(b, lay) for b in args.batches for lay in args.layouts]
    for batch, layout in configs:
        cl = layout == "channels_last"
        fmt = torch.channels_last if cl else torch.contiguous_format
        dense = copy.deepcopy(base).to(memory_format=fmt) if cl else base
        models = {n: copy.deepcopy(m).to(memory_format=fmt) if cl else m for n, m in built.items()}
        x = torch.randn(batch, 3, args.size, args.size).contiguous(memory_format=fmt)
        with torch.inference_mode():
            got = warm_speedups(dense, models, x, args.runs)
        for n, (q1, med, q3) in got.items():
            speed[n].append(f"{med:.2f}× [{q1:.2f}, {q3:.2f}]")
        print(batch, layout, {n: v[-1] for n, v in speed.items()}, flush=True)
    head = " | ".join(f"b{b} {lay}" for b, lay in configs)
    lines = [f"# Settings at the paper's scale: AlexNet, 4 classes, {args.size} px, {args.budget:g}× fewer MACs", "",
             f"Command: `python benchmarks/paper_scale_settings.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Untrained seeded weights; calibration: "
             f"{args.calib} MRI training images, held out: {test.shape[0]} MRI test images, both upsampled to "
             f"{args.size} px. `error`: relative L2 of the logits against the dense model's. `stage`: how the "
             "recovery-and-choice stage ran (`each`: every candidate refitted; `winner`: only the candidate with the "
             "lowest error before its refit; `none`), on how many calibration samples. Speed-ups: warm turns "
             f"interleaved with the dense model, {args.runs} rounds, median [q1, q3].", "",
             "| setting | MAC ratio | allocation kept | stage | error, calibration | error, held out | compress s | "
             f"{head} |",
             "|---" * (7 + len(configs)) + "|"]
    for n, r in rows.items():
        lines.append(f"| {n} | " + " | ".join(r) + " | " + " | ".join(speed[n]) + " |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
