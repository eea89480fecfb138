"""Sequential refit (issue 12 item 4c) on the brain-MRI AlexNet, compress-only: does it pay?

For HSC's defaults, data-aware Tucker-2 and data-aware Global SVD at 3x, 6x and 10x fewer MACs,
each with ``sequential_refit`` off and on (every other option at its default, BN re-estimation
included): test accuracy (± bootstrap SE), the calibration output error the compressor reports
(``report.calibration_error``: relative L2 of the logits against the uncompressed model with BN
statistics re-estimated, on the 256 selection samples), the test output error (labels unused),
compress seconds, the refit step's own seconds, whether its guard kept it, and the most moment
memory it held at once.

    python benchmarks/sequential_mri.py --data ../shared/data/brain-mri-128

One torch thread; writes benchmarks/results/sequential_mri.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from torch import nn

from _common import checkpoint_model_and_data, emit  # benchmarks/_common.py (scripts run from this folder)

from hsc_plugin import compress
from hsc_plugin.mri.data import CLASSES
from hsc_plugin.mri.metrics import bootstrap_se, classification_metrics

METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "hsc": ("hsc (defaults)", "hsc", {}),
    "tucker2": ("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    "global_svd": ("global_svd (data-aware)", "global_svd", {"data_aware": True}),
}


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(256)])


def _refit_step(report: Any) -> dict[str, Any] | None:
    rec = report.recovery or {}
    return next((s for s in rec.get("steps", []) if s["step"] == "sequential_refit"), None)


def _row(label: str, ratio: float, refit: bool, ref: nn.Module, calib: torch.Tensor, test: Any,
         ref_logits: torch.Tensor) -> dict[str, Any]:
    x, y = test.tensors
    t0 = time.perf_counter()
    result = compress(ref, METHODS[label][1], calib=calib, budget=ratio, progress=False, seed=0,
                      sequential_refit=refit, **METHODS[label][2])
    seconds = time.perf_counter() - t0
    logits = _logits(result.model, x)
    pred = logits.argmax(1).numpy()
    step = _refit_step(result.report)
    return {"method": METHODS[label][0], "ratio": ratio, "refit": refit, "seconds": seconds,
            "acc": 100 * classification_metrics(y.numpy(), pred, len(CLASSES))["accuracy"],
            "se": 100 * bootstrap_se(y.numpy(), pred, len(CLASSES))["accuracy"],
            "calib_err": result.report.calibration_error,
            "test_err": float((logits - ref_logits).double().norm() / ref_logits.double().norm()),
            "step": step, "chosen": result.report.allocation}


def _step_text(step: dict[str, Any] | None) -> tuple[str, str, str]:
    if step is None:
        return "-", "-", "-"
    info = step["info"]
    kept = f"{'kept' if step['applied'] else 'undone'} ({step['error_before']:.4f} → {step['error_after']:.4f})"
    return kept, f"{step['seconds']:.1f}", f"{info['moment_bytes'] / 1024:.0f} KiB, {info['passes']} passes"


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """On vs off per (method, MACs): accuracy and output-error differences, time ratio."""
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2]) if not a["refit"] and b["refit"]]
    if not pairs:
        return []
    d_acc = [b["acc"] - a["acc"] for a, b in pairs]
    better = sum(d > 0 for d in d_acc)
    lower_test = sum(b["test_err"] < a["test_err"] for a, b in pairs)
    lower_calib = sum(b["calib_err"] < a["calib_err"] for a, b in pairs)
    slow = [b["seconds"] / a["seconds"] for a, b in pairs]
    return [f"**On vs off, {len(pairs)} cells:** test accuracy higher in {better}, lower in "
            f"{sum(d < 0 for d in d_acc)} (change {min(d_acc):+.2f} … {max(d_acc):+.2f} points, mean "
            f"{sum(d_acc) / len(d_acc):+.2f}); test output error lower in {lower_test}, calibration output error "
            f"lower in {lower_calib}; compress time × {min(slow):.1f} … {max(slow):.1f}."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="benchmarks/results/sequential_mri.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    ref, _train, test, calib = checkpoint_model_and_data(args.data)
    ref_logits = _logits(ref, test.tensors[0])
    rows = []
    for label in args.methods:
        for ratio in args.ratios:
            for refit in (False, True):
                rows.append(_row(label, ratio, refit, ref, calib, test, ref_logits))
                print({k: v for k, v in rows[-1].items() if k != "step"}, _step_text(rows[-1]["step"]), flush=True)
    command = "python benchmarks/sequential_mri.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Sequential refit (brain-MRI AlexNet, compress-only)", "",
        f"Command: `{command}`  ",
        f"1 torch thread on a shared 2-core machine (other sessions were running: seconds are indicative); "
        f"total {(time.perf_counter() - start) / 60:.1f} min.  ",
        "Checkpoint `benchmarks/checkpoints/alexnet_mri-128-w0.5-e40-s0.pt`; calibration: 256 seeded training "
        f"images; test: {len(test.tensors[1])} images. Every other option at its default (BN re-estimation on).", "",
        "- `calib err`: `report.calibration_error`, relative L2 of the logits against the uncompressed model with "
        "BN statistics re-estimated, on the 256 selection samples (what the guard and the choice minimise); "
        "`test err`: against the uncompressed model's logits on the test images (labels unused).",
        "- `refit`: the guarded step (kept / undone, error before → after on the calibration samples) of the "
        "chosen candidate, its own seconds, the most float64 moment memory it held at once and its passes.", "",
    ]
    lines += [*_summary(rows), "",
              "| method | MACs | sequential_refit | test acc % (± SE) | calib err | test err | compress s | refit | "
              "refit s | refit memory |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept, secs, mem = _step_text(r["step"])
        lines.append(f"| {r['method']} | {r['ratio']:g}x | {'on' if r['refit'] else 'off'} | "
                     f"{r['acc']:.2f} ± {r['se']:.2f} | {r['calib_err']:.4f} | {r['test_err']:.4f} | "
                     f"{r['seconds']:.1f} | {kept} | {secs} | {mem} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
