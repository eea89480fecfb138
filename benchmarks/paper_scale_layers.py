"""Where each method's time goes at the paper's scale: every conv of the models the methods build.

`paper_scale.py` times whole models. This compresses the same AlexNet (4 classes, 512 px,
untrained seeded weights, MRI calibration images upsampled) with every method at one MAC budget,
then times each conv layer of the dense and the compressed models on that layer's own input (taken
from the dense model on a random image), all of a layer's versions in one interleaved run (warm
turns: 3 calls in a row, the first untimed). The table gives each layer's MAC ratio, its speed-up
over the dense layer and the form it was given; for HSC's per-region input clusters, region 1's
cluster sizes and ranks (a rank-0 cluster is dropped: its channels are not read).

    python benchmarks/paper_scale_layers.py --data ../shared/data/brain-mri-128 --out benchmarks/results/paper_scale_layers.md
    python benchmarks/paper_scale_layers.py --size 128 --runs 3 --layouts nchw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from paper_scale import METHODS, paper_model  # noqa: E402

from hsc_plugin import Budget, compress, measure_costs  # noqa: E402
from hsc_plugin.cost.timing import round_robin  # noqa: E402
from hsc_plugin.modules import SpatioChannelConv2d  # noqa: E402


def _form(report_layer, module: nn.Module) -> str:
    form = report_layer.details.get("form") or type(module).__name__
    if isinstance(module, SpatioChannelConv2d) and module.side == "input":
        b = module.blocks[0]
        form += " (region 1: sizes " + "+".join(str(len(c)) for c in b.clusters) + ", ranks " + \
            "+".join(str(r) for r in b.ranks) + ")"
    return form


def _inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, i, n=n: got.__setitem__(n, i[0].clone()))
             for n in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--budget", type=float, default=6.0, help="fewer MACs, whole model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, calib, _ = paper_model(args.data, args.calib, args.size)
    built = {}
    for name in args.methods:
        method, kw = METHODS[name]
        res = compress(base, method, calib=calib, budget=Budget(args.budget), progress=False, **kw)
        built[name] = (res.model.eval(), {L.name: L for L in res.report.layers})
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    ins = _inputs(base, convs, torch.randn(args.batch, *calib.shape[1:]))
    lines = [f"# Per layer at the paper's scale: AlexNet, 4 classes, {args.size} px, {args.budget:g}× fewer MACs "
             f"(whole model), batch {args.batch}", "",
             f"Command: `python benchmarks/paper_scale_layers.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Each layer's dense and compressed versions "
             f"timed in one interleaved run on the layer's input ({args.runs} warm turns each); `speed-up`: dense "
             "median / this median. Untrained seeded weights: the shapes are real, the ranks, forms and clusters are "
             "what each method chose on them.", "",
             "| layout | layer | input | dense ms | method | MAC ratio | speed-up | form |", "|---|---|---|---|---|---|---|---|"]
    for layout in args.layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for n in convs:
            x = ins[n].contiguous(memory_format=fmt)
            dense = base.get_submodule(n)
            mods = {"dense": dense, **{k: m.get_submodule(n) for k, (m, _) in built.items()}}
            mods = {k: v.to(memory_format=fmt) if layout == "channels_last" else v for k, v in mods.items()}
            with torch.inference_mode():
                t = round_robin({k: (lambda v=v: v(x)) for k, v in mods.items()}, runs=args.runs, warmup=3, block=3)
            d = t["dense"]["median_ms"]
            dmacs = measure_costs(dense, x).macs
            for k, (m, layers) in built.items():
                sub = m.get_submodule(n)
                ratio = dmacs / max(measure_costs(sub, x).macs, 1)
                sp = "disturbed" if t[k]["disturbed"] else f"{d / t[k]['median_ms']:.2f}×"
                lines.append(f"| {layout} | {n} | {'×'.join(map(str, x.shape[1:]))} | {d:.2f} | {k} | {ratio:.2f}× "
                             f"| {sp} | {_form(layers[n], sub)} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
