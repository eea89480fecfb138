"""Low-rank compress → torch-pruning prunes 30% of channels → fine-tune → count MACs both ways.

    python examples/tp_prune.py [--method global_svd|tucker2|hsc] [--size 64] [--steps 20]

A timm resnet18 (pretrained=False, 10 classes) on random data, so it runs offline in seconds on
a CPU; swap in your model and data loader. ``LowRankPruner`` is driven like a tp pruner
(``step()``); ``tp_kwargs`` is what makes tp prune the compressed model correctly.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch_pruning as tp

from hsc_plugin.adapters.torch_pruning import LowRankPruner, compare_macs, tp_kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="global_svd", choices=["global_svd", "tucker2", "hsc"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="fine-tuning steps")
    ap.add_argument("--macs-ratio", type=float, default=2.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    images = torch.randn(16, 3, args.size, args.size)
    labels = torch.randint(0, 10, (16,))
    example = images[:1]
    rows = [("dense", compare_macs(model, example))]

    # 1. Low-rank compression, tp style: the pruner changes `model` in place.
    options = {"grid": 2} if args.method == "hsc" else {}
    pruner = LowRankPruner(model, example, method=args.method, macs_ratio=args.macs_ratio, calib=images,
                           ignored_layers=[model.fc], progress=False, **options)
    pruner.step()
    rows.append((f"{args.method} {args.macs_ratio:g}x", compare_macs(model, example)))

    # 2. torch-pruning removes 30% of the channels; ranks stay (they are in ignored_layers).
    kw = tp_kwargs(model)
    kw["ignored_layers"].append(model.fc)  # keep the 10 classes
    tp_pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                     pruning_ratio=0.3, **kw)
    tp_pruner.step()
    rows.append(("+ tp 30% channels", compare_macs(model, example)))

    # 3. Fine-tune a few steps (new parameters: build the optimizer after pruning).
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    print(f"fine-tuned {args.steps} steps, last loss {loss.item():.3f}")

    # 4. Count: ours = conv/linear MACs per sample; tp = MACs per sample incl. bias adds, BN, ReLU, pool.
    print(f"{'model':<22}{'ours MACs':>14}{'tp conv/linear':>16}{'tp total':>14}{'params':>12}")
    for name, c in rows:
        print(f"{name:<22}{c.ours:>14,}{c.tp_conv_linear:>16,}{c.tp_total:>14,}{c.params:>12,}")
        assert c.agree, f"counters disagree on {name}"
    out = model(images[:2])
    assert out.shape == (2, 10) and torch.isfinite(out).all()


if __name__ == "__main__":
    main()
