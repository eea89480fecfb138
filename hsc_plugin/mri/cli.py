"""``hsc demo``, ``hsc reproduce`` and ``hsc sweep``: the brain-MRI experiment from the command
line, added to ``hsc`` by the ``hsc_cli_commands`` hook (this module is the experiment's plugin,
registered in the ``hsc_plugin`` entry-point group like the built-in strategies)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hsc_plugin.registry import hookimpl

__all__ = ["add_commands", "demo", "reproduce", "hsc_cli_commands"]


@hookimpl
def hsc_cli_commands(subparsers: Any) -> None:
    """``hsc demo``, ``hsc reproduce`` and ``hsc sweep`` (NNI, :mod:`hsc_plugin.mri.sweep`)."""
    from hsc_plugin.mri.sweep import add_commands as add_sweep

    add_commands(subparsers)
    add_sweep(subparsers)


def _trained_model(data: Path, recipe: Any, seed: int, prefix: str, progress: bool):
    from hsc_plugin.mri import alexnet_mri, load_or_train, load_split, model_cache_name

    train = load_split(data, "train", recipe.input_size)
    test = load_split(data, "test", recipe.input_size)
    name = model_cache_name(prefix, data, recipe, seed)
    t0 = time.perf_counter()
    model = load_or_train(name, lambda: alexnet_mri(width=recipe.width, input_size=recipe.input_size), train,
                          seed=seed, progress=progress, **recipe.train_kwargs())
    return model, train, test, time.perf_counter() - t0


def _warn_oversubscribed() -> None:
    """A slow run should explain itself: other busy processes plus torch's threads > cores."""
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return
    cores = os.cpu_count() or 1
    if load + torch.get_num_threads() > cores + 0.5:
        print(f"warning: load average {load:.1f} + {torch.get_num_threads()} torch threads on {cores} cores: "
              "oversubscribed, timings and run time will suffer", file=sys.stderr)


def demo(args: argparse.Namespace) -> int:
    """Train (or reuse) a small AlexNet on the bundled sample, compress it 3× with every method,
    print the comparison, write the JSON report and the Pareto plot."""
    from hsc_plugin.mri import default_data_path, demo_recipe
    from hsc_plugin.mri.experiment import QUICK_SETTINGS, run_comparison
    from hsc_plugin.mri.report import machine_description, plot_pareto, save_json, text_table

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    data = Path(args.data) if args.data else default_data_path()
    out = Path(args.out_dir)
    recipe = demo_recipe()
    print(f"data: {data}")
    _warn_oversubscribed()
    model, train, test, t_train = _trained_model(data, recipe, args.seed, "alexnet_mri-demo", not args.quiet)
    print(f"model: alexnet_mri(width={recipe.width}, input_size={recipe.input_size}) ready in {t_train:.0f}s "
          f"({len(train)} train / {len(test)} test images)")
    rows = run_comparison(model, train, test, settings=QUICK_SETTINGS, ratios=tuple(args.ratios), n_calib=128,
                          latency_runs=20, n_boot=1000, seed=args.seed, progress=None if not args.quiet else False)
    print()
    print(text_table(rows))
    meta = {"command": "hsc demo " + " ".join(sys.argv[2:]), "data": str(data), "machine": machine_description(),
            "recipe": vars(recipe) if hasattr(recipe, "__dict__") else str(recipe),
            "seconds": time.perf_counter() - start}
    js = save_json(rows, out / "demo_report.json", meta)
    png = plot_pareto(rows, out / "demo_pareto.png", title="hsc demo: bundled brain-MRI sample")
    print(f"\nreport: {js}\nplot:   {png}\ntotal {time.perf_counter() - start:.0f}s")
    return 0


_TORCH_CELLS = (("b1", "", 1), ("b32", "", 32), ("NHWC b1", "_cl", 1), ("b32", "_cl", 32))


