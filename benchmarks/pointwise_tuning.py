"""What `hsc_plugin.tune_pointwise` gains in NCHW at the paper's scale (AlexNet, 4 classes, 512 px).

Every method at 3× and 6× fewer MACs is timed in NCHW at each batch size three ways in the same
interleaved run: the dense model, the compressed model as built, and the compressed model after
`tune_pointwise` (each 1×1 conv as a conv or a matmul, whichever its own timing on this machine
found faster by more than 10 %). Warm turns: each model runs 3 times in a row, the first untimed;
speed-ups are per-turn ratios to the dense model, median with quartiles. Untrained seeded weights
(timing depends only on shapes), calibration on MRI images upsampled, as `paper_scale.py`.

    python benchmarks/pointwise_tuning.py --data ../shared/data/brain-mri-128 --out benchmarks/results/pointwise_tuning.md
    python benchmarks/pointwise_tuning.py --size 128 --runs 3 --methods tucker2 --budgets 6x --batches 1
    python benchmarks/pointwise_tuning.py --model mri --batches 1 32 --out benchmarks/results/pointwise_tuning_mri.md

``--model mri`` times the committed MRI checkpoint (128 px, one channel, its 256 calibration
images) instead of the paper-scale AlexNet.

``--latency 3`` instead compares latency budgets (NCHW, each batch) compressed with
``LatencyCostModel(batch)`` and with ``LatencyCostModel(batch, tune_pointwise=True)``: the
calibration output error each reaches (what the allocation minimises), MAC ratio, closed-loop
rounds and forms, and both models timed in one interleaved run.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from paper_scale import METHODS, benchmark_model, warm_speedups  # noqa: E402

from hsc_plugin import Budget, LatencyCostModel, compress, measure_costs, tune_pointwise  # noqa: E402


def _header(title: str, explain: str, columns: list[str]) -> list[str]:
    return [f"# {title}", "", f"Command: `python benchmarks/pointwise_tuning.py {' '.join(sys.argv[1:])}`", "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads. {explain}", "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def latency_rows(args: argparse.Namespace, base: nn.Module, calib: torch.Tensor, dense_macs: int,
                 title: str) -> list[str]:
    """Latency budgets allocated on untuned and on tuned timings: error, MACs, rounds, speed."""
    shape = tuple(calib.shape[1:])
    lines = _header(f"Latency budget {args.latency:g}× in NCHW with and without `tune_pointwise`: {title}",
                    "`error`: calibration output error (what the allocation minimises); "
                    "`speed-up`: warm turns against the dense model, both models of a row pair in one interleaved "
                    "run, median [q1, q3].",
                    ["method", "batch", "cost model", "error", "MAC ratio", "closed loop", "speed-up",
                     "forms (1×1 as a matmul)"])
    for mname in args.methods:
        method, kw = METHODS[mname]
        for batch in args.batches:
            built: dict[str, nn.Module] = {}
            rows = {}
            for tune in (False, True):
                name = "tuned" if tune else "plain"
                res = compress(base, method, calib=calib, budget=Budget(args.latency, metric="latency"),
                               cost_model=LatencyCostModel(batch, tune_pointwise=tune), progress=False, **kw)
                r = res.report
                built[name] = res.model.eval()
                loop = " → ".join(f"{x['speedup']:.2f}×" + (" (kept)" if x.get("kept") else "")
                                  for x in (r.latency or {}).get("rounds") or [])
                forms = Counter(L.details.get("form") or L.module for L in r.layers if L.status == "factorised")
                mm = (r.latency or {}).get("pointwise_matmul")
                rows[name] = (r.calibration_error, dense_macs / measure_costs(res.model, calib[:1]).macs, loop,
                              "; ".join(f"{n}× {f}" for f, n in forms.items()) + (f" ({len(mm)})" if mm else ""))
            x = torch.randn(batch, *shape)
            s = warm_speedups(base, built, x, args.runs)
            for name, (err, ratio, loop, forms) in rows.items():
                v = s[name]
                lines.append(f"| {mname} | {batch} | {'tune_pointwise=True' if name == 'tuned' else 'plain'} "
                             f"| {err:.4f} | {ratio:.2f}× | {loop} | {v[1]:.2f}× [{v[0]:.2f}, {v[2]:.2f}] | {forms} |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budgets", nargs="+", default=["3x", "6x"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--model", default="alexnet", choices=["alexnet", "mri"],
                    help="alexnet: the paper-scale AlexNet (untrained, --size px); mri: the committed MRI checkpoint")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calib", type=int, default=None, help="calibration images (32 for alexnet, 256 for mri)")
    ap.add_argument("--latency", type=float, default=None, help="compare latency budgets of this ratio instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, calib, dense_macs, title = benchmark_model(args.model, args.data, args.calib, args.size)
    shape = tuple(calib.shape[1:])
    if args.latency is not None:
        emit(latency_rows(args, base, calib, dense_macs, title), args.out)
        return
    lines = _header(f"`tune_pointwise` on {title}, NCHW",
                    f"Warm turns, {args.runs} per model, interleaved with the dense model; speed-up median [q1, q3]. "
                    "`switched`: the 1×1 convs the tuning ran as a matmul, of those it timed, and the largest gain "
                    "it measured on one of them.",
                    ["method", "budget", "batch", "MAC ratio", "as built", "tuned", "switched", "largest layer gain"])
    for mname in args.methods:
        method, kw = METHODS[mname]
        for bname in args.budgets:
            comp = compress(base, method, calib=calib, budget=Budget(float(bname.rstrip("x"))), progress=False,
                            **kw).model.eval()
            ratio = dense_macs / measure_costs(comp, calib[:1]).macs
            for batch in args.batches:
                x = torch.randn(batch, *shape)
                tuned = tune_pointwise(comp, x)
                recs = [r for r in tuned.tuned_pointwise if r["conv_ms"] is not None]
                sw = [r for r in recs if r["execution"] == "matmul"]
                best = max(sw, key=lambda r: r["conv_ms"] / r["matmul_ms"], default=None)
                gain = (f"{best['name']} {tuple(best['shape'])}: {best['conv_ms']:.2f} → {best['matmul_ms']:.2f} ms"
                        if best else "–")
                s = warm_speedups(base, {"built": comp, "tuned": tuned}, x, args.runs)
                cell = {n: f"{v[1]:.2f}× [{v[0]:.2f}, {v[2]:.2f}]" for n, v in s.items()}
                lines.append(f"| {mname} | {bname} | {batch} | {ratio:.2f}× | {cell['built']} | {cell['tuned']} "
                             f"| {len(sw)} of {len(recs)} | {gain} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
