"""Are two checkouts the same compressor? Compress fixed models with every method and compare.

Run once on a checkout to record (``--save DIR``), then on another to compare (``--compare DIR``):
every compressed ``state_dict`` must agree within ``--atol`` (default 1e-6) — or, where factors are
stored differently (a sign, a basis of repeated singular values), the compressed models' outputs on
the calibration inputs within ``--output-rtol`` of the largest — and every report must be equal on
the fields both checkouts write (its JSON, ignoring wall-clock fields; floats to ``--rtol``, default
1e-9, since error *measurements* summed in another order differ in the last digits; fields only one
side writes are listed, not failed). This is how a behaviour-preserving refactor is checked: record
on the commit before it, compare on the commit after it. To record an older commit with this
script, run it with that commit's package on the path (a venv with ``pip install --no-deps -e``).

    python benchmarks/refactor_equivalence.py --save /tmp/eq_before      # on the old commit
    python benchmarks/refactor_equivalence.py --compare /tmp/eq_before   # on the new one

Models: timm ``resnet18`` (64 px, seeded weights, 32 seeded MRI-like calibration images from the
bundled sample) and the committed MRI AlexNet checkpoint on 64 of its seeded calibration images;
methods: HSC defaults, Global SVD (data-free and data-aware), Tucker-2 (data-free and data-aware),
all at 3× fewer MACs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("hsc", "hsc", {}),
    ("hsc_output", "hsc", {"channel_side": "output"}),
    ("hsc_quadtree_balanced", "hsc", {"partition": "quadtree", "balanced": True}),
    ("hsc_params", "hsc", {"budget": "params=3x"}),
    ("tucker2_da_params", "tucker2", {"data_aware": True, "budget": "params=3x"}),
    ("global_svd", "global_svd", {}),
    ("global_svd_da", "global_svd", {"data_aware": True}),
    ("tucker2", "tucker2", {}),
    ("tucker2_da", "tucker2", {"data_aware": True}),
]
_VOLATILE = {"seconds", "elapsed", "time_s", "wall_s", "duration"}


def _models() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    import timm

    from hsc_plugin.mri import alexnet_mri, load_split, paper_recipe
    from hsc_plugin.mri.data import bundled_sample_path

    ckpt = Path(__file__).resolve().parent / "checkpoints" / "alexnet_mri-128-w0.5-e40-s0.pt"
    recipe = paper_recipe()
    train = load_split(bundled_sample_path(), "train", recipe.input_size)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=g)[:64]
    x_mri = torch.stack([train[int(i)][0] for i in idx])
    alex = alexnet_mri(width=recipe.width, input_size=recipe.input_size)
    alex.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))

    torch.manual_seed(0)
    r18 = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    x64 = torch.nn.functional.interpolate(x_mri[:32], size=64, mode="bilinear", align_corners=False)
    return {"mri_alexnet": (alex.eval(), x_mri), "resnet18": (r18, x64.repeat(1, 3, 1, 1))}


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


LEGACY: dict[str, Any] = {}


def _same(a: Any, b: Any, rtol: float) -> bool:
    """JSON values equal, floats within ``rtol`` of each other."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rtol * max(abs(a), abs(b)) or a == b
    return a == b


