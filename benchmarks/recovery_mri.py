"""Label-free recovery after factorisation on the brain-MRI AlexNet, compress-only (issue 12.4).

For data-aware Global SVD, data-aware Tucker-2 and HSC's defaults at 3x, 6x and 10x fewer MACs:
test accuracy (± bootstrap SE), the relative output error against the uncompressed model on the
256 calibration images and on the test images (labels unused), and the seconds each step took,
for each recovery variant (steps applied unconditionally, to show what each does alone), plus
``recover()`` (guarded: a step that raises the calibration error is undone) with its defaults and
with the other guard reference. The measured defaults of ``recover`` come from this table.

    python benchmarks/recovery_mri.py --data ../shared/data/brain-mri-128

One torch thread (the machine is shared); writes benchmarks/results/recovery_mri.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from _common import checkpoint_model_and_data, emit  # benchmarks/_common.py (scripts run from this folder)

from hsc_plugin import compress
from hsc_plugin.mri.data import CLASSES
from hsc_plugin.mri.metrics import bootstrap_se, classification_metrics
from hsc_plugin.recovery import correct_bias, output_error, recover, reestimate_bn, replaced_modules

METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("global_svd (data-aware)", "global_svd", {"data_aware": True}),
    ("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    ("hsc (defaults)", "hsc", {}),
)

Step = Callable[[nn.Module, nn.Module, torch.Tensor], Any]


def _bias(ref: nn.Module, model: nn.Module, calib: torch.Tensor) -> Any:
    return correct_bias(model, replaced_modules(ref, model), calib)


def _bn(ref: nn.Module, model: nn.Module, calib: torch.Tensor) -> Any:
    return reestimate_bn(model, calib)


STEPS: dict[str, Step] = {"bias": _bias, "BN": _bn}
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ()), ("bias", ("bias",)), ("BN", ("BN",)), ("bias + BN", ("bias", "BN")))
GUARDED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("recover() defaults", {}),
    ("recover(bias, BN, reference as given)", {"bias": True, "refresh_reference": False}),
)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(256)])


class Refs:
    """The uncompressed model as given and with BN statistics re-estimated on the calibration data."""

    def __init__(self, model: nn.Module, calib: torch.Tensor, test_x: torch.Tensor) -> None:
        self.model, self.refreshed = model, copy.deepcopy(model)
        reestimate_bn(self.refreshed, calib)
        self.calib, self.test_x = calib, test_x
        self.logits = _logits(model, test_x)

    def row(self, label: str, ratio: float, variant: str, model: nn.Module, y: torch.Tensor,
            seconds: str) -> dict[str, Any]:
        logits = _logits(model, self.test_x)
        pred = logits.argmax(1).numpy()
        return {"method": label, "ratio": ratio, "variant": variant,
                "acc": 100 * classification_metrics(y.numpy(), pred, len(CLASSES))["accuracy"],
                "se": 100 * bootstrap_se(y.numpy(), pred, len(CLASSES))["accuracy"],
                "calib_err": output_error(self.model, model, self.calib),
                "test_err": float((logits - self.logits).double().norm() / self.logits.double().norm()),
                "refreshed_err": output_error(self.refreshed, model, self.calib), "seconds": seconds}


def _variants(label: str, ratio: float, refs: Refs, small: nn.Module, y: torch.Tensor) -> list[dict[str, Any]]:
    rows = []
    for name, steps in VARIANTS:
        model = copy.deepcopy(small)
        times = []
        for s in steps:
            t0 = time.perf_counter()
            STEPS[s](refs.model, model, refs.calib)
            times.append(f"{s} {time.perf_counter() - t0:.2f}")
        rows.append(refs.row(label, ratio, name, model, y, ", ".join(times) or "-"))
        print(rows[-1], flush=True)
    for name, kw in GUARDED:
        model = copy.deepcopy(small)
        rep = recover(refs.model, model, replaced_modules(refs.model, model), refs.calib, **kw)
        kept = [f"{s['step']} {'kept' if s['applied'] else 'undone'} {s['seconds']:.2f}" for s in rep["steps"]]
        rows.append(refs.row(label, ratio, name, model, y, "; ".join(kept) + f" (total {rep['seconds']:.2f})"))
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    ap.add_argument("--out", default="benchmarks/results/recovery_mri.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    ref, _train, test, calib = checkpoint_model_and_data(args.data)
    test_x, test_y = test.tensors
    refs = Refs(ref, calib, test_x)
    rows = [refs.row("uncompressed", 1.0, "none", ref, test_y, "-"),
            refs.row("uncompressed", 1.0, "BN", refs.refreshed, test_y, "-")]
    for label, method, opts in METHODS:
        for ratio in args.ratios:
            t0 = time.perf_counter()
            small = compress(ref, method, calib=calib, budget=ratio, progress=False, seed=0,
                             bn_reestimation=False, sequential_refit=False, **opts).model  # the raw factorisation
            print(f"{label} {ratio:g}x compressed in {time.perf_counter() - t0:.1f} s", flush=True)
            rows += _variants(label, ratio, refs, small, test_y)
    command = "python benchmarks/recovery_mri.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Label-free recovery after factorisation (brain-MRI AlexNet, compress-only)", "",
        f"Command: `{command}`  ",
        f"1 torch thread on a shared 2-core machine (seconds are indicative); total "
        f"{(time.perf_counter() - start) / 60:.1f} min.  ",
        "Checkpoint `benchmarks/checkpoints/alexnet_mri-128-w0.5-e40-s0.pt`; calibration: 256 seeded training "
        f"images; test: {len(test_y)} images.", "",
        "- Rows `bias`, `BN`, `bias + BN`: `correct_bias` / `reestimate_bn` applied unconditionally, in that "
        "order. `recover()` rows are guarded (a step that raises the calibration output error is undone); "
        "its defaults are BN re-estimation on, bias correction off, errors measured against the uncompressed "
        "model with BN statistics re-estimated on the calibration data.",
        "- Output error: relative L2 of the logits against the uncompressed model (calibration images; test "
        "images, labels unused), and on the calibration images against the uncompressed model with "
        "re-estimated BN statistics (`vs BN-refreshed`).", "",
        "| method | MACs | recovery | test acc % (± SE) | out. error calib | out. error test | "
        "out. error calib vs BN-refreshed | step seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:g}x | {r['variant']} | {r['acc']:.2f} ± {r['se']:.2f} | "
                     f"{r['calib_err']:.4f} | {r['test_err']:.4f} | {r['refreshed_err']:.4f} | {r['seconds']} |")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
