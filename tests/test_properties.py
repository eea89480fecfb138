"""Property-based tests (hypothesis): random Conv2d and Linear layers through every compressor.

For every drawn layer (channels, kernel, stride, padding and padding mode, dilation, groups,
bias, input size) and every compressor:

* full rank (``rank_ratio=1.0``, ``dense_fallback=False``, so it really is factorised)
  reproduces the layer's output to 1e-4;
* any rank gives the right output shape and a finite output;
* the MACs the compressor's cost model predicts for the chosen ranks, the MACs in the report,
  and FlopCounterMode's count of the compressed module are the same number.

Two hypothesis profiles: ``hsc-default`` (30 conv + 15 linear examples, derandomised, in the
default run) and ``hsc-slow`` (500 + 150 examples, ``pytest -m slow``).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hsc_plugin import compress
from hsc_plugin.compressors.global_svd import SVDPlan
from hsc_plugin.compressors.hsc import HSCPlan
from hsc_plugin.compressors.tucker2 import Tucker2Plan

_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("hsc-default", max_examples=30, **_COMMON)
settings.register_profile("hsc-slow", max_examples=500, **_COMMON)
DEFAULT, SLOW = settings.get_profile("hsc-default"), settings.get_profile("hsc-slow")

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "global_svd-data": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {}),
    "tucker2-data": ("tucker2", {"data_aware": True}),
    "hsc": ("hsc", {"channel_side": "input"}),
    "hsc-output": ("hsc", {"channel_side": "output"}),
}
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    depthwise = groups > 1 and draw(st.booleans())
    cin = groups * (1 if depthwise else draw(st.integers(1, 5)))
    cout = cin if depthwise else groups * draw(st.integers(1, 5))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    kinds = ["int", "tuple", "valid"] + (["same"] if stride == (1, 1) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "int":
        padding: Any = draw(st.integers(0, 3))
    elif kind == "tuple":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    else:
        padding = kind
    if kind in ("same", "valid"):
        pad = [d * (kk - 1) // 2 + d * (kk - 1) % 2 for d, kk in zip(dilation, k)] if kind == "same" else [0, 0]
    else:
        pad = [padding, padding] if isinstance(padding, int) else list(padding)
    # input large enough for one output pixel, and for reflect (pad < size) / circular padding
    size = []
    for axis in range(2):
        span = dilation[axis] * (k[axis] - 1) + 1
        low = max(1, span - 2 * pad[axis], pad[axis] + 1)
        size.append(draw(st.integers(low, low + 12)))
    return {"cin": cin, "cout": cout, "kernel": k, "stride": stride, "dilation": dilation, "padding": padding,
            "padding_mode": padding_mode, "groups": groups, "bias": draw(st.booleans()), "hw": tuple(size),
            "batch": draw(st.integers(1, 4)), "ratio": draw(st.floats(0.05, 1.0)),
            "fallback": draw(st.booleans()), "hsc": _hsc_options(draw)}


def _hsc_options(draw: st.DrawFn) -> dict[str, Any]:
    return {"grid": draw(st.sampled_from([(1, 1), (2, 2), (2, 3), (3, 1)])),
            "n_clusters": draw(st.sampled_from([1, 2, 3, None])), "min_region": draw(st.integers(1, 3))}


@st.composite
def linear_configs(draw: st.DrawFn) -> dict[str, Any]:
    return {"fin": draw(st.integers(1, 24)), "fout": draw(st.integers(1, 24)), "bias": draw(st.booleans()),
            "seq": draw(st.sampled_from([None, 1, 3])), "batch": draw(st.integers(1, 6)),
            "ratio": draw(st.floats(0.05, 1.0)), "fallback": draw(st.booleans()), "hsc": _hsc_options(draw)}


def _conv(cfg: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                     dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
                     padding_mode=cfg["padding_mode"])
    # several samples: the data-aware statistics then see enough positions for full rank
    x = torch.randn(max(cfg["batch"], 4), cfg["cin"], *cfg["hw"])
    return nn.Sequential(conv).eval(), x


def _linear(cfg: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(cfg["fin"], cfg["fout"], bias=cfg["bias"])
    shape = (cfg["batch"],) + ((cfg["seq"],) if cfg["seq"] else ()) + (cfg["fin"],)
    return nn.Sequential(lin).eval(), torch.randn(*shape)


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2 / x.shape[0]


def _compress_recording(model: nn.Module, x: torch.Tensor, method: str, cfg: dict[str, Any], **opts: Any):
    """Compress, recording each plan's predicted MACs for the ranks it was built at."""
    predicted: list[float] = []

    def spy(original):
        def build(plan, ranks):
            predicted.append(plan.factorised_cost(ranks, "macs"))
            return original(plan, ranks)
        return build

    name, base = METHODS[method]
    extra = cfg["hsc"] if name == "hsc" else {}
    with ExitStack() as stack:
        for cls in (SVDPlan, Tucker2Plan, HSCPlan):
            stack.enter_context(mock.patch.object(cls, "build", spy(cls.build)))
        res = compress(model, name, calib=x, rank="fixed", progress=False, **base, **extra, **opts)
    return res, predicted


