"""Which execution of a factorised layer is fast on this machine? One layer at a time.

For every conv layer of the brain-MRI AlexNet (128 px, width 0.5) compressed on its own to
``--ratio`` fewer MACs, time (2 threads, batch 1 and 32, median of ``--runs`` runs after warm-up,
the dense layer and every alternative interleaved round-robin) the alternatives issue #3 asks to try:

* one-region SVD (k×k conv to rank r, then 1×1) — with ranks as chosen, and rounded to multiples
  of 8 (``rank_multiple=8``);
* HSC with one region and balanced input clusters (one grouped k×k conv + one 1×1);
* HSC with 2×2 regions run as a loop of crops (output-side clusters and input-side clusters);
* the same 2×2 regions batched: crops stacked on the channel axis through one grouped k×k conv and
  one grouped 1×1 (ranks padded with zero filters to the largest region's; the MAC column counts
  what runs);
* output-side clusters (one region, 4 clusters) with a 1×1 per cluster, and with one dense 1×1
  whose off-cluster weights are zero (one kernel, more MACs);
* each of the above in channels_last memory format.

Derived executions are checked against the module they re-execute (same outputs, 1e-4).

Run it on an idle machine (every other process slows small kernels unevenly):

    python benchmarks/hsc_layer_speed.py [--ratio 6] [--runs 30] [--out benchmarks/results/hsc_layer_speed.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _common import emit  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import Budget, compress, measure_costs
from hsc_plugin.cost.timing import measure_interleaved, speedup_text
from hsc_plugin.mri import alexnet_mri
from hsc_plugin.mri.report import machine_description

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "alexnet_mri-128-w0.5-e40-s0.pt"

VARIANTS: dict[str, tuple[str, dict]] = {
    "svd (1 region)": ("global_svd", {"data_aware": True}),
    "svd, ranks multiple of 8": ("global_svd", {"data_aware": True, "rank_multiple": 8}),
    "hsc 1 region, 4 balanced input clusters": ("hsc", {"partition": "none", "n_clusters": 4, "balanced": True}),
    "hsc 2x2 regions, 1 cluster (loop)": ("hsc", {"grid": (2, 2), "clusterer": "single", "channel_side": "output", "min_region": 4}),
    "hsc 2x2 regions, 4 input clusters (loop)": ("hsc", {"grid": (2, 2), "n_clusters": 4, "min_region": 4}),
    "hsc 1 region, 4 output clusters (1x1 per cluster)": ("hsc", {"partition": "none", "n_clusters": 4,
                                                                   "channel_side": "output"}),
}


class TiledRegions(nn.Module):
    """A uniform-grid, one-cluster, output-side ``SpatioChannelConv2d`` run as one grouped k×k conv
    over crops stacked on the channel axis, one grouped 1×1, and one reshape back to the map."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        blocks = list(m.blocks)
        if m.side != "output" or any(len(b.clusters) != 1 or b.total_rank == 0 for b in blocks):
            raise ValueError("needs one non-dropped output cluster per region")
        gh, gw = m.tiling.grid
        self.rows, self.cols = len({r[0] for r in m.regions}), len({r[2] for r in m.regions})
        if self.rows * self.cols != len(blocks) or (gh, gw) != (self.rows, self.cols):
            raise ValueError("needs a uniform grid of one cell per region")
        n, kmax = len(blocks), max(b.total_rank for b in blocks)
        red0, exp0 = blocks[0].reduces[0], blocks[0].expands[0]
        cin, cout = red0.in_channels, exp0.out_channels
        self.reduce = nn.Conv2d(n * cin, n * kmax, red0.kernel_size, stride=red0.stride, dilation=red0.dilation,
                                groups=n, bias=False)
        self.expand = nn.Conv2d(n * kmax, n * cout, 1, groups=n, bias=exp0.bias is not None)
        with torch.no_grad():
            self.reduce.weight.zero_()
            self.expand.weight.zero_()
            for i, b in enumerate(blocks):
                k = b.total_rank
                self.reduce.weight[i * kmax:i * kmax + k] = b.reduces[0].weight
                self.expand.weight[i * cout:(i + 1) * cout, :k] = b.expands[0].weight
                if self.expand.bias is not None:
                    self.expand.bias[i * cout:(i + 1) * cout] = b.expands[0].bias
        self.pad, self.mode, self.stride, self.halo, self.cout = m.pad, m.padding_mode, m.stride, m.halo, cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lrtb = [self.pad[2], self.pad[3], self.pad[0], self.pad[1]]
        xp = F.pad(x, lrtb) if self.mode == "zeros" else F.pad(x, lrtb, mode=self.mode)
        H = (xp.shape[2] - self.halo[0]) // self.stride[0] + 1
        W = (xp.shape[3] - self.halo[1]) // self.stride[1] + 1
        h, w = H // self.rows, W // self.cols
        crops = [xp[:, :, i * h * self.stride[0]:(i * h + h - 1) * self.stride[0] + self.halo[0],
                    j * w * self.stride[1]:(j * w + w - 1) * self.stride[1] + self.halo[1]]
                 for i in range(self.rows) for j in range(self.cols)]
        y = self.expand(self.reduce(torch.cat(crops, 1)))
        B = y.shape[0]
        return y.view(B, self.rows, self.cols, self.cout, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, self.cout, H, W)


