"""Ways to execute a regional expansion's per-region 1×1s, timed against each other.

``RegionalExpansionConv2d`` runs one reduction on the whole map and a 1×1 per region. Its forward
crops the reduced map per region, runs each region's 1×1 and concatenates (``crops``, what the
module does). Alternatives that avoid the Python loop, all exact:

- ``bmm``: pad the reduced map so that a 2×2 grid splits it evenly (``edge`` puts the odd row in
  the second half, so padding the first row/column keeps every pixel in its region), view it
  region-major and run one ``baddbmm`` over the four regions;
- ``einsum``: the same view, one ``torch.einsum`` over (region, channel);
- ``stacked``: one 1×1 conv with every region's map stacked (n·C_out outputs, n× the expansion's
  MACs) and each pixel's own region picked by ``gather``.

``one region`` is the base form (same reduction, one shared 1×1) for scale. Shapes: the MRI
AlexNet's and the paper-scale AlexNet's convs at 6×-like ranks. Run on an idle machine:

    python benchmarks/regional_execution.py --out benchmarks/results/regional_execution.md
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
import torch.nn.functional as F

from _common import emit, median_ms  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin.modules import RegionalExpansionConv2d
from hsc_plugin.mri.report import machine_description
from hsc_plugin.tiling import Tiling, output_box

# (C_in, C_out, kernel, map side, rank, batch)
SHAPES = [(96, 192, 3, 7, 30, 1), (96, 192, 3, 7, 30, 32), (32, 96, 5, 15, 40, 1), (32, 96, 5, 15, 40, 32),
          (64, 192, 5, 63, 60, 1), (64, 192, 5, 63, 60, 8), (192, 384, 3, 31, 60, 1)]


def _halves(z: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int]:
    N, K, H, W = z.shape
    a, b = (H + 1) // 2, (W + 1) // 2
    ph, pw = 2 * a - H, 2 * b - W
    return (F.pad(z, (pw, 0, ph, 0)) if ph or pw else z), a, b, ph, pw


def bmm(mod: RegionalExpansionConv2d, x: torch.Tensor) -> torch.Tensor:
    z, a, b, ph, pw = _halves(mod.reduce(mod.first(x)))
    N, K, C = z.shape[0], z.shape[1], mod.out_channels
    zr = z.view(N, K, 2, a, 2, b).permute(2, 4, 1, 0, 3, 5).reshape(4, K, N * a * b)
    w = torch.stack([e.weight.view(C, K) for e in mod.expands])
    bias = torch.stack([e.bias for e in mod.expands]).unsqueeze(-1)
    y = torch.baddbmm(bias, w, zr).view(2, 2, C, N, a, b).permute(3, 2, 0, 4, 1, 5).reshape(N, C, 2 * a, 2 * b)
    return y[:, :, ph:, pw:]


def einsum(mod: RegionalExpansionConv2d, x: torch.Tensor) -> torch.Tensor:
    z, a, b, ph, pw = _halves(mod.reduce(mod.first(x)))
    N, K, C = z.shape[0], z.shape[1], mod.out_channels
    w = torch.stack([e.weight.view(C, K) for e in mod.expands]).view(2, 2, C, K)
    bias = torch.stack([e.bias for e in mod.expands]).view(2, 2, C).permute(2, 0, 1).reshape(1, C, 2, 1, 2, 1)
    y = torch.einsum("nkiajb,ijok->noiajb", z.view(N, K, 2, a, 2, b), w) + bias
    return y.reshape(N, C, 2 * a, 2 * b)[:, :, ph:, pw:]


def stacked(mod: RegionalExpansionConv2d, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    z = mod.reduce(mod.first(x))
    n, C = len(mod.expands), mod.out_channels
    y = F.conv2d(z, torch.cat([e.weight for e in mod.expands]), torch.cat([e.bias for e in mod.expands]))
    N, _, H, W = y.shape
    return y.view(N, n, C, H * W).gather(1, index.view(1, 1, 1, H * W).expand(N, 1, C, H * W)).view(N, C, H, W)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the best median per way is kept")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"Command: `python benchmarks/regional_execution.py {shlex.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description().rsplit(',', 1)[0]}, {args.threads} threads\n",
             "2×2 regions, NCHW, eval mode, no grad. Each way's time is the best of "
             f"{args.rounds} round-robin medians; `vs crops` > 1 means faster than the module's own forward.\n",
             "| C_in → C_out, k, map, rank | batch | one region ms | crops ms | bmm, vs crops | einsum, vs crops | stacked, vs crops |",
             "|---|---|---|---|---|---|---|"]
    for cin, cout, k, hw, rank, batch in SHAPES:
        geo = {"kernel_size": (k, k), "stride": (1, 1), "padding": (k // 2, k // 2), "dilation": (1, 1)}
        mod = RegionalExpansionConv2d(cin, cout, geo, Tiling.uniform((2, 2), 2, 2), rank).eval()
        one = torch.nn.Sequential(mod.reduce, torch.nn.Conv2d(rank, cout, 1)).eval()
        x = torch.randn(batch, cin, hw, hw)
        index = torch.empty(hw, hw, dtype=torch.long)
        for r, reg in enumerate(mod.regions):
            o0, o1, q0, q1 = output_box(reg, hw, hw, mod.grid)
            index[o0:o1, q0:q1] = r
        ways = {"one region": lambda: one(x), "crops": lambda: mod(x), "bmm": lambda: bmm(mod, x),
                "einsum": lambda: einsum(mod, x), "stacked": lambda: stacked(mod, x, index)}
        runs = 100 if hw * hw * batch < 5000 else 15
        with torch.no_grad():
            ref = mod(x)
            for name in ("bmm", "einsum", "stacked"):  # every way computes the module's output
                assert (ways[name]() - ref).abs().max().item() <= 1e-4 * (1 + ref.abs().max().item()), name
            best = {name: min(median_ms(fn, runs, warmup=5) for _ in range(1)) for name, fn in ways.items()}
            for _ in range(args.rounds - 1):
                for name, fn in ways.items():
                    best[name] = min(best[name], median_ms(fn, runs, warmup=5))
        crops = best["crops"]
        lines.append(f"| {cin} → {cout}, {k}×{k}, {hw}×{hw}, {rank} | {batch} | {best['one region']:.3f} | {crops:.3f} | "
                     + " | ".join(f"{crops / best[n]:.2f}×" for n in ("bmm", "einsum", "stacked")) + " |")
        print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
