"""Save → load round trips: a compressed model leaves the process as JSON structure + weights and
comes back, on a fresh base model, as exactly the same function, for every method; a base model
that is not the one the compressed model was made from is a clear error that leaves it untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from _factories import FORMS, factorise_convs

from hsc_plugin import Budget, compress, load, save
from hsc_plugin.modules import TYPES

timm = pytest.importorskip("timm", reason="timm is a dev extra")

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "tucker2": ("tucker2", {}),
    "hsc": ("hsc", {}),
    "hsc-output": ("hsc", {"channel_side": "output"}),
    **{form: (form, {}) for form in FORMS},  # forms no compressor makes yet: built from the dense convs
}
REPLACED = tuple(TYPES.values())


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval()


def _alexnet() -> nn.Module:
    from hsc_plugin.mri import alexnet_mri

    torch.manual_seed(0)
    return alexnet_mri(width=0.25, input_size=64).eval()


def _other_weights(factory: Callable[[], nn.Module]) -> nn.Module:
    """The same architecture with different weights: loading must overwrite every tensor."""
    model = factory()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    return model


ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (_resnet18, (3, 64, 64)),
    "alexnet_mri": (_alexnet, (1, 64, 64)),
}


def _replaced(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, REPLACED)}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_gives_identical_outputs(tmp_path: Path, arch: str, method: str) -> None:
    factory, shape = ARCHS[arch]
    name, opts = METHODS[method]
    gen = torch.Generator().manual_seed(1)
    calib, x = torch.randn(4, *shape, generator=gen), torch.randn(3, *shape, generator=gen)
    if name in FORMS:  # a bare model (no report) saves and loads the same way
        model = factorise_convs(factory(), name).eval()
        save(model, tmp_path / "m")
    else:
        res = compress(factory(), name, calib=calib, budget=Budget(3.0), progress=False, **opts)
        model = res.model
        save(res, tmp_path / "m")
    assert _replaced(model), "nothing was factorised: the round trip would prove nothing"

    loaded = load(tmp_path / "m", _other_weights(factory))
    assert _replaced(loaded) == _replaced(model)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_json_and_plain_tensors(tmp_path: Path) -> None:
    """No pickled code: the structure is JSON, the weights load with ``weights_only=True``."""
    calib = torch.randn(4, 1, 64, 64)
    res = compress(_alexnet(), "hsc", calib=calib, budget=Budget(3.0), grid=(2, 2), progress=False)
    save(res, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["structure.json", "weights.pt"]
    structure = json.loads((tmp_path / "m" / "structure.json").read_text())
    assert structure["format"] == "hsc-plugin/1"
    assert {n: s["type"] for n, s in structure["replacements"].items()} == _replaced(res.model)
    assert structure["report"]["method"] == "hsc"
    state = torch.load(tmp_path / "m" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state.keys() == res.model.state_dict().keys()
    # saving the bare model (no report) works too
    save(res.model, tmp_path / "bare")
    assert "report" not in json.loads((tmp_path / "bare" / "structure.json").read_text())


@pytest.fixture(scope="module")
def saved_alexnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m"
    res = compress(_alexnet(), "hsc", calib=torch.randn(4, 1, 64, 64), budget=Budget(3.0), progress=False,
                   alternatives=False)  # HSC's regions (the stem stays dense: the patterns below rely on it)
    save(res, path)
    return path


def _mismatched() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    from hsc_plugin.mri import alexnet_mri

    return {
        # a factorised layer has other channels: named before anything is replaced
        "wider": (lambda: alexnet_mri(width=0.5, input_size=64), r"Layer 'features\.4'.*in_channels"),
        # a layer that was kept dense has another shape: found by the weight check
        "classes": (lambda: alexnet_mri(num_classes=10, width=0.25, input_size=64),
                    r"do not fit.*classifier\.7\.weight"),
        "in-chans": (lambda: alexnet_mri(in_chans=3, width=0.25, input_size=64), r"do not fit.*features\.0\.weight"),
        "other-arch": (lambda: timm.create_model("resnet18", pretrained=False), "has no layer 'features"),
    }


@pytest.mark.parametrize("case", list(_mismatched()))
def test_mismatched_base_model_is_a_clear_error_and_left_untouched(saved_alexnet: Path, case: str) -> None:
    factory, pattern = _mismatched()[case]
    base = factory().eval()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=pattern):
        load(saved_alexnet, base)
    assert_unchanged(base, snap)


def test_base_layer_of_another_type_is_refused(saved_alexnet: Path) -> None:
    base = _alexnet()
    base.features[4] = nn.Identity()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=r"Layer 'features\.4' of the base model is Identity"):
        load(saved_alexnet, base)
    assert_unchanged(base, snap)


def test_cli_out_writes_the_format_for_hsc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hsc compress --out`` (global_svd is covered in test_cli.py) with HSC's spatial modules."""
    from hsc_plugin.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from _factories import tiny_cnn

    out = tmp_path / "out"
    assert main(["compress", "_factories:tiny_cnn", "--method", "hsc", "--macs", "3x", "--calib", "random",
                 "--input-size", "3,32,32", "-o", "grid=(2,2)", "-o", "alternatives=False", "--out", str(out)]) == 0
    structure = json.loads((out / "structure.json").read_text())
    assert "SpatioChannelConv2d" in {s["type"] for s in structure["replacements"].values()}
    torch.load(out / "weights.pt", weights_only=True)
    loaded = load(out, tiny_cnn()).eval()
    assert _replaced(loaded) == {n: s["type"] for n, s in structure["replacements"].items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(loaded(x)).all()