def _timing_line(key: str, t: dict[str, Any], seconds: float) -> str:
    """One progress line of the latency pass: every column's ms, "(disturbed)" where it was."""
    from hsc_plugin.mri.experiment import ORT_BATCHES

    cells = [f"{name} {t[f'latency{cl}_b{b}_ms']:7.3f} ms" + (" (disturbed)" if t[f"latency{cl}_b{b}_disturbed"] else "")
             for name, cl, b in _TORCH_CELLS]
    if "ort_note" in t:
        cells.append(f"ORT {t['ort_note']}")
    cells += [f"ORT b{b} {t[f'ort_b{b}_ms']:7.3f} ms" + (" (disturbed)" if t[f"ort_b{b}_disturbed"] else "")
              for b in ORT_BATCHES if f"ort_b{b}_ms" in t]
    return f"{key:<60} {'  '.join(cells)}  ({seconds:.0f}s)"


def measure_saved_latency(args: argparse.Namespace) -> int:
    """Second pass of ``hsc reproduce``: latency needs an idle machine, accuracy does not. Load the
    models kept by ``--save-models``, time each interleaved with the uncompressed model (2 threads,
    batch 1 and 32, NCHW and channels_last, median of ``--latency-runs`` after warm-up; and in
    ONNX Runtime with BatchNorm folded, unless ``--no-ort``), and rewrite the results with the
    latency."""
    import json

    from hsc_plugin import load
    from hsc_plugin.mri import alexnet_mri, paper_recipe
    from hsc_plugin.mri.experiment import latency_columns, model_slug
    from hsc_plugin.mri.report import machine_description, plot_pareto, results_markdown, save_json

    start = time.perf_counter()
    out = Path(args.out_dir)
    saved = json.loads((out / "results.json").read_text())
    rows, meta = saved["rows"], saved["meta"]
    recipe = paper_recipe()
    shape = (1, recipe.input_size, recipe.input_size)

    def fresh() -> torch.nn.Module:
        return alexnet_mri(width=recipe.width, input_size=recipe.input_size).eval()

    dense = fresh()  # timed interleaved with every compressed model (its weights do not change its time)
    timed: dict[str, dict[str, Any]] = {}

    def timing(key: str, model: torch.nn.Module, paired: bool) -> dict[str, Any]:
        if key not in timed:
            t0 = time.perf_counter()
            timed[key] = latency_columns(model, shape, args.latency_runs, dense if paired else None, not args.no_ort)
            print(_timing_line(key, timed[key], time.perf_counter() - t0), flush=True)
        return timed[key]

    for row in rows:
        if row.get("stage") == "failed":
            continue
        for k in [k for k in row if k.startswith(("ort_", "dense_ort_"))]:
            del row[k]  # a rerun with --no-ort leaves no stale ORT column
        if row["method"] == "original":
            t = timing("uncompressed", dense, paired=False)
        else:
            slug = model_slug(row["setting"], row["ratio"])  # fine-tuned rows share the structure
            t = timing(slug, load(Path(args.measure_latency) / slug, fresh()), paired=True)
        row.update(t)
    cmd = "hsc reproduce " + " ".join(sys.argv[2:])
    first = meta.get("accuracy_command", meta["command"])  # the accuracy pass (rerunning this pass keeps it)
    meta = dict(meta, accuracy_command=first, latency_command=cmd, latency_machine=machine_description())
    meta["command"] = f"{first}` then `{cmd}"
    save_json(rows, out / "results.json", meta)
    plot_pareto(rows, out / "pareto.png", title="brain-MRI AlexNet: accuracy vs cost")
    (out / "RESULTS.md").write_text(results_markdown(rows, meta))
    print(f"latency added to {out / 'RESULTS.md'}\ntotal {time.perf_counter() - start:.0f}s")
    return 0


