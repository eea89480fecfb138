"""HSC vs Global SVD vs Tucker-2 on the brain-MRI AlexNet, without fine-tuning (issue: HSC).

Prints, for 3x and 6x fewer MACs: test accuracy (bootstrap SE), macro-F1, MACs, params and
measured CPU latency (2 threads, batch 1 and 32, median of 20 runs after warm-up), and writes
benchmarks/results/hsc_mri.{md,json} and a Pareto plot.

    python benchmarks/hsc_mri.py --data ../shared/data/brain-mri-128
    python benchmarks/hsc_mri.py --data ../shared/data/brain-mri-128 --checkpoint model.pt

Without --checkpoint the model is trained with ``paper_recipe()`` (or loaded from the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from hsc_plugin.mri import alexnet_mri, load_or_train, load_split, paper_recipe
from hsc_plugin.mri.experiment import DEFAULT_SETTINGS, Setting, run_comparison
from hsc_plugin.mri.report import machine_description, markdown_table, plot_pareto, save_json, text_table

EXTRA = (
    Setting("hsc 1x1 regions, 4 balanced input clusters", "hsc",
            {"partition": "none", "channel_side": "input", "n_clusters": 4, "balanced": True}),
    Setting("hsc 2x2 regions, 4 balanced input clusters", "hsc",
            {"grid": (2, 2), "channel_side": "input", "n_clusters": 4, "balanced": True, "min_region": 4}),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", help="state_dict of alexnet_mri trained with the recipe's size/width")
    ap.add_argument("--size", type=int, help="input size (default: the recipe's)")
    ap.add_argument("--width", type=float, help="width multiplier (default: the recipe's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-latency", action="store_true", help="skip latency (e.g. on a busy machine)")
    ap.add_argument("--tag", default="hsc_mri", help="file name stem of the outputs")
    ap.add_argument("--save-models", help="folder to keep the compressed models in (for latency_mri.py)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    recipe = paper_recipe()
    if args.size or args.width:
        recipe = dataclasses.replace(recipe, input_size=args.size or recipe.input_size,
                                     width=args.width or recipe.width)
    train = load_split(args.data, "train", recipe.input_size)
    test = load_split(args.data, "test", recipe.input_size)

    def factory() -> torch.nn.Module:
        return alexnet_mri(width=recipe.width, input_size=recipe.input_size)

    if args.checkpoint:
        model = factory()
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    else:
        model = load_or_train(f"alexnet_mri-{recipe.input_size}-{recipe.width}-s{args.seed}.pt", factory, train,
                              seed=args.seed, **recipe.train_kwargs())
    model.eval()
    rows = run_comparison(model, train, test, settings=DEFAULT_SETTINGS + EXTRA, ratios=tuple(args.ratios),
                          seed=args.seed, progress=False, latency=not args.no_latency,
                          save_dir=args.save_models)
    print(text_table(rows))
    out = Path(args.out_dir)
    command = "python benchmarks/hsc_mri.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command, "machine": machine_description(), "recipe": dataclasses.asdict(recipe),
            "seconds": time.perf_counter() - start}
    save_json(rows, out / f"{args.tag}.json", meta)
    plot_pareto(rows, out / f"{args.tag}_pareto.png", title="brain-MRI AlexNet, no fine-tuning")
    (out / f"{args.tag}.md").write_text(
        f"# HSC vs baselines on brain-MRI (no fine-tuning)\n\nCommand: `{command}`  \nMachine: {meta['machine']}  \n"
        f"Wall time: {meta['seconds'] / 60:.1f} min\n\n{markdown_table(rows)}\n\n![Pareto]({args.tag}_pareto.png)\n")
    print(f"written {out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
