"""Issue 14.5's case, run after run: HSC 1.5x on timm vgg11 (random weights) calibrated on 8 MRI
images at 64 px; each run's seconds, peak RSS and whether a decomposition needed a fallback.

The failure it guards against (``linalg.eigh`` not converging on low-rank moments of deep layers on
2x2 maps) came once in about four runs; ``tests/test_robust_eigh.py -m slow`` asserts ten in a row.
This prints what each run costs, which the test does not. The RSS printed is the process's peak so
far: over runs in one process it grows (9 → 19 GB over six runs here) although no tensor outlives a
compress call (``gc`` finds none, checked on resnet18) — the C allocator keeps freed heap memory —
so run a long series as several processes (``--first`` continues the seeds).

    python benchmarks/vgg11_runs.py --data ../shared/data/brain-mri-128 --runs 10
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--first", type=int, default=0, help="seed of the first run (to continue a series in a new process)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import timm

    from hsc_plugin import Budget, compress
    from hsc_plugin.mri import load_split

    torch.set_num_threads(args.threads)
    data = load_split(args.data, "train", 64)
    x = torch.stack([data[i][0] for i in range(0, 8 * 37, 37)]).repeat(1, 3, 1, 1)  # as the slow test
    for run in range(args.first, args.first + args.runs):
        torch.manual_seed(run)
        model = timm.create_model("vgg11", pretrained=False, num_classes=4).eval()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = compress(model, "hsc", calib=x, budget=Budget(1.5), progress=False)
        fallbacks = [str(w.message)[:80] for w in caught if "fallback" in str(w.message)]
        print(f"run {run}: ok, budget met {res.report.budget_met}, {time.perf_counter() - t0:.0f} s, "
              f"process peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB, "
              f"allocation {res.report.allocation}, fallbacks {len(fallbacks)} {fallbacks[:1]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
