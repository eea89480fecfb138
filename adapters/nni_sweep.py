"""``hsc sweep``: HSC's hyper-parameter search as an NNI experiment (extra ``[nni]``).

Every trial compresses the same trained brain-MRI classifier with one point of the search space
(regions grid, channel clusters, channel side, MAC budget; optionally partition and energy τ)
and reports test accuracy, macro-F1, MACs, parameters (and CPU latency when asked) with
``nni.report_final_result``. Both baselines (data-aware Global SVD and Tucker-2) are points of
the default search space, so they run as trials too and land on the same Pareto axes. NNI
schedules the trials: on this machine (the local training service, the default) or on remote
machines and clusters through NNI's other training services (see ``docs/sweep.md``).

Pieces that need no NNI (search space → compressor arguments, results → Pareto rows) are plain
functions so they can be tested and reused. NNI itself is imported only where it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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

_BASELINES = ("global_svd", "tucker2")
_HSC_KEYS = {"grid", "partition", "n_clusters", "channel_side", "clusterer", "balanced"}
_SHARED_KEYS = {"ratio", "energy", "data_aware"}

# NNI's nested-choice format: the baselines come first so a ``max_trial_number`` cut keeps them.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "method": {"_type": "choice", "_value": [
        {"_name": "global_svd"},
        {"_name": "tucker2"},
        {"_name": "hsc",
         "grid": {"_type": "choice", "_value": [1, 2]},
         "n_clusters": {"_type": "choice", "_value": [1, 2, 4]},
         "channel_side": {"_type": "choice", "_value": ["input", "output"]}},
    ]},
    "ratio": {"_type": "choice", "_value": [3.0, 6.0]},
}
"""2 baselines + 12 HSC settings, each at 3× and 6× fewer MACs: 28 trials with grid search."""

_TERMINAL = {"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"}


# ----------------------------------------------------------------------------- search space


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """What one trial compresses with: ``compress(model, method, budget=Budget(ratio), **options)``."""

    method: str
    ratio: float | None
    options: dict[str, Any]
    label: str


def _flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """NNI gives nested choices as ``{"method": {"_name": "hsc", "grid": 2}, ...}``: flatten them."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and "_name" in value:
            flat[key] = value["_name"]
            for k, v in value.items():
                if k != "_name":
                    flat[k] = v
        else:
            flat[key] = value
    return flat


def trial_spec(params: Mapping[str, Any]) -> TrialSpec:
    """Turn one point of the search space (as ``nni.get_next_parameter()`` returns it) into
    compressor arguments; unknown keys or HSC keys on a baseline are errors, not silently dropped."""
    p = _flatten(params)
    method = str(p.pop("method", "hsc"))
    if method not in ("hsc",) + _BASELINES:
        raise ValueError(f"unknown method {method!r}; use hsc, global_svd or tucker2")
    unknown = set(p) - _HSC_KEYS - _SHARED_KEYS
    if unknown:
        raise ValueError(f"unknown search-space keys {sorted(unknown)}; known: {sorted(_HSC_KEYS | _SHARED_KEYS | {'method'})}")
    ratio = p.pop("ratio", None)
    energy = p.pop("energy", None)
    if ratio is None and energy is None:
        raise ValueError("a trial needs a budget 'ratio' (e.g. 3.0) or an 'energy' τ")
    options: dict[str, Any] = {}
    if energy is not None:
        options["energy"] = float(energy)
    if method in _BASELINES:
        extra = set(p) & _HSC_KEYS
        if extra:
            raise ValueError(f"{method} takes no HSC options, got {sorted(extra)}")
        options["data_aware"] = bool(p.pop("data_aware", True))
        label = f"{method} ({'data-aware' if options['data_aware'] else 'data-free'})"
    else:
        p.pop("data_aware", None)  # HSC is always data-aware
        grid = p.pop("grid", None)
        if grid is not None:
            grid = (int(grid), int(grid)) if isinstance(grid, (int, float)) else tuple(int(g) for g in grid)
        partition = p.pop("partition", None)
        if partition is None and grid is not None:
            partition = "none" if grid == (1, 1) else "grid"
        if partition is not None:
            options["partition"] = partition
        if partition == "grid" and grid is not None:
            options["grid"] = grid
        n_clusters = p.pop("n_clusters", None)
        if "clusterer" in p:
            options["clusterer"] = p.pop("clusterer")
        if n_clusters is not None:
            if int(n_clusters) == 1:
                options["clusterer"] = "single"
            else:
                options["n_clusters"] = int(n_clusters)
        for key in ("channel_side", "balanced"):
            if key in p:
                options[key] = p.pop(key)
        regions = {"none": "1x1 regions", "grid": f"{grid[0]}x{grid[1]} regions" if grid else "grid regions"}
        parts = [regions.get(str(partition), f"{partition} regions") if partition else "default regions"]
        if options.get("clusterer") == "single":
            parts.append(f"1 {options['channel_side']} cluster" if "channel_side" in options else "1 cluster")
        elif n_clusters is not None:
            parts.append(f"{int(n_clusters)} {options.get('channel_side', 'input')} clusters")
        elif "channel_side" in options:
            parts.append(f"{options['channel_side']} side")
        label = "hsc " + ", ".join(parts)
    if energy is not None:
        label += f", τ={float(energy):g}"
    return TrialSpec(method, None if ratio is None else float(ratio), options, label)


