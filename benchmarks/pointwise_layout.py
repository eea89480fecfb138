"""Thin 1×1 convs in NCHW, channels_last and as a plain matmul (PyTorch CPU kernels).

Factorised layers are chains of thin convs. At the paper's scale Tucker-2 lost its speed in NCHW at
batch 8 (``results/paper_scale.md``); this times the 1×1 shapes such a model runs — the last factor of
Tucker-2 on AlexNet's second conv at 512 px (20 → 192 channels at 63×63) and a reducing one — in the
three executions, so the kernel behind it can be checked on any machine and PyTorch version.

    python benchmarks/pointwise_layout.py [--runs 20] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import median_ms  # benchmarks/_common.py (scripts run from this folder)

# (batch, C_in, C_out, map side)
SHAPES = [(1, 64, 20, 63), (8, 64, 20, 63), (8, 192, 40, 31), (8, 40, 192, 31), (1, 20, 192, 63), (8, 20, 192, 63)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} runs (ms)")
    print("| batch | C_in → C_out | map | NCHW conv | channels_last conv | matmul |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for n, ci, co, hw in SHAPES:
            x = torch.randn(n, ci, hw, hw)
            w = torch.randn(co, ci, 1, 1)
            xc = x.contiguous(memory_format=torch.channels_last)
            nchw = median_ms(lambda: F.conv2d(x, w), args.runs)
            nhwc = median_ms(lambda: F.conv2d(xc, w), args.runs)
            mm = median_ms(lambda: torch.matmul(w.view(co, ci), x.view(n, ci, hw * hw)), args.runs)
            print(f"| {n} | {ci} → {co} | {hw}×{hw} | {nchw:.2f} | {nhwc:.2f} | {mm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
