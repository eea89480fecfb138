"""Compressed models run where models are deployed: ONNX (checked in onnxruntime), ``torch.export``,
TorchScript and ``torch.compile``, for every method and every execution form (the forms no
compressor makes yet are built from the dense convs, ``_factories.factorise_convs``), matching the
eager model to 1e-4.

ONNX: the TorchScript-based exporter (``dynamo=False``) exports every method's modules and is
fast, so it runs on every method in the default suite. The dynamo exporter (torch's default) works
too but takes 5-25 s per model on two CPU cores, so it runs under ``slow`` (``torch.export``, which
it builds on, runs by default).
The TorchScript-based exporter cannot export an HSC layer followed by ``adaptive_avg_pool2d`` to a
size other than 1 (the MRI AlexNet): the regions' crops are traced as shape arithmetic, so ONNX
shape inference loses the spatial size that the pool's symbolic needs; that case is pinned below.
``torch.compile`` runs with the ``eager`` backend by default (Dynamo capture, ``fullgraph=True``:
no graph break); inductor takes 40-140 s to compile one small model on two cores, so it is ``slow``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SmallCNN
from torch import nn

from _factories import FORMS, factorise_convs

from hsc_plugin import Budget, compress
from hsc_plugin.modules import TYPES

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "tucker2": ("tucker2", {}),
    "hsc": ("hsc", {"grid": (2, 2), "alternatives": False}),  # the regions path itself
    "hsc-output": ("hsc", {"channel_side": "output", "grid": (2, 2), "alternatives": False}),
}
ALL = list(METHODS) + list(FORMS)  # forms no compressor makes yet: built from the dense convs
REPLACED = tuple(TYPES.values())
ATOL = 1e-4
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _compressed(method: str, base: nn.Module | None = None, x: torch.Tensor = X) -> nn.Module:
    if base is None:
        torch.manual_seed(0)
        base = SmallCNN().eval()
    if method in FORMS:
        model = factorise_convs(base, method)
    else:
        name, opts = METHODS[method]
        model = compress(base, name, calib=x, budget=Budget(3.0), progress=False, **opts).model
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, REPLACED)}
    assert kinds, "nothing factorised"
    if method.startswith("hsc"):
        assert "SpatioChannelConv2d" in kinds  # the regions path, not only the plain SVD module
    if method.startswith("regional"):
        assert kinds == {"RegionalExpansionConv2d"}
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {m: _compressed(m) for m in ALL}


def _onnx_matches(model: nn.Module, x: torch.Tensor, path: Path, dynamo: bool) -> float:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev extra")
    pytest.importorskip("onnx", reason="onnx is a dev extra")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    assert out.shape == tuple(ref.shape)
    return float((torch.from_numpy(out) - ref).abs().max())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("method", ALL)
def test_onnx_torchscript_exporter_runs_in_onnxruntime(models, tmp_path: Path, method: str) -> None:
    assert _onnx_matches(models[method], X, tmp_path / "m.onnx", dynamo=False) <= ATOL


@pytest.mark.parametrize("method", ALL)
def test_torch_export(models, method: str) -> None:
    m = models[method]
    with torch.no_grad():
        ref = m(X)
        # batch size dynamic in the exported program
        ep = torch.export.export(m, (X,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        assert (ep.module()(X) - ref).abs().max().item() <= ATOL
        assert (ep.module()(X[:2]) - m(X[:2])).abs().max().item() <= ATOL


@pytest.mark.parametrize("method", ALL)
def test_torchscript(models, method: str) -> None:
    m = models[method]
    y = torch.randn(2, 3, 40, 48)  # another input size: the scripted HSC module recomputes its crops
    with torch.no_grad():
        scripted = torch.jit.script(m)
        assert (scripted(X) - m(X)).abs().max().item() <= ATOL
        assert (scripted(y) - m(y)).abs().max().item() <= ATOL


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ALL)
def test_torch_compile_without_graph_breaks(models, method: str, backend: str) -> None:
    m = models[method]
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert (compiled(X) - m(X)).abs().max().item() <= ATOL


# -- slow: the dynamo exporter on every method and model, inductor --------------------------------


def _alexnet() -> nn.Module:
    from hsc_plugin.mri import alexnet_mri

    torch.manual_seed(0)
    return alexnet_mri(width=0.25, input_size=64).eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_onnx_dynamo_exporter_mri_alexnet(tmp_path: Path, method: str) -> None:
    x = torch.randn(4, 1, 64, 64)
    model = _compressed(method, _alexnet(), x)
    assert _onnx_matches(model, x, tmp_path / "m.onnx", dynamo=True) <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_onnx_both_exporters_resnet18(tmp_path: Path, method: str) -> None:
    timm = pytest.importorskip("timm", reason="timm is a dev extra")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = _compressed(method, timm.create_model("resnet18", pretrained=False).eval(), x)
    assert _onnx_matches(model, x, tmp_path / "a.onnx", dynamo=False) <= ATOL
    assert _onnx_matches(model, x, tmp_path / "b.onnx", dynamo=True) <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_onnx_torchscript_exporter_mri_alexnet(tmp_path: Path, method: str) -> None:
    """SVD/Tucker export; HSC before ``adaptive_avg_pool2d((2, 2))`` is a known exporter limit."""
    x = torch.randn(4, 1, 64, 64)
    model = _compressed(method, _alexnet(), x)
    if method.startswith("hsc"):
        with pytest.raises(Exception, match="adaptive_avg_pool2d"):
            _onnx_matches(model, x, tmp_path / "m.onnx", dynamo=False)
    else:
        assert _onnx_matches(model, x, tmp_path / "m.onnx", dynamo=False) <= ATOL
