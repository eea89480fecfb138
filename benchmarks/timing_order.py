"""How the timing protocol moves a measured speed-up: interleaved, back-to-back, and interleaved
with the caches flushed before every run.

The paper-scale benchmark interleaves dense and compressed runs (dense, compressed, dense, …) so a
shared machine's drifts hit both alike; the compressor's closed loop times one model in consecutive
runs, as a deployed model runs. At batch 1 the two disagree (``results/paper_scale.md``). This
script times one compressed paper-scale AlexNet all three ways: if interleaving costs the small
model its warm caches, the flushed protocol reads like the interleaved one and back-to-back higher.

    python benchmarks/timing_order.py --data ../shared/data/brain-mri-128 [--method global_svd]
                                      [--budget 6] [--batch 1] [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_scale import METHODS, calibration  # noqa: E402

from hsc_plugin import Budget, compress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--method", default="global_svd", choices=list(METHODS))
    ap.add_argument("--budget", type=float, default=6.0, help="fewer MACs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--flush-mb", type=int, default=256, help="buffer written before each flushed run")
    args = ap.parse_args()
    import torchvision

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    dense = torchvision.models.alexnet(weights=None, num_classes=4).eval()
    method, kw = METHODS[args.method]
    comp = compress(dense, method, calib=calibration(args.data, 32, 512), budget=Budget(args.budget),
                    progress=False, **kw).model.eval()
    x = torch.randn(args.batch, 3, 512, 512)
    flush = torch.empty(args.flush_mb * 2**18)  # float32: 4 bytes each

    def run(model: torch.nn.Module, flushed: bool = False) -> float:
        if flushed:
            flush.add_(1.0)  # writes the whole buffer: evicts what the last run left in cache
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0

    med = statistics.median
    with torch.inference_mode():
        for _ in range(3):
            run(dense), run(comp)
        interleaved = [run(dense) / run(comp) for _ in range(args.runs)]
        dense_b2b = [run(dense) for _ in range(args.runs)]
        comp_b2b = [run(comp) for _ in range(args.runs)]
        flushed = [run(dense, True) / run(comp, True) for _ in range(args.runs)]
    print(f"{args.method} at {args.budget:g}x fewer MACs, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"medians of {args.runs}:")
    print(f"  interleaved                     {med(interleaved):.2f}x")
    print(f"  back-to-back                    {med(dense_b2b) / med(comp_b2b):.2f}x  "
          f"(dense {1e3 * med(dense_b2b):.1f} ms, compressed {1e3 * med(comp_b2b):.1f} ms)")
    print(f"  interleaved, caches flushed     {med(flushed):.2f}x")


if __name__ == "__main__":
    main()
