"""Which fine-tuning recipe helps a compressed brain-MRI AlexNet, and which hurts it?

Compresses the committed checkpoint with data-aware Global SVD at each ratio (no fine-tuning:
the near-optimal starting point), then fine-tunes a copy for ``--epochs`` with each recipe
(distillation from the original, as ``hsc reproduce`` does) and prints the test accuracy.
``lr 1e-9`` rows change no weight: they show what re-estimating BatchNorm statistics alone does.
This is the measurement behind ``run_comparison``'s fine-tuning default (SGD, lr 1e-3, no
augmentation).

    python benchmarks/finetune_recipes_mri.py --data ../shared/data/brain-mri-128 [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from _common import checkpoint_model_and_data, emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import Budget, compress
from hsc_plugin.mri.experiment import evaluate_model
from hsc_plugin.mri.report import machine_description
from hsc_plugin.mri.train import finetune

# (optimizer, lr, augment)
RECIPES = [("adamw", 5e-4, True), ("adamw", 1e-4, True), ("adamw", 2e-5, True), ("sgd", 1e-3, True),
           ("sgd", 1e-3, False), ("sgd", 1e-9, True), ("sgd", 1e-9, False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    model, train, test, calib = checkpoint_model_and_data(args.data)
    lines = [f"Command: `python benchmarks/finetune_recipes_mri.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             f"Data-aware Global SVD, then {args.epochs} epoch(s) of distillation fine-tuning (batch 64, cosine "
             "schedule, seed 0); test accuracy ± bootstrap SE (1000 resamples).\n",
             "| budget | model | optimizer | lr | augmentation | accuracy % (± SE) | seconds |", "|---|---|---|---|---|---|---|"]
    base = evaluate_model(model, test)
    lines.append(f"| 1x | uncompressed | - | - | - | {100 * base['accuracy']:.2f} ± {100 * base['accuracy_se']:.2f} | - |")
    print(lines[-1], flush=True)
    for ratio in args.ratios:
        res = compress(model, "global_svd", calib=calib, budget=Budget(ratio), data_aware=True, progress=False)
        ev = evaluate_model(res.model, test)
        lines.append(f"| {ratio:g}x | compress-only | - | - | - | {100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | - |")
        print(lines[-1], flush=True)
        for opt, lr, aug in RECIPES:
            t0 = time.perf_counter()
            tuned = finetune(copy.deepcopy(res.model), train, epochs=args.epochs, lr=lr, optimizer=opt, augment=aug,
                             teacher=model, seed=0, progress=False)
            ev = evaluate_model(tuned, test)
            lines.append(f"| {ratio:g}x | fine-tuned | {opt} | {lr:g} | {'yes' if aug else 'no'} | "
                         f"{100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | {time.perf_counter() - t0:.0f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
