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