def grid_size(space: Mapping[str, Any]) -> int | None:
    """Points of a search space made only of (nested) choices, as NNI's grid search walks it;
    ``None`` when a parameter is continuous (a grid search would refine it without end)."""
    total = 1
    for entry in space.values():
        if not isinstance(entry, Mapping) or entry.get("_type") != "choice":
            return None
        n = 0
        for v in entry["_value"]:
            if isinstance(v, Mapping) and "_name" in v:
                sub = grid_size({k: x for k, x in v.items() if k != "_name"})
                if sub is None:
                    return None
                n += sub
            else:
                n += 1
        total *= n
    return total


def load_search_space(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """NNI search space from a JSON or YAML file (YAML is a superset of JSON), or the default."""
    if path is None:
        return json.loads(json.dumps(DEFAULT_SEARCH_SPACE))
    text = Path(path).read_text(encoding="utf8")
    try:
        space = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        space = yaml.safe_load(text)
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{path}: a search space is a non-empty mapping of NNI '_type'/'_value' entries")
    return space


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


def _measure(model: Any, test: Any, latency: bool, n_boot: int, seed: int) -> dict[str, Any]:
    import torch

    from hsc_plugin.costs import measure_costs
    from hsc_plugin.mri.experiment import evaluate_model

    shape = tuple(test.tensors[0].shape[1:])
    cost = measure_costs(model, torch.zeros(1, *shape))
    row: dict[str, Any] = {"macs": cost.macs, "params": cost.params}
    if latency:
        from hsc_plugin.latency import measure_latency

        row["latency_b1_ms"] = measure_latency(model, shape, batch=1, runs=20, threads=torch.get_num_threads())["median_ms"]
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
    row.update(_measure(result.model, test, latency, n_boot, seed))
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


# ------------------------------------------------------------------------------ collection


def collect_rows(trials: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pareto rows (the format of :mod:`hsc_plugin.mri.report`) from finished trials.

    Each trial is ``{"trial_id", "status", "parameter", "value"}``; ``value`` is the dict the
    trial reported (``None`` when it reported nothing, e.g. it failed or hit its time limit).
    """
    rows = []
    for t in trials:
        spec = trial_spec(t["parameter"])
        base = {"method": spec.method, "setting": spec.label, "ratio": spec.ratio or float("nan"),
                "options": spec.options, "trial_id": t.get("trial_id", ""), "parameter": dict(t["parameter"])}
        value = t.get("value")
        if isinstance(value, Mapping) and "accuracy" in value:
            rows.append({**base, "stage": "compress-only", **{k: v for k, v in value.items() if k != "default"}})
        else:
            rows.append({**base, "stage": "failed", "error": f"trial {t.get('status', 'FAILED').lower()}"})
    rows.sort(key=lambda r: (r["stage"] == "failed", r["ratio"], r["method"] != "hsc", r["setting"]))
    return rows


def pareto_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of every row with its place on the Pareto fronts (accuracy vs MACs, and vs
    latency when measured); ``*`` marks a point no other point beats on both axes."""
    from hsc_plugin.mri.report import pareto_front

    ok = [i for i, r in enumerate(rows) if r.get("stage") != "failed"]
    fronts: dict[str, set[int]] = {}
    for key in ("macs", "latency_b1_ms"):
        idx = [i for i in ok if key in rows[i]]
        if idx:
            front = pareto_front([(rows[i][key], rows[i]["accuracy"]) for i in idx])
            fronts[key] = {idx[j] for j in front}
    lat = "latency_b1_ms" in fronts
    head = ["trial", "setting", "budget", "accuracy %", "macro-F1 %", "MMACs", "M params"]
    head += ["ms b1"] if lat else []
    head += ["front (MACs)"] + (["front (latency)"] if lat else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        budget = "-" if r.get("ratio", 1.0) != r.get("ratio") else f"{r['ratio']:g}x"
        if r.get("stage") == "failed":
            cells = [r.get("trial_id", ""), r["setting"], budget, r.get("error", "failed")] + ["-"] * (len(head) - 4)
        else:
            cells = [r.get("trial_id", "") or "-", r["setting"], budget,
                     f"{100 * r['accuracy']:.2f} ± {100 * r.get('accuracy_se', 0.0):.2f}",
                     f"{100 * r['macro_f1']:.2f}", f"{r['macs'] / 1e6:.2f}", f"{r['params'] / 1e6:.3f}"]
            cells += [f"{r['latency_b1_ms']:.2f}" if "latency_b1_ms" in r else "-"] if lat else []
            cells += ["*" if i in fronts.get("macs", ()) else ""]
            cells += ["*" if i in fronts.get("latency_b1_ms", ()) else ""] if lat else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ experiment


def _parse_seconds(text: str | int | float) -> int:
    """``90``, ``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` → seconds."""
    if isinstance(text, (int, float)):
        return int(text)
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def _free_port(start: int | None = None) -> int:
    """A port that is free together with the next one (remote training services use port + 1)."""
    for _ in range(100):
        if start is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        else:
            port, start = start, start + 2
        if port < 65535 and all(_port_free(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no free port pair found")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _trial_command(src: ModelSource, *, python: str, threads: int, n_calib: int, latency: bool,
                   n_boot: int, seed: int) -> str:
    argv = [python, "-m", "hsc_plugin.adapters.nni_sweep", "trial", *src.argv(), "--threads", str(threads),
            "--n-calib", str(n_calib), "--n-boot", str(n_boot), "--seed", str(seed)]
    argv += ["--latency"] if latency else []
    return shlex.join(argv)


def experiment_config(
    trial_command: str,
    search_space: Mapping[str, Any],
    *,
    training_service: str | Mapping[str, Any] = "local",
    tuner: str = "GridSearch",
    concurrency: int = 1,
    max_trials: int | None = None,
    trial_timeout: str = "10m",
    max_duration: str | None = None,
    code_dir: str = ".",
    working_dir: str = "~/nni-experiments",
    name: str = "hsc-sweep",
) -> dict[str, Any]:
    """The NNI experiment config (the camelCase schema of NNI's YAML files and ``nnictl create``).

    ``training_service`` is a platform name (``"local"``; another name gives a template to fill
    in, see ``docs/sweep.md``) or NNI's ``trainingService`` section as a mapping.
    """
    if isinstance(training_service, str):
        ts: dict[str, Any] = {"platform": training_service}
        if training_service == "remote":
            ts["machineList"] = [{"host": "HOST", "port": 22, "user": "USER", "sshKeyFile": "~/.ssh/id_rsa",
                                  "pythonPath": "/path/to/venv/bin"}]
    else:
        ts = dict(training_service)
    tuner_cfg: dict[str, Any] = {"name": tuner}
    if tuner.lower() in ("tpe", "random", "anneal", "evolution"):
        tuner_cfg["classArgs"] = {"optimize_mode": "maximize"} if tuner.lower() != "random" else {}
    cfg: dict[str, Any] = {
        "experimentName": name,
        "searchSpace": json.loads(json.dumps(search_space)),
        "trialCommand": trial_command,
        "trialCodeDirectory": code_dir,
        "trialConcurrency": int(concurrency),
        "maxTrialDuration": trial_timeout,
        "tuner": tuner_cfg,
        "trainingService": ts,
        "experimentWorkingDirectory": working_dir,
    }
    if max_trials is None and tuner.lower() == "gridsearch":
        max_trials = grid_size(search_space)  # so NNI reports DONE when the grid is done
    if max_trials is not None:
        cfg["maxTrialNumber"] = int(max_trials)
    if max_duration is not None:
        cfg["maxExperimentDuration"] = max_duration
    return cfg


def _wait(exp: Any, deadline: float, poll: float, log: Any, settle: float = 12.0) -> str:
    """Wait until every trial is over. ``Experiment.run`` is not used: it polls every 10 s and,
    when the tuner runs out of points before ``maxTrialNumber``, NNI stays in
    ``TUNER_NO_MORE_TRIAL`` and never reports ``DONE`` (microsoft/nni#4201), so ``run`` would
    block for ever. In that state the experiment counts as done once every trial has ended and
    no new one appeared for ``settle`` seconds (NNI submits queued points every 5 s)."""
    seen: dict[str, str] = {}
    quiet: tuple[float, int] | None = None  # (since when, with how many trials) all trials have ended
    while True:
        status = exp.get_status()
        jobs = exp.list_trial_jobs()
        for j in jobs:
            if seen.get(j.trialJobId) != j.status and j.status in _TERMINAL:
                log(f"trial {j.trialJobId}: {j.status}")
            seen[j.trialJobId] = j.status
        all_over = bool(jobs) and all(j.status in _TERMINAL for j in jobs)
        if status in ("DONE", "STOPPED", "ERROR"):
            return status
        if status == "TUNER_NO_MORE_TRIAL" and all_over:
            now = time.monotonic()
            if quiet is None or quiet[1] != len(jobs):
                quiet = (now, len(jobs))
            elif now - quiet[0] >= settle:
                return "DONE"
        else:
            quiet = None
        if time.monotonic() > deadline:
            return "TIMEOUT"
        time.sleep(poll)


def _trials(exp: Any) -> list[dict[str, Any]]:
    values = {r.trialJobId: r.value for r in exp.export_data()}
    out = []
    for j in exp.list_trial_jobs():
        hp = j.hyperParameters[0] if j.hyperParameters else None
        param = getattr(hp, "parameters", None)
        if param is None:
            continue
        out.append({"trial_id": j.trialJobId, "status": j.status, "parameter": param, "value": values.get(j.trialJobId)})
    return out


@dataclasses.dataclass
class SweepResult:
    """How an experiment ended: NNI's final status, every trial, and who ran it."""

    status: str
    trials: list[dict[str, Any]]
    experiment_id: str
    manager_pid: int | None


def run_sweep(
    config: Mapping[str, Any],
    *,
    port: int | None = None,
    poll: float = 1.0,
    log: Any = print,
) -> SweepResult:
    """Run an experiment config with ``nni.experiment.Experiment`` and collect its trials
    (``{"trial_id", "status", "parameter", "value"}``, the input of :func:`collect_rows`).

    The experiment is always stopped (NNI manager, tuner and trials end) before this returns,
    also on errors and Ctrl-C. The wait ends at ``maxExperimentDuration`` (plus a minute) at
    the latest, if one is set.
    """
    from nni.experiment import Experiment, ExperimentConfig

    exp = Experiment(ExperimentConfig(**config))
    port = _free_port() if port is None else port
    limit = config.get("maxExperimentDuration")
    deadline = time.monotonic() + (_parse_seconds(limit) + 60 if limit else math.inf)
    pid = None
    try:
        exp.start(port, debug=False)
        pid = getattr(exp._proc, "pid", None)  # the NNI manager; tuner and trials are in its process group
        log(f"NNI experiment {exp.id}: web UI http://localhost:{port}")
        status = _wait(exp, deadline, poll, log)
        trials = _trials(exp)
    finally:
        with contextlib.suppress(Exception):
            exp.stop()
    return SweepResult(status, trials, exp.id, pid)


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
    from hsc_plugin.mri import alexnet_mri, load_or_train, load_split
    from hsc_plugin.mri.cli import _model_cache_name
    from hsc_plugin.mri.train import cache_dir

    recipe = demo_recipe()
    recipe = dataclasses.replace(recipe, **{k: v for k, v in (("input_size", args.input_size), ("width", args.width),
                                                              ("epochs", args.epochs)) if v})
    name = _model_cache_name("alexnet_mri-demo", data, recipe, args.seed)
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
    p = argparse.ArgumentParser(prog="python -m hsc_plugin.adapters.nni_sweep")
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
