"""HSC's smallest region side (``min_region``) on the brain-MRI AlexNet: output error, accuracy, time.

A region runs as its own crop (re-reading the kernel's halo), its own kernels and a concatenation,
and its factors are fitted on its positions alone. This compresses the committed MRI checkpoint
(128 px input: a 32×32 map after the first conv, 16×16 after the second, 8×8 after the other three)
with HSC at each ``min_region`` — 4 lets every map have 2×2 regions (of 4 to 16 pixels a side), 8
the first two maps, 16 the first only — and with the data-aware baselines as yardsticks. Per model: the allocation HSC kept and
the layers it split into regions, the output (logit) error against the uncompressed model on the
1281 test images, the test accuracy ± bootstrap SE, and the warm speed-up over the uncompressed
model at batch 1 and 32 (turns interleaved with the dense model, median and quartiles). The paper's
scale (512 px, where the same rule keeps regions on the 127×127 and 63×63 maps) is
``paper_scale_settings.py --settings hsc hsc-mr4`` (``paper_scale_selection.md``).

Run on an idle machine (about 4 minutes):

    python benchmarks/min_region_mri.py --data ../shared/data/brain-mri-128 --out benchmarks/results/min_region_mri.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from _common import checkpoint_model_and_data, emit, logit_error  # benchmarks/_common.py (scripts run from this folder)
from paper_scale import warm_speedups
from hsc_plugin import compress
from hsc_plugin.mri.experiment import evaluate_model
from hsc_plugin.mri.report import machine_description


def _regional(report) -> str:
    """The layers whose chosen form has more than one region (its tiling), with that form."""
    out = [f"{ly.name} ({ly.details.get('form')})" for ly in report.layers
           if len((ly.details.get("tiling") or {}).get("regions", [])) > 1]
    return "; ".join(out) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0])
    ap.add_argument("--min-regions", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--runs", type=int, default=15, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, test, calib = checkpoint_model_and_data(args.data)
    x_test = test.tensors[0]

    lines = [f"Command: `python benchmarks/min_region_mri.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             "Output error: ‖f(x) − f̂(x)‖² / ‖f(x)‖² of the logits against the uncompressed model on the test "
             "images. Speed-up: uncompressed time / compressed time, warm turns interleaved, median [quartiles]. "
             "256 calibration images, seed 0, compress-only, other options at their defaults.\n",
             "| budget | method | allocation kept | layers with regions | output error, test | accuracy % (± SE) | "
             "b1 speed-up | b32 speed-up | compress s |",
             "|---|---|---|---|---|---|---|---|---|"]
    runs: list[tuple[str, dict]] = [("tucker2", {"data_aware": True}), ("global_svd", {"data_aware": True})]
    runs += [("hsc", {"min_region": m}) for m in args.min_regions]
    for ratio in args.ratios:
        for method, options in runs:
            t0 = time.perf_counter()
            res = compress(model, method, calib=calib, budget=ratio, seed=0, progress=False, **options)
            seconds = time.perf_counter() - t0
            ev = evaluate_model(res.model, test, n_boot=1000)
            speed = {b: warm_speedups(model, {"c": res.model}, x_test[:b], args.runs)["c"] for b in (1, 32)}
            label = method + "".join(f", {k}={v}" for k, v in options.items())
            lines.append(f"| {ratio:g}x | {label} | {res.report.allocation or method} | {_regional(res.report)} | "
                         f"{logit_error(model, res.model, x_test):.4f} | "
                         f"{100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | "
                         + " | ".join(f"{q[1]:.2f}× [{q[0]:.2f}, {q[2]:.2f}]" for q in speed.values())
                         + f" | {seconds:.0f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
