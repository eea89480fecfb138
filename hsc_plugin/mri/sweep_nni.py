"""``hsc sweep``'s NNI side: the experiment config (NNI's YAML schema), and running an experiment
to its end with ``nni.experiment.Experiment`` — always stopped, also on errors and Ctrl-C.
NNI is imported only inside :func:`run_sweep`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import time
from typing import Any, Mapping

from hsc_plugin.mri.sweep_space import grid_size

__all__ = ["SweepResult", "experiment_config", "run_sweep"]

_TERMINAL = {"SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED", "EARLY_STOPPED"}


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
