"""CPU latency of saved compressed brain-MRI models (from ``hsc_mri.py --save-models DIR``).

Run it on an idle machine: 2 threads, batch 1 and 32, median of 20 runs after 3 warm-up rounds,
each model timed interleaved with the uncompressed one (dense, model, dense, ...), so a busy
moment hits both alike; a timing whose spread says the machine was busy is printed "disturbed".

    python benchmarks/latency_mri.py --models DIR [--size 128 --width 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from _common import emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import load, measure_costs
from hsc_plugin.cost.timing import measure_interleaved, speedup_text
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
    dense_macs = measure_costs(base, torch.zeros(1, *shape)).macs
    lines = [f"Command: `python benchmarks/latency_mri.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             "Each model timed interleaved with the uncompressed one; speed-up = dense median / model median "
             "of the same interleaved runs.\n",
             "| model | MMACs | MAC ratio | ms b1 | speed-up b1 | ms b32 | speed-up b32 | realised / MAC ratio (b1, b32) |",
             "|---|---|---|---|---|---|---|---|"]

    def measure(name: str, model: torch.nn.Module) -> None:
        macs = measure_costs(model, torch.zeros(1, *shape)).macs
        r = dense_macs / macs
        cells, shares = [], []
        for batch in (1, 32):
            models = {"dense": base} if model is base else {"dense": base, "model": model}
            t = measure_interleaved(models, shape, batch=batch, runs=args.runs)
            mine = t["model" if "model" in t else "dense"]
            text = speedup_text(t["dense"], mine, r)
            cells += [f"{mine['median_ms']:.3f}", text]
            shares.append("-" if not text[0].isdigit() else f"{t['dense']['median_ms'] / mine['median_ms'] / r:.0%}")
        lines.append(f"| {name} | {macs / 1e6:.2f} | {r:.2f}x | {' | '.join(cells)} | {', '.join(shares)} |")
        print(lines[-1], flush=True)

    measure("uncompressed", base)
    for d in sorted(p for p in Path(args.models).iterdir() if (p / "structure.json").exists()):
        measure(d.name, load(d, alexnet_mri(width=args.width, input_size=args.size)).eval())
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
