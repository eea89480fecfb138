"""Do the MRI trainer's short runs give bit-identical weights before and after a refactor?

Runs, on the committed checkpoint and the first 256 seeded training images (one thread, CPU):
``train`` for one epoch (warm-up + cosine, augmentation), and ``finetune`` for one epoch of a
3x data-aware Global SVD student distilled from the checkpoint, with augmentation (AdamW) and
without (SGD, the reproduction's recipe). ``--save FILE`` keeps the resulting state_dicts;
``--compare FILE`` prints the largest absolute difference of every run against a saved file.

    python benchmarks/finetune_equivalence.py --data ../shared/data/brain-mri-128 --save before.pt
    # ... change the code ...
    python benchmarks/finetune_equivalence.py --data ../shared/data/brain-mri-128 --compare before.pt
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.utils.data import TensorDataset

from _common import checkpoint_model_and_data  # benchmarks/_common.py (scripts run from this folder)
from hsc_plugin import Budget, compress
from hsc_plugin.mri.train import finetune, train


def runs(data: str, n: int) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts after each short run."""
    model, full, _, calib = checkpoint_model_and_data(data)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(full), generator=g)[:n]
    subset = TensorDataset(full.tensors[0][idx], full.tensors[1][idx])
    out: dict[str, dict[str, torch.Tensor]] = {}
    scratch = copy.deepcopy(model)
    train(scratch, subset, epochs=1, lr=2e-3, batch_size=64, seed=0, device="cpu", progress=False)
    out["train 1 epoch, augmented"] = scratch.state_dict()
    student = compress(model, "global_svd", calib=calib, budget=Budget(3.0), data_aware=True, progress=False).model
    for name, kw in (("finetune sgd, no augmentation", {"optimizer": "sgd", "lr": 1e-3, "augment": False}),
                     ("finetune adamw, augmented", {"optimizer": "adamw", "lr": 5e-4, "augment": True})):
        tuned = finetune(copy.deepcopy(student), subset, epochs=1, teacher=model, seed=0, device="cpu",
                         progress=False, **kw)
        out[name] = tuned.state_dict()
    return {k: {n: t.detach().clone() for n, t in v.items()} for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=256, help="training images")
    ap.add_argument("--save")
    ap.add_argument("--compare")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = runs(args.data, args.n)
    if args.save:
        torch.save(result, args.save)
        print(f"saved {len(result)} runs to {args.save}")
    if args.compare:
        ref = torch.load(args.compare, weights_only=True)
        worst = 0.0
        for run, state in result.items():
            diff = max((state[k].double() - ref[run][k].double()).abs().max().item() for k in state)
            same = all(torch.equal(state[k], ref[run][k]) for k in state) and state.keys() == ref[run].keys()
            print(f"{run:<34} max |diff| {diff:.3g}  {'bit-identical' if same else 'DIFFERENT'}")
            worst = max(worst, diff)
        return 0 if worst == 0.0 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
