"""LatencyCostModel(runtime="onnxruntime"): times modules in ORT's CPU provider."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, LatencyCostModel, compress

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def test_ort_ranks_a_6x_cheaper_svd_layer_faster() -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(256, 256, 3, padding=1)
    # SVD of a 256->256 3x3 conv: 256*9*r + r*256 MACs per pixel; r=38 is ~6x fewer than 256*256*9
    cm = LatencyCostModel(1, runs=7, runtime="onnxruntime", threads=1)
    low = nn.Sequential(nn.Conv2d(256, 38, 3, padding=1, bias=False), nn.Conv2d(38, 256, 1))
    assert cm.time(low, (256, 32, 32)) < cm.time(dense, (256, 32, 32))


def test_unknown_runtime_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="runtime"):
        LatencyCostModel(runtime="tensorrt")


@pytest.mark.parametrize("method", ["hsc", "global_svd", "tucker2"])
def test_compressed_models_time_in_ort(method: str) -> None:
    from _factories import tiny_cnn

    res = compress(tiny_cnn().eval(), method, calib=torch.randn(4, 3, 32, 32), budget=Budget(3.0), progress=False)
    ms = LatencyCostModel(1, runs=2, warmup=1, runtime="onnxruntime", threads=1).time(res.model, (3, 32, 32))
    assert ms > 0