def check_layer(model: nn.Module, x: torch.Tensor, cfg: dict[str, Any]) -> None:
    with torch.no_grad():
        ref = model(x)
    scale = max(1.0, ref.abs().max().item())
    for method in METHODS:
        # 1. full rank really factorised reproduces the layer
        res, predicted = _compress_recording(model, x, method, cfg, rank_ratio=1.0, dense_fallback=False)
        layer = res.report.layers[0]
        event(f"{method}: full rank {layer.status}")
        if layer.status != "factorised":
            # only a layer no compressor could touch; then every method says why
            assert layer.status == "dense" and layer.reason, (method, layer)
            continue
        assert not isinstance(res.model[0], (nn.Conv2d, nn.Linear)), method
        event(f"{method}: {layer.module}")
        with torch.no_grad():
            out = res.model(x)
        assert out.shape == ref.shape, method
        err = (out - ref).abs().max().item()
        assert err <= 1e-4 * scale, (method, err)
        _check_macs(res, x, predicted, method)

        # 2. any rank: right shape, finite output, and the MACs still add up
        try:
            res, predicted = _compress_recording(model, x, method, cfg, rank_ratio=cfg["ratio"],
                                                 dense_fallback=cfg["fallback"])
        except ValueError as exc:  # a lone layer too small to save anything is refused, and why
            assert cfg["fallback"] and "cannot save macs" in str(exc), (method, exc)
            continue
        with torch.no_grad():
            out = res.model(x)
        assert out.shape == ref.shape and torch.isfinite(out).all(), method
        if res.report.layers[0].status == "factorised":
            _check_macs(res, x, predicted, method)
        else:
            assert res.report.macs_after == res.report.macs_before == flop_counter_macs(model, x)


def _check_macs(res, x: torch.Tensor, predicted: list[float], method: str) -> None:
    counted = flop_counter_macs(res.model, x)
    layer = res.report.layers[0]
    assert len(predicted) == 1, method
    assert res.report.macs_after == counted == layer.macs_after, (method, res.report.macs_after, counted)
    assert predicted[0] == counted, (method, predicted[0], counted, layer.details)


@settings(DEFAULT)
@given(conv_configs())
def test_conv_properties(cfg: dict[str, Any]) -> None:
    check_layer(*_conv(cfg), cfg)


@settings(DEFAULT, max_examples=15)
@given(linear_configs())
def test_linear_properties(cfg: dict[str, Any]) -> None:
    check_layer(*_linear(cfg), cfg)


@pytest.mark.slow
@settings(SLOW)
@given(conv_configs())
def test_conv_properties_long(cfg: dict[str, Any]) -> None:
    check_layer(*_conv(cfg), cfg)


@pytest.mark.slow
@settings(SLOW, max_examples=150)
@given(linear_configs())
def test_linear_properties_long(cfg: dict[str, Any]) -> None:
    check_layer(*_linear(cfg), cfg)
