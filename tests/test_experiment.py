"""A tiny end-to-end run of the comparison pipeline (demo / reproduce) on the bundled sample."""

from __future__ import annotations

import json

import torch

from hsc_plugin.mri import alexnet_mri, bundled_sample_path, load_split
from hsc_plugin.mri.experiment import Setting, run_comparison
from hsc_plugin.mri.report import markdown_table, pareto_front, plot_pareto, results_markdown, save_json, text_table


def test_pareto_front() -> None:
    pts = [(1.0, 80.0), (2.0, 85.0), (2.5, 84.0), (3.0, 90.0), (0.5, 70.0), (3.0, 89.0)]
    assert pareto_front(pts) == [4, 0, 1, 3]


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
