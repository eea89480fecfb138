"""BatchNorm folded into the factor that feeds it (``hsc_plugin.fold_bn``): same outputs, how much faster.

The committed brain-MRI checkpoint, uncompressed and compressed by each method's setting of the
reproduction's best rows (HSC's defaults, data-aware Tucker-2, data-aware Global SVD) at each
ratio. For each model: the largest |fold_bn(m)(x) - m(x)| over test images (in float64 it must be
<= 1e-5, in float32 within 1e-5 (1 + |m(x)|); the script exits 1 otherwise), then the model with
and without folding timed interleaved (BN, folded, BN, folded, ...) after a warm-up, in eager
torch at batch 1 and 32 and in ONNX Runtime (CPU execution provider, exported the way hsc_plugin
exports, intra-op threads = --threads) at batch 1 and 32: medians [quartiles] in ms, and the gain
1 - folded / BN of the medians. A timing whose spread says the machine was busy is marked
"disturbed".

    python benchmarks/fold_bn_gain.py --data ../shared/data/brain-mri-128 --out benchmarks/results/fold_bn_gain.md
    python benchmarks/fold_bn_gain.py --models /tmp/repro_models ...  # models kept by hsc reproduce --save-models
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkpoint_model_and_data, emit  # noqa: E402

from hsc_plugin import Budget, compress, fold_bn, load  # noqa: E402
from hsc_plugin.cost.ort import export_onnx, ort_available, ort_interleaved  # noqa: E402
from hsc_plugin.cost.timing import measure_interleaved  # noqa: E402
from hsc_plugin.mri import alexnet_mri, paper_recipe  # noqa: E402
from hsc_plugin.mri.experiment import model_slug  # noqa: E402
from hsc_plugin.mri.report import machine_description  # noqa: E402

# name: (the reproduction's setting label, which names its saved model; method; options)
METHODS = {
    "hsc": ("hsc (defaults)", "hsc", {}),
    "tucker2": ("tucker2 (data-aware)", "tucker2", {"data_aware": True}),
    "global_svd": ("global_svd (data-aware)", "global_svd", {"data_aware": True}),
}
TOLERANCE = 1e-5
BATCHES = (1, 32)


@torch.no_grad()
def fold_check(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The model with BatchNorm folded (a copy, ``folded``) and how far its outputs are from the
    model's: ``fp64`` = max |folded(x) - model(x)| with both in float64 (the fold itself: must be
    <= 1e-5), ``fp32`` = the same in float32, what deploys, where summing in another order moves
    logits of magnitude ``out`` (up to ~16 here) by a few ulps (~1e-5); ``ok`` when fp64 <= 1e-5
    and every float32 output is within 1e-5 + 1e-5 |out| (tests/test_fold_bn.py's tolerance)."""
    folded = fold_bn(model)
    ref = model(x)
    d32 = (folded(x) - ref).abs()
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    fp64 = float((fold_bn(m64)(x64) - m64(x64)).abs().max())
    ok = fp64 <= TOLERANCE and bool((d32 <= TOLERANCE * (1 + ref.abs())).all())
    return {"folded": folded, "fp32": float(d32.max()), "out": float(ref.abs().max()), "fp64": fp64, "ok": ok}


def onnx_bn_nodes(model: nn.Module, shape: tuple[int, ...]) -> str:
    """The exporter hsc_plugin used and the BatchNormalization nodes left in the unfolded model's
    ONNX graph (the TorchScript exporter folds a BN that follows a Conv on its own)."""
    try:
        import onnx
    except ImportError:
        return "-"
    data, exporter = export_onnx(model, torch.randn(2, *shape), dynamic_batch=True)
    return f"{exporter}, {sum(n.op_type == 'BatchNormalization' for n in onnx.load_from_string(data).graph.node)}"


