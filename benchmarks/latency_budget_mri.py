"""Budgets in measured time instead of MACs, on the brain-MRI AlexNet.

For each method and each latency target (``Budget(r, metric="latency")``: r× faster, measured
on this machine by the per-layer cost model at the given batch), compress the committed
checkpoint without fine-tuning and report test accuracy, the MAC ratio that resulted, the
latency the cost model predicted and the latency measured afterwards on the whole model
(2 threads, median of 20 runs, interleaved with the original model: "disturbed" when the spread
says the machine was busy), and the share of the MAC ratio realised as speed.

HSC's rows: by default (``alternatives=True``) each layer's form — the 2×2 regions, one region
with its input clusters, or plain data-aware SVD — is chosen by measured time at the budget;
``alternatives=False`` forces the regions (the pre-choice behaviour). The ``forms`` column counts
the forms the factorised convs took.

Run it on an idle machine:

    python benchmarks/latency_budget_mri.py --data ../shared/data/brain-mri-128 [--ratios 1.25 1.5 2] [--batches 1 32] [--channels-last]

``--latency-rounds 0 3`` compares the open loop (the per-layer prediction alone) with the closed loop
(the whole model timed after each allocation and the selection re-aimed, at most 3 times:
:mod:`hsc_plugin.latency_loop`); ``--methods`` picks rows by a word of their label (e.g. ``global_svd``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections import Counter

import torch

from _common import checkpoint_model_and_data, emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import Budget, BudgetError, LatencyCostModel, compress, measure_costs
from hsc_plugin.cost.timing import measure_interleaved, speedup_text
from hsc_plugin.mri.experiment import evaluate_model
from hsc_plugin.mri.report import machine_description

METHODS = {
    "global_svd (data-aware)": ("global_svd", {"data_aware": True}),
    "tucker2 (data-aware)": ("tucker2", {"data_aware": True}),
    "hsc 1 region, 4 input clusters (alternatives=False)": ("hsc", {"partition": "none", "alternatives": False}),
    "hsc defaults (forms chosen by time)": ("hsc", {}),
    "hsc, 2x2 regions forced (alternatives=False)": ("hsc", {"alternatives": False}),
}


def _forms(report) -> str:
    """How many factorised convs took each form (HSC), e.g. '3 SVD, 1 one-region'."""
    short = {"SVD": "SVD", "regions": "regions", "region,": "one-region"}  # first match wins
    counts: Counter[str] = Counter()
    for L in report.layers:
        form = (L.details or {}).get("form") if L.status == "factorised" else None
        if form:
            counts[next(v for k, v in short.items() if k in form)] += 1
    return ", ".join(f"{n} {k}" for k, n in counts.most_common()) or "-"



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--channels-last", action="store_true", help="time models and the cost model in NHWC")
    ap.add_argument("--methods", nargs="+", help="only the rows whose label contains one of these words")
    ap.add_argument("--latency-rounds", type=int, nargs="+", default=[3],
                    help="closed-loop rounds to compare (0: open loop)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", help="said after the machine line (e.g. that it was shared)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = {k: v for k, v in METHODS.items() if not args.methods or any(w in k for w in args.methods)}
    model, train, test, calib = checkpoint_model_and_data(args.data)
    shape = tuple(test.tensors[0].shape[1:])
    macs0 = measure_costs(model, torch.zeros(1, *shape)).macs
    lines = [f"Command: `python benchmarks/latency_budget_mri.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description().rsplit(',', 1)[0]}, latency measured with {args.threads}"
             + (f"; {args.note}" if args.note else "") + "\n",
             f"Layout: {'channels_last (NHWC) model and input' if args.channels_last else 'NCHW'}\n",
             "No fine-tuning. `predicted` is the cost model's estimate used for the allocation; `measured` is the "
             f"whole compressed model timed afterwards, interleaved with the original ({args.threads} threads, "
             "medians; "
             "`ms before` is the original's time in the same runs). Realised = measured speed-up / MAC ratio. "
             "`speed-up warm`: the same pair timed in alternating warm turns (each model 3 calls in a row, the "
             "first untimed), as the closed loop times a round. "
             "`rounds`: the allocation's closed-loop rounds (0: open loop), with the whole-model speed-up the "
             "cost model measured in each.\n",
             "| method | batch | latency budget | rounds | accuracy % (± SE) | MAC ratio | ms before | ms predicted | "
             "ms measured | speed-up measured | speed-up warm | realised / MAC ratio | layers kept dense for time | "
             "HSC forms | compress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch in args.batches:
        for label, (method, opts) in methods.items():
            for r, rounds in ((r, n) for r in args.ratios for n in args.latency_rounds):
                t0 = time.perf_counter()
                try:
                    res = compress(model, method, calib=calib, budget=Budget(r, metric="latency"), progress=False,
                                   cost_model=LatencyCostModel(batch, threads=args.threads,
                                                               channels_last=args.channels_last),
                                   latency_rounds=rounds, **opts)
                except BudgetError as exc:
                    lines.append(f"| {label} | {batch} | {r:g}x | {rounds} | - | - | - | - | - | - | - | - | "
                                 f"{str(exc).replace('|', '/')} | - | - |")  # the reason, with its numbers
                    print(lines[-1], flush=True)
                    continue
                secs = time.perf_counter() - t0
                ev = evaluate_model(res.model, test, n_boot=1000)
                macs = measure_costs(res.model, torch.zeros(1, *shape)).macs
                t = measure_interleaved({"dense": model, "model": res.model}, shape, batch=batch, runs=args.runs,
                                        threads=args.threads,
                                        channels_last=args.channels_last)  # a busy moment hits both alike
                base_ms, ms = t["dense"]["median_ms"], t["model"]["median_ms"]
                w = measure_interleaved({"dense": model, "model": res.model}, shape, batch=batch, runs=args.runs,
                                        threads=args.threads, channels_last=args.channels_last, block=3)
                warm = speedup_text(w["dense"], w["model"], mac_ratio=None)
                lat = res.report.latency or {}
                kept = sum(1 for L in res.report.layers if "measured time" in L.reason)
                mac_ratio = macs0 / macs
                speed = speedup_text(t["dense"], t["model"], mac_ratio)
                realised = f"{base_ms / ms / mac_ratio:.0%}" if speed[0].isdigit() else "-"
                loop = " → ".join(f"{q['speedup']:.2f}x{' (fastest)' if q.get('fastest') else ''}"
                                  for q in lat.get("rounds", []))
                lines.append(
                    f"| {label} | {batch} | {r:g}x | {rounds}{f' ({loop})' if loop else ''} | "
                    f"{100 * ev['accuracy']:.2f} ± {100 * ev['accuracy_se']:.2f} | "
                    f"{mac_ratio:.2f}x | {base_ms:.3f} | {lat.get('predicted_after_ms', float('nan')):.3f} | {ms:.3f} | "
                    f"{speed} | {warm} | {realised} | {kept} | "
                    f"{_forms(res.report) if method == 'hsc' else '-'} | {secs:.1f} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