def _first_difference(a: Any, b: Any, rtol: float, path: str = "report") -> str:
    """Where two JSON values first differ beyond ``rtol`` (and by how much), or ``""``."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(set(a) ^ set(b))[:3]}"
        return next((d for k in a if (d := _first_difference(a[k], b[k], rtol, f"{path}.{k}"))), "")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, rtol, f"{path}[{i}]"))), "")
    if _same(a, b, rtol):
        return ""
    if isinstance(a, float) and isinstance(b, float):
        return f"{path}: {a!r} vs {b!r} (rel {abs(a - b) / max(abs(a), abs(b)):.1e})"
    return f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}"


def _shared(a: Any, b: Any, path: str, only: list[str]) -> tuple[Any, Any]:
    """``a`` and ``b`` with every dict cut to the keys both have; the others are listed in ``only``
    (fields one checkout adds are news, not differences)."""
    if isinstance(a, dict) and isinstance(b, dict):
        only.extend(f"{path}.{k}" for k in sorted(set(a) ^ set(b)))
        keys = [k for k in a if k in b]
        pairs = {k: _shared(a[k], b[k], f"{path}.{k}", only) for k in keys}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = [_shared(x, y, f"{path}[]", only) for x, y in zip(a, b)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return a, b


def run() -> dict[str, tuple[dict[str, torch.Tensor], Any, torch.Tensor]]:
    from hsc_plugin import compress

    out = {}
    for mname, (model, x) in _models().items():
        for cname, method, opts in CASES:
            opts = dict(opts)
            budget = opts.pop("budget", "3x")
            extra = {} if not LEGACY else {"bn_reestimation": False, "sequential_refit": False,
                                           **({"alternatives": False} if method == "hsc" else {})}
            res = compress(model, method, calib=x, budget=budget, progress=False, seed=0, **opts, **extra)
            sd = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
            rep = _clean(json.loads(json.dumps(res.report.to_dict(), default=str)))
            with torch.no_grad():
                y = res.model(x).detach().clone()
            out[f"{mname}/{cname}"] = (sd, rep, y)
            print(f"{mname}/{cname}: {res.report.macs_ratio:.3f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path)
    g.add_argument("--compare", type=Path)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-9, help="relative tolerance of the reports' floats")
    p.add_argument("--output-rtol", type=float, default=1e-5,
                   help="where the state_dicts differ: tolerance of the compressed models' outputs on the "
                        "calibration inputs, relative to the largest (same function, factors stored differently)")
    p.add_argument("--legacy", action="store_true",
                   help="compress with the options that turn later behaviour off (no label-free recovery or sequential refit; HSC "
                        "with alternatives=False), to compare the old paths with a checkout that predates them")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.legacy:
        LEGACY["on"] = True
    results = run()
    if a.save:
        a.save.mkdir(parents=True, exist_ok=True)
        for key, (sd, rep, y) in results.items():
            stem = key.replace("/", "__")
            torch.save(sd, a.save / f"{stem}.pt")
            torch.save(y, a.save / f"{stem}.out.pt")
            (a.save / f"{stem}.json").write_text(json.dumps(rep, indent=1, sort_keys=True))
        print(f"saved {len(results)} cases to {a.save}")
        return 0
    bad = 0
    for key, (sd, rep, y) in results.items():
        stem = key.replace("/", "__")
        ref_sd = torch.load(a.compare / f"{stem}.pt", weights_only=True)
        ref_rep = json.loads((a.compare / f"{stem}.json").read_text())
        if set(sd) != set(ref_sd):
            print(f"{key}: state_dict keys differ: {sorted(set(sd) ^ set(ref_sd))[:6]}")
            bad += 1
            continue
        diff = max(((sd[k].double() - ref_sd[k].double()).abs().max().item() if sd[k].numel() else 0.0)
                   for k in sd)
        if LEGACY:  # options and report fields that did not exist before
            rep = {k: v for k, v in rep.items() if k in ref_rep}
            rep["options"] = {k: v for k, v in rep["options"].items() if k in ref_rep["options"]}
            # before forms competed under every budget, alternatives=True offered them only under
            # latency budgets: at these MAC/param budgets that is today's alternatives=False
            rep["options"].pop("alternatives", None)
            ref_rep = {**ref_rep, "options": {k: v for k, v in ref_rep["options"].items() if k != "alternatives"}}
            for L, R in zip(rep.get("layers", []), ref_rep.get("layers", [])):
                L["details"] = {k: v for k, v in L["details"].items() if k in R["details"]}
        only: list[str] = []
        rep, ref_rep = _shared(json.loads(json.dumps(rep, sort_keys=True)), ref_rep, "report", only)
        same_rep = _same(rep, ref_rep, a.rtol)
        same = diff <= a.atol
        how = f"max |diff| {diff:.2e}"
        out_ref = a.compare / f"{stem}.out.pt"
        if not same and out_ref.exists():
            # Factors are defined up to sign (and rotation within repeated singular values): the
            # same compressed layer can be stored differently. What must agree is what it computes.
            y_ref = torch.load(out_ref, weights_only=True).double()
            dy = (y.double() - y_ref).abs().max().item() / max(1e-30, y_ref.abs().max().item())
            same = dy <= a.output_rtol
            how += f" (factors), outputs max |diff| {dy:.2e} of the largest"
        ok = same and same_rep
        bad += not ok
        news = f"; fields on one side only: {', '.join(only[:4])}{' …' if len(only) > 4 else ''}" if only else ""
        if not same_rep:
            news += f"; first difference {_first_difference(rep, ref_rep, a.rtol)}"
        print(f"{key}: {how}, report {'equal' if same_rep else 'DIFFERS'}{news} -> {'ok' if ok else 'FAIL'}")
    print(f"{len(results) - bad} equal, {bad} different")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
