"""How fast is each execution form of one conv layer at equal MACs? One layer at a time.

For every conv but the stem of the brain-MRI AlexNet (width 0.5; its maps do not grow with the
input size) or, with ``--model alexnet``, torchvision's AlexNet at ``--size`` px (the paper's
scale is 512), the layer is
rebuilt at ``--ratio`` fewer MACs in each form of ``hsc_plugin.modules`` (weights are random:
speed depends on shapes only), and the forms are timed interleaved (batch ``--batch``, ``--threads``
threads, median of ``--runs`` runs, no autograd):

* ``svd`` — ``LowRankConv2d`` (k×k to rank r, 1×1 back), r set by the MAC ratio;
* ``regional svd 2x2`` — ``RegionalExpansionConv2d``: the same reduction once, a 1×1 per region;
* ``hsc svd 2x2`` — ``SpatioChannelConv2d``, 2×2 regions, one output cluster, rank r per region;
* ``tucker2`` — ``Tucker2Conv2d`` with r_in = r_out = t, t set by the MAC ratio;
* ``regional tucker2 2x2`` and ``hsc tucker2 2x2`` (``block="tucker2"``) at the same t;
* ``clusters 1 region`` — ``SpatioChannelConv2d``, one region, 4 equal input clusters (one grouped
  conv), rank k per cluster set by the MAC ratio; ``regional clusters 2x2`` —
  ``RegionalExpansionConv2d(base="clusters")``: that grouped conv once, a 1×1 per region; ``hsc
  clusters 2x2`` — 2×2 regions, each with the same 4 input clusters at rank k (HSC's default form).

The MAC column is what ``measure_costs`` counts: equal for a regional form and its base (the 1×1s
cover disjoint pixels); higher for ``hsc tucker2`` than ``tucker2``, whose per-region first 1×1s
run on each region's input window, halo included. Run it on an idle machine; a shared one makes small kernels uneven:

    python benchmarks/forms_layer_speed.py [--model mri|alexnet] [--size 128] [--ratio 6] [--runs 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys

import torch
from torch import nn

from _common import emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import measure_costs
from hsc_plugin.cost.timing import measure_interleaved, speedup_text
from hsc_plugin.modules import (LowRankConv2d, RegionalExpansionConv2d, SpatioChannelConv2d, Tucker2Conv2d,
                                conv_geometry)
from hsc_plugin.mri import alexnet_mri
from hsc_plugin.mri.report import machine_description
from hsc_plugin.tiling import Tiling


def _layers(which: str, size: int) -> list[tuple[str, nn.Conv2d, tuple[int, int, int]]]:
    """Every conv after the stem, with its input shape at ``size`` px."""
    if which == "alexnet":
        import torchvision

        model, chans = torchvision.models.alexnet(weights=None, num_classes=4).eval(), 3
    else:
        model, chans = alexnet_mri(width=0.5, input_size=size).eval(), 1
    shapes: dict[str, tuple[int, int, int]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    def hook(m: nn.Module, args: tuple, out: torch.Tensor, name: str) -> None:
        shapes[name] = tuple(args[0].shape[1:])

    hooks = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in convs.items()]
    with torch.no_grad():
        model(torch.zeros(1, chans, size, size))
    for h in hooks:
        h.remove()
    return [(n, m, shapes[n]) for n, m in list(convs.items())[1:]]


def _forms(conv: nn.Conv2d, ratio: float) -> dict[str, nn.Module]:
    ci, co = conv.in_channels, conv.out_channels
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    geo, t22 = conv_geometry(conv), Tiling.uniform((2, 2), 2, 2)
    r = max(1, math.floor(co * ci * kk / (ratio * (ci * kk + co))))
    # Tucker-2 at t = r_in = r_out: kk·t² + (ci + co)·t = co·ci·kk / ratio
    t = max(1, math.floor((-(ci + co) + math.sqrt((ci + co) ** 2 + 4 * kk * co * ci * kk / ratio)) / (2 * kk)))
    t = min(t, ci, co)
    one = [[list(range(co))]] * 4
    g = 4 if ci % 4 == 0 else 1
    cl = [list(range(i, ci, g)) for i in range(g)]  # 4 equal input clusters: one grouped conv
    k = max(1, math.floor(co * ci * kk / (ratio * (ci * kk + g * co))))
    return {
        "dense": conv,
        "svd": LowRankConv2d(ci, co, r, geo),
        "regional svd 2x2": RegionalExpansionConv2d(ci, co, geo, t22, r),
        "hsc svd 2x2": SpatioChannelConv2d(ci, co, geo, t22, "output", one, [[r]] * 4),
        "tucker2": Tucker2Conv2d(ci, co, t, t, geo),
        "regional tucker2 2x2": RegionalExpansionConv2d(ci, co, geo, t22, t, base="tucker2", rank_in=t),
        "hsc tucker2 2x2": SpatioChannelConv2d(ci, co, geo, t22, "output", one, [[t]] * 4, block="tucker2",
                                               region_ranks_in=[[t]] * 4),
        "clusters 1 region": SpatioChannelConv2d(ci, co, geo, Tiling.full(), "input", [cl], [[k] * g]),
        "regional clusters 2x2": RegionalExpansionConv2d(ci, co, geo, t22, g * k, base="clusters", clusters=cl,
                                                         ranks=[k] * g),
        "hsc clusters 2x2": SpatioChannelConv2d(ci, co, geo, t22, "input", [cl] * 4, [[k] * g] * 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mri", "alexnet"], default="mri")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    title = "MRI AlexNet w0.5" if args.model == "mri" else "torchvision AlexNet"
    lines = [f"# Execution forms of one layer at {args.ratio:g}x fewer MACs ({title}, {args.size} px, "
             f"batch {args.batch}, {args.threads} thread(s), median of {args.runs} interleaved runs)", "",
             f"Command: `python benchmarks/forms_layer_speed.py {shlex.join(sys.argv[1:])}`  ",
             f"Machine: {machine_description().split(';')[0]}; torch {torch.__version__}. A shared machine makes small "
             "kernels uneven: compare forms within a layer (they are timed round-robin).", "",
             "| layer | input | form | MACs | ms | vs dense |", "|---|---|---|---|---|---|"]
    for name, conv, shape in _layers(args.model, args.size):
        forms = _forms(conv, args.ratio)
        macs = {k: measure_costs(nn.Sequential(m), torch.zeros(1, *shape)).macs for k, m in forms.items()}
        with torch.no_grad():
            times = measure_interleaved(forms, shape, batch=args.batch, runs=args.runs, threads=args.threads)
        for k in forms:
            lines.append(f"| {name} | {'x'.join(map(str, shape))} | {k} | {macs[k]:,} | "
                         f"{times[k]['median_ms']:.3f} | {speedup_text(times['dense'], times[k])} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
