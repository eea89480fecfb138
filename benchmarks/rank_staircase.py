"""Time of a factor's conv against its rank: the staircase that ``rank_multiple`` aligns ranks to.

A CPU conv kernel computes output channels in blocks of one vector register (8 float32 with AVX2,
16 with AVX-512), so a rank just above a multiple of the block can cost as much as the next
multiple. For the factor shapes of the paper-scale AlexNet (the k×k stage of an SVD or a Tucker-2
core, C_in → r; the 1×1 that maps r back, r → C_out), this times each rank from 8 to 128 in steps of
8, every rank of a shape in one interleaved run, and prints the time per output channel (µs) and
the time against the rank rounded up to the next multiple of 16.

    python benchmarks/rank_staircase.py --out benchmarks/results/rank_staircase.md
    python benchmarks/rank_staircase.py --runs 3 --layouts nchw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from hsc_plugin.cost.timing import round_robin  # noqa: E402

# (what it is, C_in or None for "the rank", C_out or None, kernel, map side) at 512 px, batch 1.
SHAPES = [
    ("features.6 k×k stage, 192 → r, 3×3", 192, None, 3, 33),
    ("features.8 k×k stage, 384 → r, 3×3", 384, None, 3, 33),
    ("features.10 region crop, 256 → r, 3×3", 256, None, 3, 17),
    ("features.8 expansion, r → 256, 1×1", None, 256, 1, 31),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", nargs="+", type=int, default=list(range(8, 129, 8)))
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    caps = torch.backends.cpu.get_cpu_capability()
    lines = [f"# Conv time against rank (batch {args.batch}, {torch.get_num_threads()} threads, CPU capability {caps})",
             "", f"Command: `python benchmarks/rank_staircase.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}. Every rank of a shape timed in one interleaved run ({args.runs} rounds, "
             "3 calls per turn, the first untimed); each cell: µs per output channel (the 1×1's: per input channel), "
             "then in brackets this rank's time over the time at the next multiple of 16 (> 1: rounding the rank up "
             "to the multiple would be faster).", "",
             "| layout | shape | " + " | ".join(f"r={r}" for r in args.ranks) + " |",
             "|---|---|" + "---|" * len(args.ranks)]
    up = {r: -(-r // 16) * 16 for r in args.ranks}  # the next multiple of 16
    need = sorted(set(args.ranks) | set(up.values()))
    for layout in args.layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for label, cin, cout, k, side in SHAPES:
            calls = {}
            for r in need:
                ci, co = (cin, r) if cin is not None else (r, cout)
                x = torch.randn(args.batch, ci, side, side).contiguous(memory_format=fmt)
                w = torch.randn(co, ci, k, k).contiguous(memory_format=fmt)
                calls[r] = lambda x=x, w=w: F.conv2d(x, w)
            with torch.inference_mode():
                t = round_robin(calls, runs=args.runs, warmup=3, block=3)
            cells = []
            for r in args.ranks:
                ms = t[r]["median_ms"]
                cells.append(f"{1e3 * ms / r:.1f} ({ms / t[up[r]]['median_ms']:.2f})")
            lines.append(f"| {layout} | {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
