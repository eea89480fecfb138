"""Train the brain-MRI AlexNet with the paper recipe and print test metrics with bootstrap SEs.

    python benchmarks/train_mri.py --data /work/shared/data/brain-mri-128 --out mri_alexnet.pt

Trains on the ``train`` split (``Training`` for the Kaggle download), evaluates on ``test``,
saves the state_dict to ``--out`` and a JSON of the metrics next to it (``.json``). ``--demo``
uses the demo recipe (for the bundled sample). Defaults come from
``hsc_plugin.mri.train.paper_recipe()``; every field can be overridden.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hsc_plugin.mri import (
    CLASSES,
    alexnet_mri,
    bootstrap_se,
    classification_metrics,
    default_data_path,
    demo_recipe,
    format_table,
    load_split,
    paper_recipe,
)
from hsc_plugin.mri.train import evaluate, train


def _macs(model: torch.nn.Module, size: int) -> int:
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 1, size, size))
    return counter.get_total_flops() // 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="data root (default: $HSC_MRI_DATA "
                    "or the bundled sample)")
    ap.add_argument("--out", type=Path, default=Path("mri_alexnet.pt"))
    ap.add_argument("--demo", action="store_true", help="use the demo recipe")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--width", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = demo_recipe() if args.demo else paper_recipe()
    size = args.size or recipe.input_size
    width = args.width or recipe.width
    kwargs = recipe.train_kwargs()
    for key, value in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)):
        if value is not None:
            kwargs[key] = value
    data = args.data or default_data_path()

    start = time.perf_counter()
    train_data = load_split(data, "train", size=size)
    test_data = load_split(data, "test", size=size)
    load_s = time.perf_counter() - start
    torch.manual_seed(args.seed)
    model = alexnet_mri(width=width, input_size=size)
    params = sum(p.numel() for p in model.parameters())
    macs = _macs(model, size)
    print(f"data {data}: train {len(train_data)}, test {len(test_data)} (loaded in {load_s:.1f} s)")
    print(f"model: width {width}, input {size}px, {macs / 1e6:.1f} M MACs, {params / 1e6:.3f} M "
          f"params; recipe {kwargs}")
    hist = train(model, train_data, seed=args.seed, device=args.device,
                 progress=not args.no_progress, **kwargs)
    y_true, y_pred = evaluate(model, test_data, device=args.device)
    model.cpu()
    metrics = classification_metrics(y_true, y_pred, len(CLASSES))
    se = bootstrap_se(y_true, y_pred, len(CLASSES), n_resamples=1000, seed=0)

    rows = [{"metric": "accuracy", "value": metrics["accuracy"], "se": se["accuracy"]},
            {"metric": "macro_f1", "value": metrics["macro_f1"], "se": se["macro_f1"]}]
    for i, name in enumerate(CLASSES):
        rows.append({"metric": f"f1[{name}]", "value": metrics["f1"][i], "se": se["f1"][i]})
    print(f"trained {kwargs['epochs']} epochs in {hist['time_s']:.1f} s on {hist['device']} "
          f"({args.threads} threads); final train loss {hist['loss'][-1]:.4f}")
    print(format_table(rows, ["metric", "value", "se"]))
    print("confusion (rows true, cols predicted; " + ", ".join(CLASSES) + "):")
    for row in metrics["confusion"]:
        print("  " + " ".join(f"{v:5d}" for v in row))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    summary = {
        "data": str(data), "input_size": size, "width": width, "seed": args.seed,
        "threads": args.threads, "macs": macs, "params": params, "train_time_s": hist["time_s"],
        "device": hist["device"], **kwargs, "metrics": metrics, "bootstrap_se": se,
        "history": {k: hist[k] for k in ("loss", "train_acc", "lr")},
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"saved {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
