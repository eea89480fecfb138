"""The ONNX Runtime latency column of ``hsc reproduce`` (issue 13.4) and benchmarks/fold_bn_gain.py's
equality check. No timed assertions: timings are only checked to be there, positive and finite."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress
from hsc_plugin.mri import alexnet_mri, bundled_sample_path, load_split, paper_recipe
from hsc_plugin.mri.experiment import ORT_BATCHES, Setting, ort_columns, run_comparison
from hsc_plugin.mri.report import markdown_table, results_markdown, save_json, text_table

from _factories import randomise_bn

REPO = Path(__file__).resolve().parents[1]


def _small(method: str, **opts) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = randomise_bn(alexnet_mri(width=0.25, input_size=32))
    calib = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    return dense, compress(dense, method, calib=calib, budget=Budget(3.0), progress=False, **opts).model.eval()


@pytest.mark.parametrize(("method", "opts", "exporter"), [
    ("global_svd", {}, "torchscript"),
    # HSC's regions before adaptive_avg_pool2d((2, 2)): the TorchScript exporter fails, dynamo takes over
    ("hsc", {"grid": (2, 2), "alternatives": False}, "dynamo"),
])
def test_export_with_a_free_batch_axis_matches_the_model(method: str, opts: dict, exporter: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from hsc_plugin.cost.ort import export_onnx, ort_session

    _, model = _small(method, **opts)
    data, used = export_onnx(model, torch.randn(1, 1, 32, 32), dynamic_batch=True)
    assert used == exporter
    session = ort_session(data, threads=1)  # one session serves every batch size
    for batch in (1, 3):
        x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(x)
        (out,) = session.run(None, {"x": x.numpy()})
        assert out.shape == tuple(ref.shape)
        assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4


def test_ort_columns_are_filled_for_a_tiny_model() -> None:
    pytest.importorskip("onnxruntime")
    dense, model = _small("global_svd", data_aware=True)
    row = ort_columns(model, (1, 32, 32), runs=2, dense=dense)
    assert "ort_note" not in row and row["ort_exporter"] == "torchscript"
    for b in ORT_BATCHES:
        for key in (f"ort_b{b}_ms", f"dense_ort_b{b}_ms"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert isinstance(row[f"ort_b{b}_disturbed"], bool)
    alone = ort_columns(dense, (1, 32, 32), runs=2)  # the uncompressed row: no dense pair
    assert alone["ort_b1_ms"] > 0 and "dense_ort_b1_ms" not in alone


def test_comparison_with_and_without_the_ort_column() -> None:
    pytest.importorskip("onnxruntime")
    train = load_split(bundled_sample_path(), "train", 32, max_per_class=3)
    test = load_split(bundled_sample_path(), "test", 32, max_per_class=2)
    model = randomise_bn(alexnet_mri(width=0.25, input_size=32))
    kw = dict(settings=(Setting("svd", "global_svd", {"data_aware": True}),), ratios=(3.0,), n_calib=8,
              latency_runs=2, n_boot=20, progress=False, log=lambda s: None)
    rows = run_comparison(model, train, test, ort=True, **kw)
    assert all(r["ort_b1_ms"] > 0 and r["ort_b32_ms"] > 0 for r in rows)
    assert "dense_ort_b1_ms" in rows[1] and "dense_ort_b1_ms" not in rows[0]
    assert "speed-up ORT b1 / b32" in text_table(rows) and "speed-up ORT b1 / b32" in markdown_table(rows)
    md = results_markdown(rows, {"command": "test", "machine": "test", "seconds": 1.0})
    assert "ONNX Runtime (CPU, BatchNorm folded)" in md and "; ORT " in md
    rows = run_comparison(model, train, test, **kw)  # off unless asked (hsc demo)
    assert not any(k.startswith("ort_") for r in rows for k in r)
    md = results_markdown(rows, {"command": "t", "machine": "t", "seconds": 1.0})
    assert "ORT" not in text_table(rows) and "ONNX Runtime" not in md


def test_the_column_says_why_when_onnxruntime_is_missing(monkeypatch) -> None:
    import hsc_plugin.mri.experiment as experiment

    monkeypatch.setattr(experiment, "ort_available", lambda: False)
    dense, model = _small("global_svd")
    row = experiment.ort_columns(model, (1, 32, 32), runs=2, dense=dense)
    assert row == {"ort_note": "not measured (onnxruntime not installed)"}
    base = {"setting": "uncompressed", "ratio": 1.0, "stage": "-", "accuracy": 0.9, "accuracy_se": 0.01,
            "macro_f1": 0.9, "macro_f1_se": 0.01, "f1_meningioma": 0.9, "f1_meningioma_se": 0.01, "macs": 3,
            "params": 1, **row}
    assert "not measured (onnxruntime not installed)" in text_table([base, {**base, "setting": "svd", "macs": 1}])


def test_latency_pass_has_the_ort_column_and_no_ort_leaves_it_out(tmp_path, monkeypatch) -> None:
    """``hsc reproduce --measure-latency``: ORT on by default; a rerun with ``--no-ort`` drops it."""
    pytest.importorskip("onnxruntime")
    from hsc_plugin.cli import main

    recipe = paper_recipe()
    torch.manual_seed(0)
    train = load_split(bundled_sample_path(), "train", recipe.input_size, max_per_class=3)
    test = load_split(bundled_sample_path(), "test", recipe.input_size, max_per_class=2)
    model = alexnet_mri(width=recipe.width, input_size=recipe.input_size).eval()
    models, out = tmp_path / "models", tmp_path / "out"
    rows = run_comparison(model, train, test, settings=(Setting("svd", "global_svd", {"data_aware": True}),),
                          ratios=(3.0,), n_calib=8, latency=False, n_boot=20, progress=False, log=lambda s: None,
                          save_dir=str(models))
    save_json(rows, out / "results.json", {"command": "hsc reproduce --no-latency", "machine": "test", "seconds": 1.0})
    for argv in (["--latency-runs", "2"], ["--latency-runs", "2", "--no-ort"]):
        argv = ["reproduce", "--measure-latency", str(models), "--out-dir", str(out), *argv]
        monkeypatch.setattr("sys.argv", ["hsc", *argv])
        assert main(argv) == 0
        data = json.loads((out / "results.json").read_text())
        md = (out / "RESULTS.md").read_text()
        if "--no-ort" not in argv:
            for r in data["rows"]:
                assert r["ort_b1_ms"] > 0 and r["ort_b32_ms"] > 0 and isinstance(r["ort_b1_disturbed"], bool)
            assert data["rows"][1]["dense_ort_b32_ms"] > 0
            assert "speed-up ORT b1 / b32" in md and "ONNX Runtime (CPU, BatchNorm folded)" in md
        else:
            assert not any(k.startswith(("ort_", "dense_ort_")) for r in data["rows"] for k in r)
            assert "ORT" not in md and "ONNX Runtime" not in md
            assert data["rows"][1]["latency_b1_ms"] > 0


# -- benchmarks/fold_bn_gain.py ----------------------------------------------------------------------


def _fold_bn_gain():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("fold_bn_gain", REPO / "benchmarks" / "fold_bn_gain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["dense", "hsc", "tucker2", "global_svd"])
def test_fold_bn_gain_equality_check(method: str, monkeypatch) -> None:
    gain = _fold_bn_gain()
    dense, model = _small(method if method != "dense" else "global_svd")
    model = dense if method == "dense" else model
    x = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    c = gain.fold_check(model, x)
    assert c["ok"] and c["fp64"] <= 1e-10 and c["fp32"] <= 1e-4
    assert c["folded"].folded_bn and not any(isinstance(m, nn.BatchNorm2d) for m in c["folded"].modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is untouched

    def wrong(m: nn.Module) -> nn.Module:  # a fold that is off by a little must be caught
        from hsc_plugin import fold_bn

        f = fold_bn(m)
        with torch.no_grad():
            [x for x in f.modules() if getattr(x, "bias", None) is not None][-1].bias.add_(1e-3)
        return f

    monkeypatch.setattr(gain, "fold_bn", wrong)
    assert not gain.fold_check(model, x)["ok"]


def test_fold_bn_gain_timings_smoke() -> None:
    pytest.importorskip("onnxruntime")
    gain = _fold_bn_gain()
    _, model = _small("tucker2", data_aware=True)
    c = gain.fold_check(model, torch.randn(2, 1, 32, 32))
    cells = gain.timings(model, c["folded"], (1, 32, 32), runs=2, threads=1, ort=True)
    assert len(cells) == 8 and all("→" in ms and "%" in g for ms, g in zip(cells[::2], cells[1::2]))