def _cell(t: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """"BN ms [q1, q3] → folded ms [q1, q3]" and the gain of the medians."""
    a, b = t["bn"], t["folded"]
    ms = " → ".join(f"{v['median_ms']:.3f} [{v['p25_ms']:.3f}, {v['p75_ms']:.3f}]" for v in (a, b))
    gain = f"{100 * (1 - b['median_ms'] / a['median_ms']):+.1f} %"
    return ms, gain + (" (disturbed)" if a["disturbed"] or b["disturbed"] else "")


def timings(model: nn.Module, folded: nn.Module, shape: tuple[int, ...], runs: int, threads: int,
            ort: bool) -> list[str]:
    """Cells: torch b1 ms, gain, torch b32 ms, gain, then the same in ORT (or why not)."""
    pair = {"bn": model, "folded": folded}
    cells: list[str] = []
    for batch in BATCHES:
        cells += _cell(measure_interleaved(pair, shape, batch=batch, runs=runs, threads=threads))
    if not ort:
        return cells + ["not measured (onnxruntime not installed)", "-"] * len(BATCHES)
    res = ort_interleaved(pair, shape, batches=BATCHES, runs=runs, threads=threads)
    for batch in BATCHES:
        cells += _cell(res[batch])
    return cells


def models(args: argparse.Namespace, base: nn.Module, calib: torch.Tensor) -> Iterator[tuple[str, float, nn.Module]]:
    """The uncompressed model, then each (method, ratio): loaded from ``--models`` or compressed."""
    yield "uncompressed", 1.0, base
    recipe = paper_recipe()
    for ratio in args.ratios:
        for name in args.methods:
            label, method, opts = METHODS[name]
            saved = Path(args.models) / model_slug(label, ratio) if args.models else None
            if saved is not None and (saved / "structure.json").exists():
                m = load(saved, alexnet_mri(width=recipe.width, input_size=recipe.input_size))
            else:
                t0 = time.perf_counter()
                m = compress(base, method, calib=calib, budget=Budget(ratio), seed=0, progress=False, **opts).model
                print(f"{label} @ {ratio:g}x compressed in {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                      flush=True)
            yield label, ratio, m.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--models", help="folder of `hsc reproduce --save-models` (missing models are compressed)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[3.0, 6.0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-check", type=int, default=64, help="test images of the equality check")
    ap.add_argument("--out", help="e.g. benchmarks/results/fold_bn_gain.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, _, test, calib = checkpoint_model_and_data(args.data)
    shape = tuple(test.tensors[0].shape[1:])
    x = test.tensors[0][: args.n_check]
    ort = ort_available()
    lines = [f"Command: `python benchmarks/fold_bn_gain.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}; timed with {args.threads} thread(s)  ",
             f"Each model timed interleaved with its BN-folded copy, {args.runs} rounds after warm-up; ms median "
             f"[quartiles], BN → folded; gain = 1 − folded / BN. Max |folded − BN| of the logits over {len(x)} "
             f"test images, float64 / float32 (max |logit|): the fold must be exact to {TOLERANCE:g} (float64) and "
             f"float32 within {TOLERANCE:g} × (1 + |logit|), summation-order rounding. ORT times the graph "
             "hsc_plugin exports: the TorchScript exporter already folds a BN that follows a Conv, and ORT's "
             "graph optimiser fuses Conv + BatchNormalization, so ORT gains only where a BN is left that "
             "follows something else (last column: the unfolded model's export).", "",
             "| model | budget | BNs folded | max abs diff fp64 / fp32 (max logit) "
             "| torch b1 ms | gain | torch b32 ms | gain | ORT b1 ms | gain | ORT b32 ms | gain | exporter, BNs left in ONNX |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = []
    for label, ratio, m in models(args, base, calib):
        c = fold_check(m, x)
        diff = f"{c['fp64']:.0e} / {c['fp32']:.1e} ({c['out']:.1f})"
        if not c["ok"]:
            failed.append(f"{label} @ {ratio:g}x: {diff}")
        cells = timings(m, c["folded"], shape, args.runs, args.threads, ort)
        bn_onnx = onnx_bn_nodes(m, shape) if ort else "-"
        lines.append(f"| {label} | {ratio:g}x | {len(c['folded'].folded_bn)} | {diff}{'' if c['ok'] else ' FAIL'} "
                     f"| {' | '.join(cells)} | {bn_onnx} |")
        print(lines[-1], flush=True)
    if failed:
        lines += ["", f"Outputs differ beyond the tolerance: {'; '.join(failed)}"]
    emit(lines, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
