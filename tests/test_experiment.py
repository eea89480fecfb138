"""A tiny end-to-end run of the comparison pipeline (demo / reproduce) on the bundled sample."""

from __future__ import annotations

import json

import torch

from hsc_plugin.mri import alexnet_mri, bundled_sample_path, load_split
from hsc_plugin.mri.experiment import Setting, run_comparison
from hsc_plugin.mri.report import (
    markdown_table,
    pareto_front,
    plot_pareto,
    results_markdown,
    save_json,
    speedup_cell,
    text_table,
)


def test_pareto_front() -> None:
    pts = [(1.0, 80.0), (2.0, 85.0), (2.5, 84.0), (3.0, 90.0), (0.5, 70.0), (3.0, 89.0)]
    assert pareto_front(pts) == [4, 0, 1, 3]


def test_speedup_cells_compare_with_the_paired_dense_timing() -> None:
    """A compressed row is compared with the dense time measured interleaved with it, not with the
    original row's own timing (taken at another moment); a wide spread prints "disturbed"; a
    speed-up above the MAC ratio is flagged."""
    key = "latency_b1_ms"
    base = {"macs": 300, key: 10.0, "latency_b1_disturbed": False}
    paired = {"macs": 100, key: 2.0, "dense_latency_b1_ms": 4.0, "latency_b1_disturbed": False}
    assert speedup_cell(paired, base, key) == "2.00x"  # 4 / 2, not 10 / 2
    assert speedup_cell({**paired, "latency_b1_disturbed": True}, base, key) == "disturbed"
    assert "suspect" in speedup_cell({**paired, "dense_latency_b1_ms": 20.0}, base, key)  # 10x from 3x fewer MACs
    assert speedup_cell({"macs": 100, key: 5.0}, base, key) == "2.00x"  # unpaired (older results): the original's
    assert speedup_cell({"macs": 100, key: 5.0}, {**base, "latency_b1_disturbed": True}, key) == "disturbed"
    assert speedup_cell({"macs": 100}, base, key) == "-"
    row = {"setting": "svd", "ratio": 3.0, "stage": "compress-only", "accuracy": 0.9, "accuracy_se": 0.01,
           "macro_f1": 0.9, "macro_f1_se": 0.01, "f1_meningioma": 0.9, "f1_meningioma_se": 0.01, "params": 1,
           **paired, "latency_b1_disturbed": True}
    assert "disturbed / -" in text_table([{**row, **base, "setting": "uncompressed", "stage": "-"}, row])


def test_comparison_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    train = load_split(bundled_sample_path(), "train", 32, max_per_class=6)
    test = load_split(bundled_sample_path(), "test", 32, max_per_class=4)
    model = alexnet_mri(width=0.25, input_size=32).eval()
    settings = (Setting("svd", "global_svd", {"data_aware": True}), Setting("hsc", "hsc", {"grid": (2, 2)}))
    rows = run_comparison(model, train, test, settings=settings, ratios=(3.0,), n_calib=16, finetune_epochs=1,
                          latency_runs=2, n_boot=50, progress=False, log=lambda s: None)
    stages = [(r["setting"], r["stage"]) for r in rows]
    assert stages == [("uncompressed", "-"), ("svd", "compress-only"), ("svd", "fine-tuned"),
                      ("hsc", "compress-only"), ("hsc", "fine-tuned")]
    for r in rows[1:]:
        assert abs(rows[0]["macs"] / r["macs"] / 3.0 - 1) <= 0.02
        assert 0 <= r["accuracy"] <= 1 and r["accuracy_se"] >= 0 and r["latency_b1_ms"] > 0
        # timed interleaved with the original: the dense time it is compared with, and the spread flag
        assert r["dense_latency_b1_ms"] > 0 and isinstance(r["latency_cl_b32_disturbed"], bool)
    assert "dense_latency_b1_ms" not in rows[0] and "latency_b1_disturbed" in rows[0]
    assert "svd" in markdown_table(rows) and "hsc" in text_table(rows)
    js = json.loads(save_json(rows, tmp_path / "r.json", {"command": "test"}).read_text())
    assert len(js["rows"]) == 5
    assert plot_pareto(rows, tmp_path / "p.png").stat().st_size > 1000
    md = results_markdown(rows, {"command": "hsc reproduce", "machine": "test", "seconds": 1.0})
    assert "8.21 G" in md and "89.80%" in md and "| svd | 3x | fine-tuned |" in md


