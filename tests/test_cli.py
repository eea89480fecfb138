"""The ``hsc compress`` command: factories and timm names, random or image-folder calibration,
the JSON report, ``--out`` round trips, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hsc_plugin.serialization as serialization
from hsc_plugin import measure_costs
from hsc_plugin.cli import main
from hsc_plugin.modules import LowRankConv2d, LowRankLinear, Tucker2Conv2d

TESTS = Path(__file__).resolve().parent
FACTORY = "_factories:tiny_cnn"
timm = pytest.importorskip("timm")



@pytest.fixture(autouse=True)
def _factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def _fresh_base() -> torch.nn.Module:
    from _factories import tiny_cnn

    return tiny_cnn().eval()


def _hsc(*args: str) -> subprocess.CompletedProcess:
    """The installed ``hsc`` command (``python -m hsc_plugin.cli`` where the script is not on PATH)."""
    exe = shutil.which("hsc")
    cmd = [exe] if exe else [sys.executable, "-m", "hsc_plugin.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def _check_report(path: Path, ratio: float = 3.0) -> dict:
    report = json.loads(path.read_text())
    assert report["budget_met"] is True
    assert abs(report["achieved_ratio"] / ratio - 1) <= 0.02
    assert report["budget"]["ratio"] == ratio and report["budget"]["metric"] == "macs"
    return report


def test_compress_factory_random_calib_report_and_out(tmp_path: Path, capsys, monkeypatch) -> None:
    saved = {}
    real_save = serialization.save

    def spy(result, path):  # keep the CLI's compressed model to compare the reloaded one with
        saved["model"] = result.model
        return real_save(result, path)

    monkeypatch.setattr(serialization, "save", spy)
    out, rep = tmp_path / "out", tmp_path / "r.json"
    rc = main(["compress", FACTORY, "--method", "global_svd", "--macs", "3x", "--calib", "random",
               "--input-size", "3,32,32", "--report", str(rep), "--out", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "RANDOM" in cap.err  # random calibration is labelled as such
    assert cap.out.splitlines()[0].split()[:4] == ["layer", "status", "form", "ranks"]
    assert "factorised" in cap.out and "met=True" in cap.out
    report = _check_report(rep)
    assert report["method"] == "global_svd" and report["input_shape"] == [3, 32, 32]

    # --out round trip: a fresh base model + the saved structure and weights = the same model
    loaded = serialization.load(out, _fresh_base())
    factorised = {L["name"] for L in report["layers"] if L["status"] == "factorised"}
    types = (LowRankConv2d, LowRankLinear, Tucker2Conv2d)
    assert factorised and {n for n, m in loaded.named_modules() if isinstance(m, types)} == factorised
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved["model"].eval()(x))
    assert measure_costs(loaded, x[:1]).macs == report["macs_after"]


def test_compress_with_an_image_folder_as_calibration(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for i in range(6):  # odd sizes and a subfolder: they are found recursively and resized
        path = folder / ("a" if i % 2 else "b") / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8)).save(path)
    (folder / "notes.txt").write_text("not an image")
    rep = tmp_path / "r.json"
    rc = main(["compress", FACTORY, "--method", "tucker2", "--macs", "3x", "--calib", str(folder),
               "--input-size", "3,32,32", "-o", "data_aware=True", "--report", str(rep)])
    assert rc == 0
    assert "RANDOM" not in capsys.readouterr().err
    report = _check_report(rep)
    assert report["calibration_samples"] == 6
    assert report["options"]["data_aware"] is True


def test_compress_a_timm_model_by_name(tmp_path: Path, capsys) -> None:
    name = next((n for n in ("test_resnet", "resnet10t") if timm.is_model(n)), "resnet18")
    rep = tmp_path / "r.json"
    rc = main(["compress", name, "--method", "tucker2", "--macs", "3x", "--input-size", "3,64,64",
               "--report", str(rep)])
    assert rc == 0
    assert "met=True" in capsys.readouterr().out
    assert _check_report(rep)["input_shape"] == [3, 64, 64]


@pytest.mark.slow
def test_compress_resnet18_tucker2(tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    assert main(["compress", "resnet18", "--method", "tucker2", "--macs", "3x", "--input-size", "3,64,64",
                 "--report", str(rep)]) == 0
    _check_report(rep)


def test_the_installed_command_end_to_end(tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    done = _hsc("compress", FACTORY, "--method", "global_svd", "--params", "2x", "--input-size", "3,32,32",
                "--report", str(rep))
    assert done.returncode == 0, done.stderr
    report = json.loads(rep.read_text())
    assert report["budget_met"] is True and report["budget"]["metric"] == "params"
    assert abs(report["params_before"] / report["params_after"] / 2.0 - 1) <= 0.02


def test_latency_budget_from_the_command_line(tmp_path: Path, capsys) -> None:
    """Timed on this machine, so only what does not depend on the timings is asserted: a
    generous ceiling is always met, and the report carries the measurements."""
    rep = tmp_path / "r.json"
    assert main(["compress", FACTORY, "--method", "global_svd", "--latency", "1000ms", "--input-size", "3,32,32",
                 "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["budget"]["metric"] == "latency" and report["budget"]["ms"] == 1000.0
    assert report["budget_met"] is True
    lat = report["latency"]
    assert lat["batch"] == 1 and lat["before_ms"] > 0 and lat["after_ms"] > 0
    assert lat["predicted_after_ms"] <= 1000.0
    assert set(lat["layers"]) <= {L["name"] for L in report["layers"]}
    assert "latency at batch 1" in capsys.readouterr().out
    rep2 = tmp_path / "r2.json"
    assert main(["compress", FACTORY, "--method", "global_svd", "--latency", "1000ms", "--input-size", "3,32,32",
                 "--channels-last", "-o", "latency_batch=2", "--report", str(rep2)]) == 0
    cm = json.loads(rep2.read_text())["latency"]["cost_model"]
    assert cm["channels_last"] is True and cm["batch"] == 2
    with pytest.raises(SystemExit, match="applies to a --latency budget"):
        main(["compress", FACTORY, "--macs", "2x", "--channels-last", "--input-size", "3,32,32"])
    rep3 = tmp_path / "r3.json"
    assert main(["compress", FACTORY, "--method", "tucker2", "--latency", "1000ms", "--input-size", "3,32,32",
                 "--tune-pointwise", "--report", str(rep3)]) == 0
    lat3 = json.loads(rep3.read_text())["latency"]
    assert lat3["cost_model"]["tune_pointwise"] is True and isinstance(lat3["pointwise_matmul"], list)
    with pytest.raises(SystemExit, match="applies to a --latency budget"):
        main(["compress", FACTORY, "--macs", "2x", "--tune-pointwise", "--input-size", "3,32,32"])
    with pytest.raises(SystemExit, match="is for NCHW"):
        main(["compress", FACTORY, "--latency", "2x", "--tune-pointwise", "--channels-last", "--input-size", "3,32,32"])


def test_unknown_method_exits_2_with_a_suggestion() -> None:
    done = _hsc("compress", FACTORY, "--method", "global-svd", "--macs", "3x", "--input-size", "3,32,32")
    assert done.returncode == 2
    assert "Unknown compressor 'global-svd'" in done.stderr and "Did you mean 'global_svd'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet181", "--macs", "3x", "--input-size", "3,32,32"], r"unknown timm model 'resnet181'.*did you mean"),
        ([FACTORY, "--macs", "3x", "--params", "2x", "--input-size", "3,32,32"], "one of --macs, --params, --latency"),
        (["no_such_module:factory", "--macs", "3x"], "cannot import 'no_such_module:factory'"),
        ([FACTORY, "--macs", "3x"], "--input-size"),
        ([FACTORY, "--macs", "3x", "--input-size", "3,32,32", "--calib", "/nonexistent/folder"], "no images found"),
        ([FACTORY, "--macs", "3x", "--input-size", "3,32,32", "-o", "data_aware"], "key=value"),
    ],
)
def test_bad_input_stops_with_a_clear_message(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["compress", *args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([FACTORY, "--method", "global-svd", "--input-size", "3,32,32"], "Did you mean 'global_svd'"),
        ([FACTORY, "--method", "global_svd", "--macs", "three", "--input-size", "3,32,32"], "Cannot parse budget"),
        ([FACTORY, "--method", "global_svd", "--macs", "3x", "--input-size", "3,32,32", "-o", "foo=1"], "'foo'"),
        ([FACTORY, "--method", "global_svd", "--macs", "1000x", "--input-size", "3,32,32"], "Cannot reach 1000x"),
    ],
)
def test_bad_values_exit_2(args: list[str], message: str, capsys) -> None:
    assert main(["compress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsc: error: ") and message in err


@pytest.mark.parametrize("args", [["compress"], ["compress", FACTORY, "--scope", "layers"], ["frobnicate"]])
def test_usage_errors_exit_2(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert "usage: hsc" in capsys.readouterr().err
