"""CPU latency of saved compressed brain-MRI models (from ``hsc_mri.py --save-models DIR``).

Run it on an idle machine: 2 threads, batch 1 and 32, median of 20 runs after 5 warm-up runs,
against the uncompressed model measured in the same process.

    python benchmarks/latency_mri.py --models DIR [--size 128 --width 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _common import emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import load, measure_costs
from hsc_plugin.latency import measure_latency
from hsc_plugin.mri import alexnet_mri, paper_recipe
from hsc_plugin.mri.report import machine_description


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True)
    ap.add_argument("--size", type=int, default=paper_recipe().input_size)
    ap.add_argument("--width", type=float, default=paper_recipe().width)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", help="markdown file to write")
    args = ap.parse_args(argv)
    shape = (1, args.size, args.size)
    base = alexnet_mri(width=args.width, input_size=args.size).eval()
    rows = []

    def measure(name: str, model: torch.nn.Module) -> None:
        macs = measure_costs(model, torch.zeros(1, *shape)).macs
        t1 = measure_latency(model, shape, batch=1, runs=args.runs)["median_ms"]
        t32 = measure_latency(model, shape, batch=32, runs=args.runs)["median_ms"]
        rows.append((name, macs, t1, t32))
        print(f"{name:<60} {macs / 1e6:8.2f} MMACs  b1 {t1:8.3f} ms  b32 {t32:8.2f} ms", flush=True)

    measure("uncompressed", base)
    for d in sorted(p for p in Path(args.models).iterdir() if (p / "structure.json").exists()):
        measure(d.name, load(d, alexnet_mri(width=args.width, input_size=args.size)).eval())
    _, m0, b1, b32 = rows[0]
    lines = [f"Command: `python benchmarks/latency_mri.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             "| model | MMACs | MAC ratio | ms b1 | speed-up b1 | ms b32 | speed-up b32 | realised / MAC ratio (b1, b32) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, macs, t1, t32 in rows:
        r = m0 / macs
        lines.append(f"| {name} | {macs / 1e6:.2f} | {r:.2f}x | {t1:.3f} | {b1 / t1:.2f}x | {t32:.2f} | {b32 / t32:.2f}x | "
                     f"{b1 / t1 / r:.0%}, {b32 / t32 / r:.0%} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