def reproduce(args: argparse.Namespace) -> int:
    """The paper's experiment: every method at 3× and 6×, compress-only and fine-tuned."""
    if args.measure_latency:
        return measure_saved_latency(args)
    from hsc_plugin.mri import paper_recipe
    from hsc_plugin.mri.experiment import DEFAULT_SETTINGS, PAPER_SETTINGS, QUICK_SETTINGS, run_comparison
    from hsc_plugin.mri.report import PAPER, machine_description, plot_pareto, results_markdown, save_json, text_table

    if not args.data:
        raise SystemExit("hsc reproduce: --data is required (e.g. --data ../shared/data/brain-mri-128)")
    start = time.perf_counter()
    _warn_oversubscribed()
    data = Path(args.data)
    out = Path(args.out_dir)
    recipe = paper_recipe()
    if args.checkpoint:
        from hsc_plugin.mri import alexnet_mri, load_split

        t0 = time.perf_counter()
        train, test = load_split(data, "train", recipe.input_size), load_split(data, "test", recipe.input_size)
        model = alexnet_mri(width=recipe.width, input_size=recipe.input_size)
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
        model.eval()
        t_train = time.perf_counter() - t0
    else:
        model, train, test, t_train = _trained_model(data, recipe, args.seed, "alexnet_mri-paper", not args.quiet)
    print(f"model: alexnet_mri(width={recipe.width}, input_size={recipe.input_size}) "
          f"{'loaded from ' + args.checkpoint if args.checkpoint else 'ready'} with the data in {t_train:.0f}s "
          f"({len(train)} train / {len(test)} test images)", flush=True)
    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS if args.all_settings else PAPER_SETTINGS
    rows = run_comparison(model, train, test, settings=settings, ratios=tuple(args.ratios), n_calib=args.n_calib,
                          finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                          finetune_optimizer=args.finetune_optimizer, latency=not args.no_latency, ort=not args.no_ort,
                          seed=args.seed,
                          progress=None if not args.quiet else False, save_dir=args.save_models)
    print(text_table(rows))
    command = "hsc reproduce " + " ".join(sys.argv[2:])
    seconds = time.perf_counter() - start
    meta = {"command": command, "data": str(data), "machine": machine_description(), "recipe": str(recipe),
            "seconds": seconds, "train_or_load_seconds": t_train, "paper": PAPER}
    save_json(rows, out / "results.json", meta)
    plot_pareto(rows, out / "pareto.png", title="brain-MRI AlexNet: accuracy vs cost")
    (out / "RESULTS.md").write_text(results_markdown(rows, meta))
    print(f"written {out / 'RESULTS.md'}\ntotal {time.perf_counter() - start:.0f}s")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``hsc demo`` and ``hsc reproduce`` on the ``hsc`` sub-command parser."""
    d = sub.add_parser("demo", help="the main job: train, compress 3x with every method, compare (bundled data)")
    d.add_argument("--data", help="data folder (Kaggle layout); default: $HSC_MRI_DATA or the bundled sample")
    d.add_argument("--out-dir", default="hsc-demo", help="where the JSON report and the plot go")
    d.add_argument("--ratios", type=float, nargs="+", default=[3.0])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=demo)

    r = sub.add_parser("reproduce", help="the paper's experiment on the full brain-MRI data")
    r.add_argument("--data", help="data folder, e.g. ../shared/data/brain-mri-128 (required unless --measure-latency)")
    r.add_argument("--out-dir", default="benchmarks/results")
    r.add_argument("--ratios", type=float, nargs="+", default=[3.0, 6.0, 10.0])
    r.add_argument("--finetune-epochs", type=int, default=2)
    r.add_argument("--finetune-lr", type=float, default=1e-3)
    r.add_argument("--finetune-optimizer", default="sgd", choices=["sgd", "adamw"])
    r.add_argument("--n-calib", type=int, default=256)
    r.add_argument("--no-latency", action="store_true")
    r.add_argument("--save-models", help="keep every compressed model here (hsc_plugin.save format)")
    r.add_argument("--measure-latency", metavar="MODELS_DIR",
                   help="second pass, on an idle machine: time the models saved by --save-models and add "
                        "the latency to --out-dir's results")
    r.add_argument("--latency-runs", type=int, default=20)
    r.add_argument("--no-ort", action="store_true",
                   help="skip the ONNX Runtime latency column (on by default when onnxruntime imports)")
    r.add_argument("--quick", action="store_true", help="three settings only (tests)")
    r.add_argument("--all-settings", action="store_true", help="every HSC setting of benchmarks/hsc_mri.py")
    r.add_argument("--checkpoint", help="state_dict of the model trained with paper_recipe() (skips training)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=reproduce)
