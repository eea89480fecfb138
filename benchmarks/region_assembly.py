"""Region outputs written into one map against concatenated along the tiling's tree (HSC at the paper's scale).

HSC compresses the paper-scale AlexNet (4 classes, untrained seeded weights, MRI calibration images
upsampled, as `paper_scale.py`) at each MAC budget; the same model is then timed with its region
layers assembling their output both ways — `write` (what eager inference does,
`hsc_plugin.modules.assembly`, every map written whatever its size) and `cat` (`torch.cat` along the tiling's tree, what autograd and
export see) — beside the dense model, in one run of warm turns (3 calls in a row, the first
untimed; per-turn ratios to the dense model, median [q1, q3]).

    python benchmarks/region_assembly.py --data ../shared/data/brain-mri-128 --out benchmarks/results/region_assembly.md
    python benchmarks/region_assembly.py --size 128 --runs 3 --budgets 6x --batches 1
    python benchmarks/region_assembly.py --model mri --batches 1 32 --out benchmarks/results/region_assembly_mri.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from paper_scale import benchmark_model, warm_speedups  # noqa: E402

from hsc_plugin import Budget, compress, measure_costs  # noqa: E402
from hsc_plugin.modules import assembly  # noqa: E402


class Patched(nn.Module):
    """``model`` run with ``hsc_plugin.modules.assembly.<name>`` set to ``value``."""

    def __init__(self, model: nn.Module, name: str, value: object) -> None:
        super().__init__()
        self.model, self.name, self.value = model, name, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = getattr(assembly, self.name)
        setattr(assembly, self.name, self.value)
        try:
            return self.model(x)
        finally:
            setattr(assembly, self.name, kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/brain-mri-128"))
    ap.add_argument("--budgets", nargs="+", default=["3x", "6x"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--calib", type=int, default=None, help="calibration images (32 for alexnet, 256 for mri)")
    ap.add_argument("--model", default="alexnet", choices=["alexnet", "mri"],
                    help="alexnet: the paper-scale AlexNet (untrained, --size px); mri: the committed MRI checkpoint")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, calib, dense_macs, title = benchmark_model(args.model, args.data, args.calib, args.size)
    lines = [f"# Region assembly: HSC's defaults on {title}", "",
             f"Command: `python benchmarks/region_assembly.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. One compressed model per budget, timed "
             f"with its region layers writing every map (`write`), concatenating (`cat`), and as eager inference does "
             f"(`default`: maps of at least {assembly.PASTE_MIN_ELEMENTS} elements written), {args.runs} warm turns "
             "each, interleaved with the dense model; speed-up median [q1, q3] and its share of the MAC ratio.", "",
             "| budget | batch | layout | MAC ratio | cat | write | default | share of MAC ratio (cat → write → default) "
             "| forms |", "|---|---|---|---|---|---|---|---|---|"]
    for bname in args.budgets:
        res = compress(base, "hsc", calib=calib, budget=Budget(float(bname.rstrip("x"))), progress=False)
        comp = res.model.eval()
        ratio = dense_macs / measure_costs(comp, calib[:1]).macs
        forms = Counter(L.details.get("form") or L.module for L in res.report.layers if L.status == "factorised")
        form_text = "; ".join(f"{n}× {f}" for f, n in forms.items())
        for layout in args.layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            dense = copy.deepcopy(base).to(memory_format=fmt)
            model = copy.deepcopy(comp).to(memory_format=fmt)
            for batch in args.batches:
                x = torch.randn(batch, *calib.shape[1:]).contiguous(memory_format=fmt)
                variants = {"cat": Patched(model, "_pasting", lambda parts, boxes: False),  # as under autograd
                            "write": Patched(model, "PASTE_MIN_ELEMENTS", 0), "default": model}
                s = warm_speedups(dense, variants, x, args.runs)
                cell = {n: f"{v[1]:.2f}× [{v[0]:.2f}, {v[2]:.2f}]" for n, v in s.items()}
                share = " → ".join(f"{100 * s[n][1] / ratio:.0f} %" for n in ("cat", "write", "default"))
                lines.append(f"| {bname} | {batch} | {layout} | {ratio:.2f}× | {cell['cat']} | {cell['write']} "
                             f"| {cell['default']} | {share} | {form_text} |")
                print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
