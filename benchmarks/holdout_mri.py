"""Choosing HSC's candidate allocation on held-out calibration images (``holdout``) against choosing
it on the images every candidate was fitted to (brain-MRI AlexNet, committed checkpoint).

HSC compares candidate allocations — its own, the baselines', the baselines' with a 1×1 fitted per
region — by their output error on the calibration images. The factors, the regional 1×1s and the
sequential refit are fitted on those same images, and a candidate with more fitted parameters looks
better there than it is. With ``holdout=f`` the first f × 256 images are held out of every fit and
the candidates are compared on them alone. Per calibration size, budget and holdout: the candidate
kept, its output (logit) error against the uncompressed model on the 1281 test images (no labels),
the test accuracy ± bootstrap SE, and the compress time. Compress-only, other options at their
defaults.

Run on an idle machine (about 8 minutes):

    python benchmarks/holdout_mri.py --data ../shared/data/brain-mri-128 --out benchmarks/results/holdout_mri.md
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import checkpoint_model_and_data, emit, logit_error  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import compress
from hsc_plugin.mri.experiment import calibration_subset, evaluate_model
from hsc_plugin.mri.report import machine_description


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    ap.add_argument("--calib", type=int, nargs="+", default=[64, 256], help="calibration images (seeded subsets)")
    ap.add_argument("--holdouts", type=float, nargs="+", default=[0.0, 0.25])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, train, test, _ = checkpoint_model_and_data(args.data)
    x_test = test.tensors[0]

    lines = [f"Command: `python benchmarks/holdout_mri.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description().rsplit(',', 1)[0]}\n",
             "Output error: ‖f(x) − f̂(x)‖² / ‖f(x)‖² of the logits against the uncompressed model. "
             "`choice error`: the kept candidate's error as HSC compared it (on the held-out images with a "
             "holdout, else on the fitting images).\n",
             "| calibration images | budget | holdout | allocation kept | choice error | output error, test | "
             "accuracy % (± SE) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for n in args.calib:
        calib = calibration_subset(train, n, 0)
        for ratio in args.ratios:
            for h in args.holdouts:
                res = compress(model, "hsc", calib=calib, budget=ratio, seed=0, progress=False, holdout=h)
                ev = evaluate_model(res.model, test, n_boot=1000)
                lines.append(f"| {n} | {ratio:g}x | {h:g} | {res.report.allocation} | "
                             f"{res.report.calibration_error:.4f} | {logit_error(model, res.model, x_test):.4f} | "
                             f"{100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | {res.report.seconds:.1f} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
