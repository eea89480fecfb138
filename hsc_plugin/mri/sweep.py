"""``hsc sweep``: HSC's hyper-parameter search as an NNI experiment (extra ``[nni]``).

Every trial compresses the same trained brain-MRI classifier with one point of the search space
(regions grid, channel clusters, channel side, MAC budget; optionally partition and energy τ)
and reports test accuracy, macro-F1, MACs, parameters (and CPU latency when asked) with
``nni.report_final_result``. Both baselines (data-aware Global SVD and Tucker-2) are points of
the default search space, so they run as trials too and land on the same Pareto axes. NNI
schedules the trials: on this machine (the local training service, the default) or on remote
machines and clusters through NNI's other training services (see ``docs/sweep.md``).

This module is the command (``hsc sweep``, registered by the experiment's CLI plugin) and the
trial (``python -m hsc_plugin.mri.sweep trial ...``, what NNI runs). The pieces that need no NNI
(search space → compressor arguments, trials → Pareto rows) are in :mod:`.sweep_space`; the
experiment config and driving NNI in :mod:`.sweep_nni`. NNI is imported only where it is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from hsc_plugin.mri.sweep_nni import SweepResult, experiment_config, run_sweep
from hsc_plugin.mri.sweep_space import (
    DEFAULT_SEARCH_SPACE,
    TrialSpec,
    collect_rows,
    grid_size,
    load_search_space,
    pareto_table,
    trial_spec,
)

__all__ = [
    "DEFAULT_SEARCH_SPACE",
    "ModelSource",
    "SweepResult",
    "TrialSpec",
    "add_commands",
    "collect_rows",
    "experiment_config",
    "grid_size",
    "load_search_space",
    "pareto_table",
    "run_sweep",
    "run_trial",
    "trial_spec",
]

# ------------------------------------------------------------------------------------ trial


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The trained ``alexnet_mri`` checkpoint and the data every trial loads (paths as the trial
    machines see them); passed to trials on their command line."""

    data: str
    checkpoint: str
    input_size: int
    width: float

    def argv(self) -> list[str]:
        return ["--data", self.data, "--checkpoint", self.checkpoint, "--input-size", str(self.input_size),
                "--width", str(self.width)]


def _load(src: ModelSource):
    import torch

    from hsc_plugin.mri import alexnet_mri, load_split

    model = alexnet_mri(width=src.width, input_size=src.input_size)
    model.load_state_dict(torch.load(src.checkpoint, map_location="cpu", weights_only=True))
    model.eval()
    return model, load_split(src.data, "train", src.input_size), load_split(src.data, "test", src.input_size)


def _measure(model: Any, test: Any, latency: bool, n_boot: int, seed: int, dense: Any = None) -> dict[str, Any]:
    """Costs, accuracy and (``latency``) batch-1 CPU time; with ``dense`` the two models are timed
    interleaved (dense, model, dense, ...) and the row keeps the dense time it is compared with."""
    import torch

    from hsc_plugin.cost.macs import measure_costs
    from hsc_plugin.mri.experiment import evaluate_model

    shape = tuple(test.tensors[0].shape[1:])
    cost = measure_costs(model, torch.zeros(1, *shape))
    row: dict[str, Any] = {"macs": cost.macs, "params": cost.params}
    if latency:
        from hsc_plugin.cost.timing import measure_interleaved

        models = {"model": model} if dense is None else {"dense": dense, "model": model}
        t = measure_interleaved(models, shape, batch=1, runs=20, warmup=5, threads=torch.get_num_threads())
        row["latency_b1_ms"] = t["model"]["median_ms"]
        row["latency_b1_disturbed"] = any(bool(v["disturbed"]) for v in t.values())
        if dense is not None:
            row["dense_latency_b1_ms"] = t["dense"]["median_ms"]
    metrics = evaluate_model(model, test, n_boot=n_boot, seed=seed)
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return row


