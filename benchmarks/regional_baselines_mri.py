"""What HSC's regional 1×1s on the baselines buy, measured off the calibration data, and why
data-free Tucker-2 is the baseline they sit on (brain-MRI AlexNet, committed checkpoint).

1. Held out: the candidates are chosen by their output error on the calibration images, on which
   the regional 1×1s are also fitted, so the in-sample gain is optimistic. For HSC with and without
   ``regional_baselines`` at 3×, 6× and 10× fewer MACs, the relative output (logit) error against
   the uncompressed model on the calibration images and on the test images (no labels used).
2. Factors at equal ranks: data-free and data-aware Tucker-2 each at their own allocation and at the
   other's ranks (a rank selector that returns given ranks), so the factors are compared without
   the allocation: which one tracks the model's output error.

Run on an idle machine (about 3 minutes):

    python benchmarks/regional_baselines_mri.py --data ../shared/data/brain-mri-128 --out benchmarks/results/regional_baselines_mri.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

import torch

from _common import checkpoint_model_and_data, emit, logit_error  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import compress
from hsc_plugin.mri.experiment import evaluate_model
from hsc_plugin.mri.report import machine_description
from hsc_plugin.strategy import RankSelector


class GivenRanks(RankSelector):
    """Every layer at the ranks another run chose (layers it kept dense: full rank)."""

    name = "given"

    def __init__(self, ranks: dict[str, list[int]]) -> None:
        self.ranks = ranks

    def select(self, problem: Any) -> list[list[int]]:
        return [list(self.ranks.get(p.name, p.full_ranks())) for p in problem.plans]


def _ranks(report: Any) -> dict[str, list[int]]:
    out = {}
    for L in report.layers:
        if L.status == "factorised":
            out[L.name] = [L.ranks["out"], L.ranks["in"]] if "out" in L.ranks else [L.ranks["rank"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _, test, calib = checkpoint_model_and_data(args.data)
    x_test = test.tensors[0]

    lines = [f"Command: `python benchmarks/regional_baselines_mri.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description().rsplit(',', 1)[0]}\n",
             "Output error: relative squared error of the logits against the uncompressed model, "
             "‖f(x) − f̂(x)‖² / ‖f(x)‖², on the 256 calibration images and on the 1281 test images "
             "(no labels). Compress-only, every option at its default except the one named.\n",
             "## 1. HSC with and without the regional 1×1s on the baselines\n",
             "| budget | regional_baselines | allocation kept | output error, calibration | output error, test | "
             "accuracy % (± SE) | M params |",
             "|---|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        for on in (True, False):
            res = compress(model, "hsc", calib=calib, budget=ratio, seed=0, progress=False, regional_baselines=on)
            ev = evaluate_model(res.model, test, n_boot=1000)
            params = sum(p.numel() for p in res.model.parameters()) / 1e6
            lines.append(f"| {ratio:g}x | {on} | {res.report.allocation} | {logit_error(model, res.model, calib):.4f} | "
                         f"{logit_error(model, res.model, x_test):.4f} | {100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | "
                         f"{params:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "## 2. Tucker-2 factors at equal ranks\n",
              "Each row: whose factors (data-free: HOOI on the weights; data-aware: output factor from the "
              "output moment, input factor whitened by the input channel moment) at whose ranks (each "
              "method's own allocation for the budget). Sequential refit and BN re-estimation as by "
              "default.\n",
              "| budget | factors | ranks of | output error, calibration | output error, test |",
              "|---|---|---|---|---|"]
    for ratio in args.ratios:
        own = {}
        for kind, opts in (("data-free", {}), ("data-aware", {"data_aware": True})):
            own[kind] = _ranks(compress(model, "tucker2", calib=calib, budget=ratio, seed=0, progress=False,
                                        **opts).report)
        for kind, opts in (("data-free", {}), ("data-aware", {"data_aware": True})):
            for src in ("data-free", "data-aware"):
                res = compress(model, "tucker2", calib=calib, seed=0, progress=False, rank=GivenRanks(own[src]),
                               **opts)
                lines.append(f"| {ratio:g}x | {kind} | {src} | {logit_error(model, res.model, calib):.4f} | "
                             f"{logit_error(model, res.model, x_test):.4f} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
