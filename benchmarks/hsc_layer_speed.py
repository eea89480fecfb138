"""Which execution of a factorised layer is fast on this machine? One layer at a time.

For every conv layer of the brain-MRI AlexNet (128 px, width 0.5) compressed on its own to
``--ratio`` fewer MACs, time (2 threads, batch 1 and 32, median of ``--runs`` runs after warm-up)
the dense layer and the alternatives issue #3 asks to try:

* one-region SVD (k×k conv to rank r, then 1×1) — with ranks as chosen, and rounded to multiples
  of 8 (``rank_multiple=8``);
* HSC with one region and balanced input clusters (one grouped k×k conv + one 1×1);
* HSC with 2×2 regions run as a loop of crops (output-side clusters and input-side clusters);
* each of the above in channels_last memory format.

Run it on an idle machine (every other process slows small kernels unevenly):

    python benchmarks/hsc_layer_speed.py [--ratio 6] [--runs 30] [--out benchmarks/results/hsc_layer_speed.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from _common import emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import Budget, compress, measure_costs
from hsc_plugin.latency import measure_latency
from hsc_plugin.mri import alexnet_mri
from hsc_plugin.mri.report import machine_description

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "alexnet_mri-128-w0.5-e40-s0.pt"

VARIANTS: dict[str, tuple[str, dict]] = {
    "svd (1 region)": ("global_svd", {"data_aware": True}),
    "svd, ranks multiple of 8": ("global_svd", {"data_aware": True, "rank_multiple": 8}),
    "hsc 1 region, 4 balanced input clusters": ("hsc", {"partition": "none", "n_clusters": 4, "balanced": True}),
    "hsc 2x2 regions, 1 cluster (loop)": ("hsc", {"grid": (2, 2), "clusterer": "single", "channel_side": "output"}),
    "hsc 2x2 regions, 4 input clusters (loop)": ("hsc", {"grid": (2, 2), "n_clusters": 4}),
}


def _layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
    """Every conv with the input it sees on ``x``."""
    seen: list[tuple[str, nn.Conv2d, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, mod, inp[0].detach())))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _time(module: nn.Module, shape: tuple[int, ...], batch: int, runs: int, channels_last: bool) -> float:
    m = module.to(memory_format=torch.channels_last) if channels_last else module
    return measure_latency(m, shape, batch=batch, runs=runs, warmup=5, threads=2, channels_last=channels_last)["median_ms"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calib", type=int, default=64, help="random-crop calibration images (real MRI if --data)")
    ap.add_argument("--data", help="brain-MRI folder for calibration images (default: the bundled sample)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = alexnet_mri(width=0.5, input_size=128)
    if CHECKPOINT.is_file():
        model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    model.eval()
    from hsc_plugin.mri.data import bundled_sample_path, load_split

    images = load_split(args.data or bundled_sample_path(), "train", 128).tensors[0][: args.calib]
    rows = []
    failed: list[tuple[str, tuple[int, ...], str, str]] = []
    for name, conv, inp in _layers(model, images):
        shape = tuple(inp.shape[1:])
        dense_macs = measure_costs(conv, inp[:1]).macs
        results = {}
        for label, (method, opts) in VARIANTS.items():
            try:
                # one layer is coarse (rank steps of 8 move its MACs by more than 2%): 10% tolerance
                res = compress(nn.Sequential(conv), method, calib=inp, progress=False, dense_fallback=False,
                               budget=Budget(args.ratio, scope="targets", tolerance=0.1), **opts)
            except ValueError as exc:
                results[label] = (None, str(exc).split(";")[0])
                print(f"{name:<12} {label:<42} not run: {results[label][1]}", flush=True)
                failed.append((name, tuple(shape), label, results[label][1]))
                continue
            results[label] = (res.model, measure_costs(res.model, inp[:1]).macs)
        for batch in (1, 32):
            for cl in (False, True):
                base = _time(conv, shape, batch, args.runs, cl)
                for label, (mod, macs) in results.items():
                    if mod is None:
                        continue
                    t = _time(mod, shape, batch, args.runs, cl)
                    rows.append((name, tuple(shape), batch, cl, label, dense_macs / macs, base, t))
                    print(f"{name:<12} b{batch:<3} {'NHWC' if cl else 'NCHW'} {label:<42} "
                          f"{dense_macs / macs:5.2f}x MACs  dense {base:7.3f} ms  {t:7.3f} ms  {base / t:5.2f}x",
                          flush=True)
    lines = [f"Command: `python benchmarks/hsc_layer_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             "One conv layer of the brain-MRI AlexNet at a time, compressed alone to the MAC ratio shown; "
             "speed-up = dense ms / factorised ms (2 threads, median).\n",
             "| layer | input | batch | layout | variant | MAC ratio | dense ms | factorised ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, shape, batch, cl, label, r, base, t in rows:
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {batch} | {'channels_last' if cl else 'NCHW'} | "
                     f"{label} | {r:.2f}x | {base:.3f} | {t:.3f} | {base / t:.2f}x |")
    if failed:
        lines += ["", "Variants that could not be built at this budget:", ""]
        lines += [f"- {name} ({'x'.join(map(str, shape))}), {label}: {why}" for name, shape, label, why in failed]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