def test_reproduce_latency_pass_adds_latency_to_saved_results(tmp_path, monkeypatch) -> None:
    """``hsc reproduce --measure-latency``: accuracy first (any machine), latency second (idle)."""
    from hsc_plugin.cli import main
    from hsc_plugin.mri import paper_recipe

    recipe = paper_recipe()
    torch.manual_seed(0)
    train = load_split(bundled_sample_path(), "train", recipe.input_size, max_per_class=3)
    test = load_split(bundled_sample_path(), "test", recipe.input_size, max_per_class=2)
    model = alexnet_mri(width=recipe.width, input_size=recipe.input_size).eval()
    settings = (Setting("svd", "global_svd", {"data_aware": True}),)
    models, out = tmp_path / "models", tmp_path / "out"
    rows = run_comparison(model, train, test, settings=settings, ratios=(3.0,), n_calib=8, finetune_epochs=1,
                          latency=False, n_boot=20, progress=False, log=lambda s: None, save_dir=str(models))
    assert all("latency_b1_ms" not in r for r in rows)
    save_json(rows, out / "results.json", {"command": "hsc reproduce --no-latency", "machine": "test", "seconds": 1.0})
    argv = ["reproduce", "--measure-latency", str(models), "--out-dir", str(out), "--latency-runs", "2"]
    monkeypatch.setattr("sys.argv", ["hsc", *argv])  # the command is recorded in RESULTS.md
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in data["rows"]] == ["-", "compress-only", "fine-tuned"]
    for r in data["rows"]:
        assert r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0
        assert r["latency_cl_b1_ms"] > 0 and r["latency_cl_b32_ms"] > 0  # channels_last too
    assert data["rows"][1]["latency_b1_ms"] == data["rows"][2]["latency_b1_ms"]  # same structure, timed once
    md = (out / "RESULTS.md").read_text()
    assert "--measure-latency" in md and "not measured" not in md
    assert "channels_last (NHWC)" in md and md.count(" / ") > 6


_SHRUNK_DEMO = """
import functools, sys
import hsc_plugin.mri as mri
import hsc_plugin.mri.experiment as experiment

mri.demo_recipe = lambda: mri.TrainRecipe(input_size=32, width=0.25, epochs=1, lr=1e-3, batch_size=32)
experiment.LATENCY_CONFIGS = ((1, False), (1, True))  # batch 1 only, both layouts
experiment.measure_interleaved = functools.partial(experiment.measure_interleaved, threads=1)
full = experiment.run_comparison
experiment.run_comparison = lambda *a, **k: full(*a, **{**k, "latency_runs": 3, "n_boot": 50})
from hsc_plugin.cli import main
sys.exit(main(["demo", "--data", sys.argv[1], "--out-dir", sys.argv[2]]))
"""


def test_demo_output_captured_has_no_progress_noise_and_times_every_step(tmp_path) -> None:
    """Issue 14.3/14.4: ``hsc demo`` with stdout and stderr captured (pipes, not a terminal) prints
    no carriage return, at most one progress line per stage, and says how long each step took.
    Shrunk to run in seconds: 12 + 4 images per class, a 32 px model trained for one epoch,
    3 timing runs at batch 1 with one thread."""
    import re
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    for split, n in (("train", 12), ("test", 4)):
        for cls_dir in sorted((bundled_sample_path() / split).iterdir()):
            (data / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, data / split / cls_dir.name / f.name)
    env = {**__import__("os").environ, "HSC_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _SHRUNK_DEMO, str(data), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    bars = [line for line in text.splitlines() if re.search(r"\d+%\||\d+/\d+ \[|(it|batch|layer)/s\]", line)]
    stages = [line.split(":")[0] for line in bars]
    assert len(stages) == len(set(stages)), bars  # at most one progress line per stage
    steps = [line for line in text.splitlines() if re.match(r"(model|original|.* @ 3x):", line)]
    assert len(steps) == 1 + 1 + 3, text  # the model, the original, the three settings
    for line in steps:
        assert re.search(r"(in|evaluate[^)]*?) \d+(\.\d+)?s", line), line
    assert re.search(r"^total \d+s$", text, re.M)
    assert (tmp_path / "out" / "demo_report.json").is_file()