def dense_expand(m: nn.Module) -> nn.Module:
    """A one-region output-side ``SpatioChannelConv2d`` with its per-cluster 1×1s merged into one
    dense 1×1 (zeros off the clusters): reduce → one 1×1, no slicing, concatenation or re-indexing."""
    if len(m.blocks) != 1 or m.side != "output" or m.blocks[0].total_rank == 0:
        raise ValueError("needs one region, output side")
    b = m.blocks[0]
    red = b.reduces[0]
    E = torch.zeros(b.out_channels, red.out_channels)
    bias = torch.zeros(b.out_channels)
    kept = [i for i, r in enumerate(b.ranks) if r > 0]
    with torch.no_grad():
        for (lo, hi), i, e in zip(b.slices, kept, b.expands):
            E[b.clusters[i], lo:hi] = e.weight[:, :, 0, 0]
            if e.bias is not None:
                bias[b.clusters[i]] = e.bias
        if b.n_dropped:
            bias[b.dropped] = b.dropped_bias
        expand = nn.Conv2d(red.out_channels, b.out_channels, 1)
        expand.weight.copy_(E[:, :, None, None])
        expand.bias.copy_(bias)
    return nn.Sequential(red, expand)


DERIVED = {  # label: (variant it re-executes, builder)
    "hsc 2x2 regions, 1 cluster (tiled grouped conv)": ("hsc 2x2 regions, 1 cluster (loop)", TiledRegions),
    "hsc 1 region, 4 output clusters (dense 1x1)": ("hsc 1 region, 4 output clusters (1x1 per cluster)",
                                                    dense_expand),
}


def _layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Tensor]]:
    """Every conv with the input it sees on ``x``."""
    seen: list[tuple[str, nn.Conv2d, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, mod, inp[0].detach())))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _time(dense: nn.Module, variants: dict[str, nn.Module], shape: tuple[int, ...], batch: int, runs: int,
          channels_last: bool) -> dict[str, dict[str, float | bool]]:
    """The dense layer and every variant timed round-robin (dense, v1, v2, ..., dense, ...), so a
    busy moment of a shared machine hits all alike (2 threads, medians after 5 warm-up rounds)."""
    return measure_interleaved({"dense": dense, **variants}, shape, batch=batch, runs=runs, warmup=5, threads=2,
                               channels_last=channels_last)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--calib", type=int, default=64, help="random-crop calibration images (real MRI if --data)")
    ap.add_argument("--data", help="brain-MRI folder for calibration images (default: the bundled sample)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = alexnet_mri(width=0.5, input_size=128)
    if CHECKPOINT.is_file():
        model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    model.eval()
    from hsc_plugin.mri.data import bundled_sample_path, load_split

    images = load_split(args.data or bundled_sample_path(), "train", 128).tensors[0][: args.calib]
    rows = []
    failed: list[tuple[str, tuple[int, ...], str, str]] = []
    for name, conv, inp in _layers(model, images):
        shape = tuple(inp.shape[1:])
        dense_macs = measure_costs(conv, inp[:1]).macs
        results = {}
        for label, (method, opts) in VARIANTS.items():
            try:
                # one layer is coarse (rank steps of 8 move its MACs by more than 2%): 10% tolerance
                res = compress(nn.Sequential(conv), method, calib=inp, progress=False, dense_fallback=False,
                               budget=Budget(args.ratio, scope="targets", tolerance=0.1), **opts)
            except ValueError as exc:
                results[label] = (None, str(exc).split(";")[0])
                print(f"{name:<12} {label:<42} not run: {results[label][1]}", flush=True)
                failed.append((name, tuple(shape), label, results[label][1]))
                continue
            results[label] = (res.model, measure_costs(res.model, inp[:1]).macs)
        for label, (source, build) in DERIVED.items():
            if results.get(source, (None,))[0] is None:
                continue
            try:
                mod = nn.Sequential(build(results[source][0][0])).eval()
            except ValueError as exc:
                print(f"{name:<12} {label:<42} not run: {exc}", flush=True)
                failed.append((name, tuple(shape), label, str(exc)))
                continue
            with torch.no_grad():
                ref, out = results[source][0](inp[:4]), mod(inp[:4])
            assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4), f"{label} differs from {source} on {name}"
            results[label] = (mod, measure_costs(mod, inp[:1]).macs)
        built = {label: mod for label, (mod, _) in results.items() if mod is not None}
        for batch in (1, 32):
            for cl in (False, True):
                timed = _time(conv, built, shape, batch, args.runs, cl)
                base = timed["dense"]
                for label in built:
                    r, t = dense_macs / results[label][1], timed[label]
                    speed = speedup_text(base, t, r)
                    rows.append((name, tuple(shape), batch, cl, label, r, base["median_ms"], t["median_ms"], speed))
                    print(f"{name:<12} b{batch:<3} {'NHWC' if cl else 'NCHW'} {label:<42} "
                          f"{r:5.2f}x MACs  dense {base['median_ms']:7.3f} ms  {t['median_ms']:7.3f} ms  {speed}",
                          flush=True)
    lines = [f"Command: `python benchmarks/hsc_layer_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}`  ",
             f"Machine: {machine_description()}\n",
             "One conv layer of the brain-MRI AlexNet at a time, compressed alone to the MAC ratio shown; "
             "the dense layer and every variant timed interleaved (2 threads, medians); speed-up = dense ms / "
             "factorised ms, \"disturbed\" where the spread says the machine was busy.\n",
             "| layer | input | batch | layout | variant | MAC ratio | dense ms | factorised ms | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, shape, batch, cl, label, r, base, t, speed in rows:
        lines.append(f"| {name} | {'x'.join(map(str, shape))} | {batch} | {'channels_last' if cl else 'NCHW'} | "
                     f"{label} | {r:.2f}x | {base:.3f} | {t:.3f} | {speed} |")
    if failed:
        lines += ["", "Variants that could not be built at this budget:", ""]
        lines += [f"- {name} ({'x'.join(map(str, shape))}), {label}: {why}" for name, shape, label, why in failed]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