def run_trial(params: Mapping[str, Any], src: ModelSource, *, n_calib: int = 256, latency: bool = False,
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Compress the model with one point of the search space and measure it (one NNI trial)."""
    import torch

    from hsc_plugin.api import compress
    from hsc_plugin.budget import Budget
    from hsc_plugin.mri.experiment import calibration_subset

    spec = trial_spec(params)
    model, train, test = _load(src)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = compress(model, spec.method, calib=calibration_subset(train, n_calib, seed),
                      budget=None if spec.ratio is None else Budget(spec.ratio), seed=seed, progress=False,
                      **spec.options)
    row: dict[str, Any] = {"compress_s": time.perf_counter() - t0,
                           "achieved_ratio": float(result.report.achieved_ratio or 0.0)}
    row.update(_measure(result.model, test, latency, n_boot, seed, dense=model))
    return row


def _trial_main(args: argparse.Namespace) -> int:
    import nni
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    params = nni.get_next_parameter()
    if not params:  # run by hand, outside an experiment (NNI gives {} then)
        params = json.loads(args.params) if args.params else {"method": "hsc", "ratio": 3.0}
    src = ModelSource(args.data, args.checkpoint, args.input_size, args.width)
    row = run_trial(params, src, n_calib=args.n_calib, latency=args.latency, n_boot=args.n_boot, seed=args.seed)
    nni.report_final_result({"default": row["accuracy"], **row})
    print(json.dumps({"params": params, "result": row}))
    return 0


def _trial_command(src: ModelSource, *, python: str, threads: int, n_calib: int, latency: bool,
                   n_boot: int, seed: int) -> str:
    argv = [python, "-m", "hsc_plugin.mri.sweep", "trial", *src.argv(), "--threads", str(threads),
            "--n-calib", str(n_calib), "--n-boot", str(n_boot), "--seed", str(seed)]
    argv += ["--latency"] if latency else []
    return shlex.join(argv)



# ------------------------------------------------------------------------------------- CLI


def _prepare_model(args: argparse.Namespace, log: Any) -> ModelSource:
    """The trained model the trials share: ``--checkpoint``, or the demo model (trained once and
    cached, the same cache as ``hsc demo``), so no trial trains."""
    from hsc_plugin.mri import default_data_path, demo_recipe

    data = Path(args.data) if args.data else default_data_path()
    if args.checkpoint:
        recipe = demo_recipe()
        return ModelSource(str(data.resolve()), str(Path(args.checkpoint).resolve()),
                            args.input_size or recipe.input_size, args.width or recipe.width)
    from hsc_plugin.mri import alexnet_mri, cache_dir, load_or_train, load_split, model_cache_name

    recipe = demo_recipe()
    recipe = dataclasses.replace(recipe, **{k: v for k, v in (("input_size", args.input_size), ("width", args.width),
                                                              ("epochs", args.epochs)) if v})
    name = model_cache_name("alexnet_mri-demo", data, recipe, args.seed)
    path = cache_dir() / name
    if not path.is_file():
        log(f"training {recipe} on {data} (cached as {path})")
    load_or_train(path, lambda: alexnet_mri(width=recipe.width, input_size=recipe.input_size),
                  load_split(data, "train", recipe.input_size), seed=args.seed, progress=None if not args.quiet else False,
                  **recipe.train_kwargs())
    return ModelSource(str(data.resolve()), str(path), recipe.input_size, recipe.width)


def _training_service(value: str) -> str | dict[str, Any]:
    path = Path(value)
    if path.suffix.lower() in (".json", ".yml", ".yaml") and path.is_file():
        ts = load_search_space(path)  # same JSON-or-YAML reader
        return ts.get("trainingService", ts)
    return value


def _dump(cfg: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(cfg), sort_keys=False, allow_unicode=True)


def sweep(args: argparse.Namespace) -> int:
    """``hsc sweep``: run the search, then write the Pareto table, JSON and plot."""
    import torch

    start = time.perf_counter()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space = load_search_space(args.search_space)
    ts = _training_service(args.training_service)
    local = ts == "local" or (isinstance(ts, dict) and ts.get("platform") == "local")
    if not local and args.config is None and not (args.data and args.checkpoint):
        raise ValueError("other training services need --data and --checkpoint paths that exist on the trial "
                         "machines; see docs/sweep.md")
    # Trials on other machines: their own thread count (0 = torch's default), python3 on their PATH.
    threads = args.threads if args.threads is not None else (
        max(1, (os.cpu_count() or 1) // args.concurrency) if local else 0)
    if not local or (args.config is not None and args.checkpoint):
        data = (str(Path(args.data).resolve()) if local else args.data) if args.data else "DATA"
        src = ModelSource(data, args.checkpoint or "CHECKPOINT", args.input_size or 96, args.width or 0.5)
    else:
        src = _prepare_model(args, print)
    cmd = _trial_command(src, python=sys.executable if local else "python3", threads=threads,
                         n_calib=args.n_calib, latency=args.latency, n_boot=args.n_boot, seed=args.seed)
    trial_dir = out / "trial-code"  # NNI uploads this folder to trial machines: keep it empty
    trial_dir.mkdir(exist_ok=True)
    cfg = experiment_config(cmd, space, training_service=ts, tuner=args.tuner, concurrency=args.concurrency,
                            max_trials=args.max_trials, trial_timeout=args.trial_timeout,
                            max_duration=args.max_duration, code_dir=str(trial_dir),
                            working_dir=str(out / "nni-experiments") if local else "~/nni-experiments")
    if args.config is not None:
        text = _dump(cfg)
        if args.config == "-":
            print(text)
        else:
            Path(args.config).write_text(text)
            print(f"NNI config written to {args.config}; run it with: nnictl create --config {args.config}")
        return 0
    if args.latency and args.concurrency > 1:
        print("WARNING: latency measured by concurrent trials on one machine is not comparable; "
              "use --concurrency 1 for latency", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    if Path(src.data).is_dir() and Path(src.checkpoint).is_file():  # the uncompressed reference point
        torch.set_num_threads(max(1, threads))
        model, _, test = _load(src)
        rows.append({"method": "original", "setting": "uncompressed", "ratio": 1.0, "stage": "-", "trial_id": "-",
                     **_measure(model, test, args.latency, args.n_boot, args.seed)})
    res = run_sweep(cfg, port=args.port, log=print)
    status, trials = res.status, res.trials
    rows += collect_rows(trials)
    print(f"experiment finished: {status}, {len(trials)} trials in {time.perf_counter() - start:.0f}s")

    from hsc_plugin.mri.report import machine_description, plot_pareto, save_json

    table = pareto_table(rows)
    meta = {"command": "hsc sweep " + " ".join(sys.argv[2:]), "status": status, "data": src.data,
            "checkpoint": src.checkpoint, "search_space": space, "nni_config": cfg,
            "experiment_id": res.experiment_id, "nni_manager_pid": res.manager_pid,
            "machine": machine_description(), "seconds": time.perf_counter() - start}
    save_json(rows, out / "sweep.json", meta)
    (out / "sweep.md").write_text(f"# hsc sweep\n\nCommand: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
                                  f"Status: {status}, {len(trials)} trials, {meta['seconds']:.0f} s\n\n"
                                  f"{table}\n\n![Pareto](sweep_pareto.png)\n")
    plot_pareto(rows, out / "sweep_pareto.png", title="hsc sweep: accuracy vs cost (NNI trials)")
    print(table)
    print(f"\nwritten {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep_pareto.png'}")
    succeeded = any(r["stage"] not in ("failed", "-") for r in rows)
    return 0 if status in ("DONE", "STOPPED") and succeeded else 1


def add_commands(sub: Any) -> None:
    """Register ``hsc sweep`` on the ``hsc`` sub-command parser."""
    s = sub.add_parser("sweep", help="HSC hyper-parameter sweep as an NNI experiment -> Pareto table and plot")
    s.add_argument("--data", help="data folder (Kaggle layout); default: $HSC_MRI_DATA or the bundled sample")
    s.add_argument("--checkpoint", help="state_dict of alexnet_mri (default: the hsc demo model, trained once, cached)")
    s.add_argument("--input-size", type=int, help="model input size (default: the demo recipe's, 96)")
    s.add_argument("--width", type=float, help="alexnet_mri width of the checkpoint (default 0.5)")
    s.add_argument("--epochs", type=int, help="train the demo model for this many epochs (without --checkpoint)")
    s.add_argument("--search-space", help="NNI search space, JSON or YAML (default: DEFAULT_SEARCH_SPACE)")
    s.add_argument("--tuner", default="GridSearch", help="NNI tuner: GridSearch (default), Random, TPE, ...")
    s.add_argument("--max-trials", type=int, help="stop after this many trials (default: the whole grid)")
    s.add_argument("--concurrency", type=int, default=1, help="trials at once")
    s.add_argument("--trial-timeout", default="10m", help="per-trial time limit (NNI maxTrialDuration), e.g. 90s, 10m")
    s.add_argument("--max-duration", help="experiment time limit (NNI maxExperimentDuration), e.g. 2h")
    s.add_argument("--threads", type=int, help="torch threads per trial (default: CPUs / concurrency; "
                                               "torch's default on other training services)")
    s.add_argument("--n-calib", type=int, default=256, help="calibration images per trial")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the standard errors")
    s.add_argument("--latency", action=argparse.BooleanOptionalAction, default=False,
                   help="measure CPU latency (batch 1) in every trial; needs --concurrency 1 to mean anything")
    s.add_argument("--training-service", default="local",
                   help="'local' (default), another NNI platform name (with --config: a template), or a "
                        "JSON/YAML file holding NNI's trainingService section")
    s.add_argument("--config", nargs="?", const="-", metavar="FILE",
                   help="write the NNI experiment config (YAML) to FILE (or print it) and exit")
    s.add_argument("--out-dir", default="hsc-sweep", help="where the table, JSON, plot and NNI logs go")
    s.add_argument("--port", type=int, help="NNI manager / web UI port (default: a free one)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=sweep)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hsc_plugin.mri.sweep")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trial", help="one NNI trial (started by the experiment)")
    t.add_argument("--data", required=True)
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--input-size", type=int, required=True)
    t.add_argument("--width", type=float, required=True)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--n-calib", type=int, default=256)
    t.add_argument("--n-boot", type=int, default=1000)
    t.add_argument("--latency", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--params", help="JSON parameters when run outside NNI")
    t.set_defaults(func=_trial_main)
    add_commands(sub)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(_main())
