"""``hsc sweep``: the search space becomes valid compressor arguments, finished trials become
Pareto rows, and a real NNI experiment of three tiny trials runs, writes the Pareto table/plot
with one row per trial, and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hsc_plugin.mri.sweep import (
    DEFAULT_SEARCH_SPACE,
    collect_rows,
    experiment_config,
    load_search_space,
    pareto_table,
    trial_spec,
)
from hsc_plugin.api import create_compressor

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ search space -> compress()


def test_hsc_point_becomes_compressor_options() -> None:
    spec = trial_spec({"method": {"_name": "hsc", "grid": 2, "n_clusters": 4, "channel_side": "output"},
                       "ratio": 3})
    assert spec.method == "hsc" and spec.ratio == 3.0
    assert spec.options == {"partition": "grid", "grid": (2, 2), "n_clusters": 4, "channel_side": "output"}
    assert spec.label == "hsc 2x2 regions, 4 output clusters"


def test_one_region_and_one_cluster_use_the_none_partition_and_single_clusterer() -> None:
    spec = trial_spec({"method": "hsc", "grid": 1, "n_clusters": 1, "ratio": 6.0})
    assert spec.options == {"partition": "none", "clusterer": "single"}
    assert spec.ratio == 6.0
    quad = trial_spec({"method": "hsc", "partition": "quadtree", "grid": 2, "ratio": 3.0})
    assert quad.options == {"partition": "quadtree"}  # the grid size is the grid partitioner's option only


def test_baselines_are_data_aware_and_reject_hsc_options() -> None:
    for name in ("global_svd", "tucker2"):
        spec = trial_spec({"method": {"_name": name}, "ratio": 3.0})
        assert spec.options == {"data_aware": True}
        assert spec.label == f"{name} (data-aware)"
        with pytest.raises(ValueError, match="takes no HSC options"):
            trial_spec({"method": {"_name": name, "grid": 2}, "ratio": 3.0})


def test_energy_without_budget_and_bad_points() -> None:
    spec = trial_spec({"method": "hsc", "energy": 0.9})
    assert spec.ratio is None and spec.options["energy"] == 0.9
    with pytest.raises(ValueError, match="unknown search-space keys"):
        trial_spec({"method": "hsc", "ratio": 3.0, "grdi": 2})
    with pytest.raises(ValueError, match="needs a budget"):
        trial_spec({"method": "hsc", "grid": 2})
    with pytest.raises(ValueError, match="unknown method"):
        trial_spec({"method": "svd", "ratio": 3.0})


def test_every_point_of_the_default_grid_builds_a_compressor() -> None:
    """Enumerate the default space with NNI's own grid-search tuner (nested choices included):
    every point is a distinct, valid configuration of a registered compressor."""
    pytest.importorskip("nni", reason="the [nni] extra is not installed")
    from nni.algorithms.hpo.gridsearch_tuner import GridSearchTuner

    tuner = GridSearchTuner()
    tuner.update_search_space(DEFAULT_SEARCH_SPACE)
    points = []
    while True:
        try:
            points.append(tuner.generate_parameters(len(points)))
        except Exception:  # NoMoreTrialError: the grid is exhausted
            break
    specs = [trial_spec(p) for p in points]
    assert len(points) == 28
    assert len({(s.label, s.ratio) for s in specs}) == 28
    assert {s.method for s in specs[:4]} == {"global_svd", "tucker2"}  # baselines first
    for s in specs:
        create_compressor(s.method, **s.options)


def test_search_space_files_json_and_yaml(tmp_path: Path) -> None:
    space = {"method": {"_type": "choice", "_value": [{"_name": "tucker2"}]}, "ratio": {"_type": "choice", "_value": [3.0]}}
    (tmp_path / "s.json").write_text(json.dumps(space))
    (tmp_path / "s.yml").write_text("method:\n  _type: choice\n  _value:\n    - _name: tucker2\n"
                                    "ratio:\n  _type: choice\n  _value: [3.0]\n")
    assert load_search_space(tmp_path / "s.json") == space
    assert load_search_space(tmp_path / "s.yml") == space
    assert load_search_space(None) == DEFAULT_SEARCH_SPACE
    (tmp_path / "bad.yml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="non-empty mapping"):
        load_search_space(tmp_path / "bad.yml")


# ------------------------------------------------------------------ trials -> Pareto rows


def _value(acc: float, macs: int) -> dict:
    return {"default": acc, "accuracy": acc, "accuracy_se": 0.01, "macro_f1": acc - 0.01, "macro_f1_se": 0.01,
            "f1_meningioma": 0.5, "f1_meningioma_se": 0.02, "macs": macs, "params": 1000}


def test_collect_rows_one_row_per_trial_and_fronts_marked() -> None:
    trials = [
        {"trial_id": "A", "status": "SUCCEEDED", "parameter": {"method": {"_name": "global_svd"}, "ratio": 3.0},
         "value": _value(0.90, 10_000_000)},
        {"trial_id": "B", "status": "SUCCEEDED", "parameter": {"method": {"_name": "hsc", "grid": 2}, "ratio": 6.0},
         "value": _value(0.80, 5_000_000)},
        {"trial_id": "C", "status": "SUCCEEDED", "parameter": {"method": {"_name": "tucker2"}, "ratio": 6.0},
         "value": _value(0.70, 6_000_000)},  # dominated by B: more MACs, less accurate
        {"trial_id": "D", "status": "EARLY_STOPPED", "parameter": {"method": {"_name": "hsc", "grid": 1}, "ratio": 3.0},
         "value": None},  # hit its time limit
    ]
    rows = collect_rows(trials)
    assert sorted(r["trial_id"] for r in rows) == ["A", "B", "C", "D"]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["D"]["stage"] == "failed" and "early_stopped" in by_id["D"]["error"]
    assert by_id["A"]["method"] == "global_svd" and by_id["A"]["accuracy"] == 0.90 and "default" not in by_id["A"]
    assert rows[-1]["trial_id"] == "D"  # failures last
    table = pareto_table(rows).splitlines()
    assert len(table) == 2 + 4
    line = {tid: next(l for l in table if l.startswith(f"| {tid} |")) for tid in "ABCD"}
    assert line["A"].rstrip(" |").endswith("*") and line["B"].rstrip(" |").endswith("*")
    assert not line["C"].rstrip(" |").endswith("*")
    assert "trial early_stopped" in line["D"]


def test_latency_front_column_only_when_measured() -> None:
    rows = collect_rows([
        {"trial_id": "A", "parameter": {"method": "tucker2", "ratio": 3.0},
         "value": {**_value(0.9, 10), "latency_b1_ms": 2.0}},
        {"trial_id": "B", "parameter": {"method": "tucker2", "ratio": 6.0},
         "value": {**_value(0.8, 5), "latency_b1_ms": 3.0}},  # fewer MACs but slower: off the latency front
    ])
    table = pareto_table(rows).splitlines()
    assert "front (latency)" in table[0]
    b = next(l for l in table if l.startswith("| B |"))
    assert b.split("|")[-3].strip() == "*" and b.split("|")[-2].strip() == ""
    assert "front (latency)" not in pareto_table(collect_rows([
        {"trial_id": "A", "parameter": {"method": "tucker2", "ratio": 3.0}, "value": _value(0.9, 10)}])).splitlines()[0]


def test_disturbed_timings_are_said_and_kept_off_the_latency_front() -> None:
    rows = [{"method": "original", "setting": "uncompressed", "ratio": 1.0, "stage": "-", "trial_id": "-",
             **_value(0.95, 30), "latency_b1_ms": 9.0, "latency_b1_disturbed": False}]
    rows += collect_rows([
        {"trial_id": "A", "parameter": {"method": "tucker2", "ratio": 3.0},
         "value": {**_value(0.9, 10), "latency_b1_ms": 2.0, "dense_latency_b1_ms": 4.0, "latency_b1_disturbed": False}},
        {"trial_id": "B", "parameter": {"method": "tucker2", "ratio": 6.0},  # faster and as accurate, but disturbed
         "value": {**_value(0.9, 5), "latency_b1_ms": 1.0, "dense_latency_b1_ms": 4.0, "latency_b1_disturbed": True}},
        {"trial_id": "C", "parameter": {"method": "global_svd", "ratio": 3.0},  # 10x from 3x fewer MACs
         "value": {**_value(0.8, 10), "latency_b1_ms": 1.5, "dense_latency_b1_ms": 15.0, "latency_b1_disturbed": False}},
    ])
    table = pareto_table(rows).splitlines()
    assert "speed-up b1" in table[0]
    line = {tid: next(l for l in table if l.startswith(f"| {tid} |")).split("|") for tid in "ABC"}
    assert line["A"][-4].strip() == "2.00x"  # against the dense time of its own trial (4 ms), not 9 ms
    assert line["B"][-5].strip() == "disturbed" and line["B"][-4].strip() == "disturbed"
    assert line["B"][-2].strip() == "" and line["C"][-2].strip() == "*"  # B is off the latency front
    assert "suspect" in line["C"][-4]


def test_experiment_config_is_valid_nni_config() -> None:
    pytest.importorskip("nni", reason="the [nni] extra is not installed")
    from nni.experiment import ExperimentConfig

    cfg = experiment_config("python -m x", DEFAULT_SEARCH_SPACE, concurrency=2, max_trials=5, trial_timeout="90s",
                            max_duration="1h")
    canon = ExperimentConfig(**cfg).canonical_copy()
    assert canon.trial_concurrency == 2 and canon.max_trial_number == 5
    assert canon.max_trial_duration == "90s" and canon.max_experiment_duration == "1h"
    assert canon.training_service.platform == "local" and canon.tuner.name == "GridSearch"
    remote = experiment_config("python3 -m x", DEFAULT_SEARCH_SPACE, training_service="remote")
    assert remote["trainingService"]["machineList"][0]["host"] == "HOST"


# ------------------------------------------------------------------ the real experiment


def _tiny_checkpoint(path: Path) -> None:
    from hsc_plugin.mri import alexnet_mri, bundled_sample_path, load_split
    from hsc_plugin.mri.train import train

    model = alexnet_mri(width=0.25, input_size=32)
    train(model, load_split(bundled_sample_path(), "train", 32), epochs=1, lr=2e-3, batch_size=64, seed=0,
          progress=False)
    torch.save(model.state_dict(), path)


def _leftovers(markers: list[Path], manager_pid: int | None) -> list[str]:
    """Processes of this experiment still alive: the NNI manager's process group (tuner, trials)
    and anything whose command line names this test's folder or checkpoint (the trials do)."""
    import psutil

    left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            in_group = manager_pid is not None and os.getpgid(p.pid) == manager_pid
        except (psutil.Error, ProcessLookupError):
            continue
        if in_group or (any(str(m) in cmd for m in markers) and p.pid != os.getpid()):
            left.append(f"{p.pid}: {cmd[:200]}")
    return left


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sweep-model") / "tiny.pt"
    _tiny_checkpoint(path)
    return path


