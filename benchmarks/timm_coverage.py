"""timm coverage table: 12 timm architectures × every compressor at 3× fewer MACs (model scope).

Writes a Markdown table (``docs/timm_coverage.md`` by default): per architecture and method the
outcome (ok, or infeasible at model scope with the BudgetError's reason), MACs and parameters
before/after, the achieved ratio, how many Conv2d/Linear layers were factorised / kept dense /
skipped and why, the structural bound on the model-scope MAC ratio, and the compression time.
A second table runs the depthwise-heavy nets above their bound, at model and at targets scope.
The same matrix is asserted by ``tests/test_timm_coverage.py``.

    python benchmarks/timm_coverage.py --out docs/timm_coverage.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsc_plugin import Budget, BudgetError, compress, measure_costs

COMMAND = "python benchmarks/timm_coverage.py --out docs/timm_coverage.md"
METHODS = ("global_svd", "tucker2", "hsc")
ARCHS = {
    "resnet18": 64, "resnet50": 64, "resnext26ts": 64, "vgg11": 64, "densenet121": 64,
    "efficientnet_b0": 64, "mobilenetv3_large_100": 64, "regnetx_002": 64, "convnext_nano": 64,
    "ghostnet_100": 64, "inception_v3": 75, "dla34": 64,
}
# Ratios above the model-scope bound of the depthwise-heavy nets (as in the test).
ABOVE_BOUND = {"ghostnet_100": 7.0, "mobilenetv3_large_100": 9.0, "efficientnet_b0": 13.0}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def structural_bound(model: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """MACs_total / MACs that no method can factorise (depthwise convs, skipped subclasses, the
    rest of the graph), and those MACs. An upper bound: factors at rank ≥ 1 still cost."""
    cost = measure_costs(model, x)
    free = sum(cost.module_macs.get(n, 0) for n, m in model.named_modules()
               if type(m) in (nn.Conv2d, nn.Linear) and not _is_depthwise(m))
    fixed = cost.macs - free
    return (cost.macs / fixed if fixed else float("inf")), fixed


def _reason_key(reason: str) -> str:
    """A reason without its numbers, to count layers by reason."""
    key = reason.split(":")[0].split(";")[0].strip()
    if "factorising cannot save" in key:
        return "cannot save cost at rank 1 (depthwise / tiny)"
    return key


def layer_summary(report: Any) -> dict[str, Any]:
    counts = Counter(L.status for L in report.layers)
    reasons = {s: Counter(_reason_key(L.reason) for L in report.layers if L.status == s) for s in ("dense", "skipped")}
    return {"counts": counts, "reasons": reasons}


def _fmt_reasons(c: Counter) -> str:
    return "; ".join(f"{n}× {r}" for r, n in c.most_common(2))


def run_one(model: nn.Module, x: torch.Tensor, method: str, budget: Budget) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = compress(model, method, calib=x, budget=budget, progress=False, measure_error=False)
    except BudgetError as e:
        return {"status": "infeasible", "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - a coverage table records failures instead of stopping
        return {"status": "error", "reason": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        ok_shape = res.model(x).shape == model(x).shape
    rep = res.report
    return {"status": "ok" if ok_shape else "error", "reason": "" if ok_shape else "output shape changed",
            "report": rep, "seconds": seconds, **layer_summary(rep)}


def _m(v: int) -> str:
    return f"{v / 1e6:,.1f}M"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("docs/timm_coverage.md"))
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated timm names")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=2, help="random calibration images")
    ap.add_argument("--no-above-bound", action="store_true", help="skip the second table")
    args = ap.parse_args(argv)

    import timm

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    archs = [a for a in args.archs.split(",") if a]
    methods = [m for m in args.methods.split(",") if m]
    rows: list[str] = []
    t_all = time.perf_counter()
    for arch in archs:
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False).eval()
        side = ARCHS.get(arch, 64)
        x = torch.randn(args.batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        bound, _ = structural_bound(model, x[:1])
        for method in methods:
            r = run_one(model, x, method, Budget(args.ratio))
            b = "∞" if bound == float("inf") else f"{bound:.1f}×"
            if r["status"] == "ok":
                rep = r["report"]
                c = r["counts"]
                why = "; ".join(x for x in (
                    f"dense: {_fmt_reasons(r['reasons']['dense'])}" if r["reasons"]["dense"] else "",
                    f"skipped: {_fmt_reasons(r['reasons']['skipped'])}" if r["reasons"]["skipped"] else "") if x)
                rows.append(
                    f"| {arch} | {side} | {method} | ok | {_m(rep.macs_before)} → {_m(rep.macs_after)} | "
                    f"{rep.achieved_ratio:.3f}× | {_m(rep.params_before)} → {_m(rep.params_after)} | "
                    f"{c['factorised']} / {c['dense']} / {c['skipped']} | {why or '-'} | {b} | {r['seconds']:.1f} |")
            else:
                rows.append(f"| {arch} | {side} | {method} | **{r['status']}**: {r['reason']} | | | | | | {b} | "
                            f"{r['seconds']:.1f} |")
            print(rows[-1], flush=True)

    above: list[str] = []
    if not args.no_above_bound:
        for arch, ratio in ABOVE_BOUND.items():
            if arch not in archs:
                continue
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False).eval()
            side = ARCHS[arch]
            x = torch.randn(args.batch, 3, side, side, generator=torch.Generator().manual_seed(1))
            bound, _ = structural_bound(model, x[:1])
            for method in methods:
                rm = run_one(model, x, method, Budget(ratio))
                rt = run_one(model, x, method, Budget(ratio, scope="targets"))
                model_cell = "ok" if rm["status"] == "ok" else f"{rm['status']}: {rm['reason']}"
                if rt["status"] == "ok":
                    rep = rt["report"]
                    tgt_cell = (f"ok: {rep.achieved_ratio:.3f}× on the targets, "
                                f"{rep.macs_ratio:.2f}× on the model")
                else:
                    tgt_cell = f"{rt['status']}: {rt['reason']}"
                above.append(f"| {arch} | {method} | {ratio:g}× | {bound:.1f}× | {model_cell} | {tgt_cell} |")
                print(above[-1], flush=True)

    total = time.perf_counter() - t_all
    lines = [
        "# timm coverage",
        "",
        "Generated by (from the repository root):",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        f"Environment: torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
        "1 intra-op thread. Models are created with `pretrained=False` (random weights); calibration is "
        f"{args.batch} random images (N(0,1), seed 1) at the input side given per row (64 px; inception_v3's minimum "
        "is 75 px). Every compressor runs with its defaults (HSC: 4 input-channel clusters per region, "
        "grid regions) plus `progress=False, measure_error=False`, at "
        f"`Budget({args.ratio:g})`: {args.ratio:g}× fewer MACs per sample for the whole model (`scope=\"model\"`, "
        "tolerance 2%). The same matrix is asserted by `tests/test_timm_coverage.py`.",
        "",
        "Columns: MACs are multiply-accumulates per sample (FlopCounterMode; FLOPs = 2 × MACs). *Layers* counts "
        "the model's Conv2d/Linear layers as factorised / kept dense / skipped; *why* gives the two most common "
        "reasons. *Bound* is the most any method could reach at model scope: total MACs / MACs that cannot be "
        "factorised (depthwise convs, skipped layers); it is an upper bound, since factors still cost at rank 1. "
        "*Seconds* is the wall-clock compression time **measured on a shared 2-core machine under load from "
        "other jobs**: read it as an order of magnitude, not a benchmark.",
        "",
        "At small inputs the classifier holds a larger share of the MACs than at 224 px; the depthwise share is "
        "about the same at both sizes (at most 12.5% at 224 px among these nets), so 3× at model scope is feasible "
        "for every architecture here, depthwise-heavy ones included.",
        "",
        "| arch | px | method | status | MACs before → after | ratio | params before → after | layers f / d / s "
        "| why dense / skipped | bound | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    if above:
        lines += [
            "## Above the bound: depthwise-heavy nets",
            "",
            "The budget is set above each net's model-scope bound, so every method must raise `BudgetError` "
            "saying why. For MobileNetV3 and GhostNet the classifier is timm's `Linear` subclass, which is "
            "skipped, so at `scope=\"targets\"` (only the targeted layers' MACs are divided) Global SVD and "
            "Tucker-2 meet the same ratio; HSC's floor is higher (every region × cluster block keeps rank ≥ 1), "
            "so its targets-scope bound rises but stays below the ratio. EfficientNet-B0 skips nothing, so its "
            "targets scope has the same bound.",
            "",
            "| arch | method | budget | bound | model scope | targets scope |",
            "| --- | --- | --- | --- | --- | --- |",
            *above,
            "",
        ]
    lines.append(f"Total run time: {total:.0f} s (shared machine).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
