"""Time and memory at scale: compress timm ``resnet50`` (224×224) with each method at 3× fewer MACs.

Each method runs in its own subprocess, so the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` in the
child) is that method's alone. Calibration: 256 images drawn from a standard normal (seeded) —
timing and memory do not depend on what the pixels show, and no image set is needed. The model
has random weights (``pretrained=False``); the work per layer does not depend on the weights.

Targets (issue #6): HSC within 3 minutes and 6 GB peak on 2 CPU cores. The child's address space
is capped (``--mem-cap-gb``) so that a method that does not fit fails with an allocation error
instead of taking a shared machine down; the table then says so.

    python benchmarks/resnet50_scale.py [--images 256] [--threads 2] [--methods hsc,global_svd,...]
                                        [--out benchmarks/results/resnet50_scale.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from typing import Any

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "global_svd data-aware": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {}),
    "hsc": ("hsc", {}),
    "hsc output-side": ("hsc", {"channel_side": "output"}),
    # the quadtree needs 2^max_depth = 4 cells a side: ~6 GB of statistics on resnet50, gathered
    # in groups of layers under max_stats_gb (default 4 GiB), one calibration pass per group
    "hsc quadtree": ("hsc", {"partition": "quadtree"}),
}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def hsc_statistics_gb(model: Any, example: Any, options: dict[str, Any]) -> float:
    """Bytes of HSC's first-pass statistics (per-cell C×C float64 second moments), all layers
    together — what ``max_stats_gb`` splits into groups."""
    from torch import nn

    from hsc_plugin import create_compressor
    from hsc_plugin.calibration import trace_layers

    hsc = create_compressor("hsc", **options)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    total = sum(hsc.statistics_bytes(info) for info in trace_layers(model, names, example).values())
    return total / 1024**3


def child(label: str, images: int, threads: int, cap_gb: float) -> dict[str, Any]:
    if cap_gb > 0:
        cap = int(cap_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import timm
    import torch

    from hsc_plugin import Budget, compress

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False).eval()
    calib = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    method, opts = METHODS[label]
    row: dict[str, Any] = {"method": label, "rss_before_gb": _peak_rss_gb()}
    if method == "hsc":
        row["stats_estimate_gb"] = hsc_statistics_gb(model, calib[:1], opts)
    t0 = time.perf_counter()
    try:
        res = compress(model, method, calib=calib, budget=Budget(3.0), progress=False, **opts)
        row.update(ok=True, achieved=res.report.achieved_ratio, macs_after=res.report.macs_after,
                   macs_before=res.report.macs_before, allocation=res.report.allocation,
                   selection=(res.report.recovery or {}).get("selection"))
    except (MemoryError, RuntimeError) as exc:  # the address-space cap: an allocation failed
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                   where=traceback.extract_tb(exc.__traceback__)[-2:][0].name)
    row["seconds"] = time.perf_counter() - t0
    row["peak_rss_gb"] = _peak_rss_gb()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    ap.add_argument("--mem-cap-gb", type=float, default=12.0, help="address-space cap per child (0: none)")
    ap.add_argument("--out", help="markdown file to write")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.images, args.threads, args.mem_cap_gb)))
        return 0

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for label in args.methods.split(","):
        if label not in METHODS:
            raise SystemExit(f"unknown method {label!r}; choose from {list(METHODS)}")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", label, "--images", str(args.images),
                              "--threads", str(args.threads), "--mem-cap-gb", str(args.mem_cap_gb)],
                             capture_output=True, text=True, env=env)
        try:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"method": label, "ok": False, "error": f"child exited {out.returncode}: {out.stderr[-300:]}",
                   "seconds": float("nan"), "peak_rss_gb": float("nan")}
        row["process_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)

    cmd = "python benchmarks/resnet50_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{cmd.strip()}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {args.threads}, "
        f"Python {platform.python_version()}. timm resnet50 (random weights), 224×224, {args.images} "
        "calibration images from a standard normal, budget 3× fewer MACs, every option at its default. "
        f"Each method in its own process; address space capped at {args.mem_cap_gb:g} GB. "
        "Wall times are upper bounds when other jobs share the machine (say so below when they did).",
        "",
        "| method | ok | compress wall time (s) | peak RSS (GB) | RSS before compress (GB) | achieved | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        note = r.get("error", "")
        if "stats_estimate_gb" in r:
            note = (f"first-pass statistics ≈ {r['stats_estimate_gb']:.1f} GB (float64); " + note).strip("; ")
        sel = r.get("selection")
        if sel:  # how the recovery-and-choice stage ran within selection_gmacs
            note = (f"allocation kept: {r.get('allocation')}; selection on {sel['samples']} of {sel['asked_samples']} "
                    f"samples, refit {sel['refit']} (~{sel['gmacs']:.0f} GMACs); " + note).strip("; ")
        ach = f"{r['achieved']:.3f}x" if r.get("achieved") else "—"
        lines.append(f"| {r['method']} | {'yes' if r.get('ok') else 'no'} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_gb']:.2f} | {r.get('rss_before_gb', float('nan')):.2f} | {ach} | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