def test_run_trial_in_process_measures_the_compressed_model(tiny_checkpoint: Path) -> None:
    """One trial without NNI: tucker2 at 3x, latency on; the numbers are of the compressed model."""
    from hsc_plugin.mri.sweep import ModelSource, run_trial
    from hsc_plugin.mri import bundled_sample_path

    src = ModelSource(str(bundled_sample_path()), str(tiny_checkpoint), 32, 0.25)
    row = run_trial({"method": {"_name": "tucker2"}, "ratio": 3.0}, src, n_calib=16, latency=True, n_boot=50)
    from hsc_plugin.cost.macs import measure_costs
    from hsc_plugin.mri import alexnet_mri

    base = measure_costs(alexnet_mri(width=0.25, input_size=32), torch.zeros(1, 1, 32, 32)).macs
    assert base / row["macs"] == pytest.approx(3.0, rel=0.03) and row["achieved_ratio"] == pytest.approx(3.0, rel=0.03)
    assert row["latency_b1_ms"] > 0 and 0 <= row["accuracy"] <= 1 and row["accuracy_se"] > 0
    assert {"macro_f1", "f1_meningioma", "params", "compress_s"} <= set(row)


def _sweep(tmp_path: Path, ckpt: Path, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    space = {"method": {"_type": "choice", "_value": [
        {"_name": "global_svd"}, {"_name": "tucker2"},
        {"_name": "hsc", "grid": {"_type": "choice", "_value": [2]}, "n_clusters": {"_type": "choice", "_value": [2]}}]},
        "ratio": {"_type": "choice", "_value": [3.0]}}
    (tmp_path / "space.json").write_text(json.dumps(space))
    ckpt = ckpt.resolve()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hsc_plugin.cli", "sweep", "--checkpoint", str(ckpt), "--input-size", "32",
           "--width", "0.25", "--search-space", str(tmp_path / "space.json"), "--n-calib", "32", "--n-boot", "100",
           "--threads", "1", "--concurrency", "2", "--max-duration", "4m", "--out-dir", str(out), *extra]
    env = dict(os.environ, HSC_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    result = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").exists() else {}
    return proc, result


def test_hsc_sweep_runs_three_nni_trials_and_cleans_up(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pytest.importorskip("nni", reason="the [nni] extra is not installed")
    pytest.importorskip("matplotlib", reason="the [plot] extra is not installed")
    proc, result = _sweep(tmp_path, tiny_checkpoint, "--trial-timeout", "2m")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta, rows = result["meta"], result["rows"]
    assert meta["status"] == "DONE"
    base, trials = rows[0], rows[1:]
    assert base["method"] == "original"
    assert len(trials) == 3 and len({r["trial_id"] for r in trials}) == 3
    assert {r["method"] for r in trials} == {"global_svd", "tucker2", "hsc"}
    for r in trials:
        assert r["stage"] == "compress-only", r
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        assert r["macs"] <= base["macs"] / 3.0 * 1.03  # the 3x MAC budget, within tolerance
        assert "latency_b1_ms" not in r  # --no-latency is the default
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 1 + 3  # header, original, trials
    assert (tmp_path / "out" / "sweep_pareto.png").stat().st_size > 10_000
    assert meta["nni_config"]["maxTrialDuration"] == "2m"
    time.sleep(1)  # let the OS reap what NNI stopped
    assert _leftovers([tmp_path, tiny_checkpoint.resolve()], meta["nni_manager_pid"]) == []


@pytest.mark.slow
def test_trial_time_limit_stops_trials_and_the_experiment_still_ends(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """A 1 s limit is shorter than any trial: every trial is cancelled by NNI, reported as a
    failed row, and the sweep still ends, writes its table and leaves nothing running."""
    pytest.importorskip("nni", reason="the [nni] extra is not installed")
    proc, result = _sweep(tmp_path, tiny_checkpoint, "--trial-timeout", "1s")
    assert result, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = result["rows"][1:]
    assert len(trials) == 3 and all(r["stage"] == "failed" for r in trials)
    assert proc.returncode == 1  # no trial succeeded
    time.sleep(1)
    assert _leftovers([tmp_path, tiny_checkpoint.resolve()], result["meta"]["nni_manager_pid"]) == []


def test_config_option_writes_the_nni_config_without_running(tmp_path: Path) -> None:
    pytest.importorskip("nni", reason="the [nni] extra is not installed")
    import yaml

    from hsc_plugin.cli import main

    target = tmp_path / "remote.yml"
    assert main(["sweep", "--training-service", "remote", "--data", "/data/brain-mri-128", "--checkpoint",
                 "/models/alexnet.pt", "--input-size", "128", "--config", str(target), "--out-dir",
                 str(tmp_path / "o")]) == 0
    cfg = yaml.safe_load(target.read_text())
    assert cfg["trainingService"]["platform"] == "remote"
    assert cfg["trialCommand"].startswith("python3 -m hsc_plugin.mri.sweep trial --data /data/brain-mri-128")
    assert "--checkpoint /models/alexnet.pt --input-size 128" in cfg["trialCommand"]
    assert cfg["searchSpace"] == DEFAULT_SEARCH_SPACE
    assert not list((tmp_path / "o").glob("nni-experiments"))  # nothing was run


def test_grid_size_counts_nested_choices() -> None:
    from hsc_plugin.mri.sweep import grid_size

    assert grid_size(DEFAULT_SEARCH_SPACE) == 28  # (2 baselines + 2*3*2 hsc) * 2 budgets
    assert grid_size({"ratio": {"_type": "choice", "_value": [3, 6]}}) == 2
    assert grid_size({"energy": {"_type": "uniform", "_value": [0.8, 0.99]}}) is None
    cfg = experiment_config("x", DEFAULT_SEARCH_SPACE)
    assert cfg["maxTrialNumber"] == 28  # NNI then reports DONE when the grid is done
    assert "maxTrialNumber" not in experiment_config("x", {"e": {"_type": "uniform", "_value": [0, 1]}})


def test_without_checkpoint_the_demo_model_is_trained_once_and_cached(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from hsc_plugin.mri.sweep import _prepare_model

    monkeypatch.setenv("HSC_CACHE_DIR", str(tmp_path))
    args = argparse.Namespace(data=None, checkpoint=None, input_size=32, width=0.25, epochs=1, seed=0, quiet=True)
    src = _prepare_model(args, lambda msg: None)
    ckpt = Path(src.checkpoint)
    assert ckpt.parent == tmp_path and ckpt.is_file() and (src.input_size, src.width) == (32, 0.25)
    stamp = ckpt.stat().st_mtime_ns
    assert _prepare_model(args, lambda msg: None) == src and ckpt.stat().st_mtime_ns == stamp  # reused
