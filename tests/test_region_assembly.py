"""Region outputs assembled into one map: written in place in eager inference when the map is large,
concatenated everywhere else — bit-identical values and the same memory layout either way."""

from __future__ import annotations

import pytest
import torch
from _factories import hsc_from_conv, quadtree_tiling, regional_from_conv
from torch import nn

from hsc_plugin.modules import assembly
from hsc_plugin.tiling import Tiling

TILINGS = {"2x2": Tiling.uniform((2, 2), 2, 2), "3x1": Tiling.uniform((3, 1), 3, 1), "quadtree": quadtree_tiling()}


def _modules(tiling: Tiling) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    strided = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect")
    return {
        "regional-svd": regional_from_conv(conv, tiling, 4, jitter=0.3),
        "regional-tucker2": regional_from_conv(strided, tiling, 4, base="tucker2", rank_in=3, jitter=0.3),
        "hsc-input": hsc_from_conv(conv, tiling, "input", [[[0, 1, 2], [3, 4, 5]]] * tiling.n_regions,
                                   [[2, 3]] * tiling.n_regions),
        "hsc-output": hsc_from_conv(strided, tiling, "output", [[[0, 2, 4, 6], [1, 3, 5, 7]]] * tiling.n_regions,
                                    [[3, 0]] * tiling.n_regions),
    }


def _spy(monkeypatch: pytest.MonkeyPatch, least: int = 0) -> list[int]:
    """Count the writes; maps of ``least`` elements and more are written (the tests' maps are small)."""
    monkeypatch.setattr(assembly, "PASTE_MIN_ELEMENTS", least)
    calls: list[int] = []
    real = assembly._paste
    monkeypatch.setattr(assembly, "_paste", lambda parts, boxes: calls.append(len(parts)) or real(parts, boxes))
    return calls


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("tiling", list(TILINGS))
def test_inference_writes_one_map_equal_to_the_concatenation(monkeypatch, tiling: str, layout: str) -> None:
    calls = _spy(monkeypatch)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 6, 17, 14).contiguous(memory_format=fmt)
    for name, m in _modules(TILINGS[tiling]).items():
        m = m.eval().to(memory_format=fmt)
        n = len(calls)
        y_grad = m(x)  # grad mode: the concatenation
        assert len(calls) == n and "Cat" in type(y_grad.grad_fn).__name__, name
        with torch.inference_mode():
            y_inf = m(x)
        assert len(calls) == n + 1, f"{name}: inference did not write the map"
        with torch.no_grad():
            y_ng = m(x)
        assert len(calls) == n + 2, name
        assert torch.equal(y_inf, y_grad.detach()) and torch.equal(y_ng, y_inf), name
        for y in (y_inf, y_ng):
            assert y.is_contiguous(memory_format=fmt) == y_grad.is_contiguous(memory_format=fmt), name
            assert y.stride() == y_grad.stride(), name


def test_empty_regions_at_a_small_input_size(monkeypatch) -> None:
    calls = _spy(monkeypatch)
    m = _modules(TILINGS["quadtree"])["regional-svd"].eval()
    x = torch.randn(2, 6, 3, 3)  # a 4×4-cell tiling on a 3×3 map: some regions have no pixels
    y = m(x)
    with torch.inference_mode():
        assert torch.equal(m(x), y.detach())
    assert calls


def test_traced_scripted_and_compiled_graphs_keep_the_concatenation(monkeypatch) -> None:
    calls = _spy(monkeypatch)
    m = _modules(TILINGS["2x2"])["regional-svd"].eval()
    x = torch.randn(1, 6, 12, 12)
    with torch.no_grad():
        ref = m(x)
        n = len(calls)
        traced = torch.jit.trace(m, x, check_trace=False)
        assert len(calls) == n, "tracing wrote in place"
        assert "aten::cat" in str(traced.graph) and "copy_" not in str(traced.graph)
        scripted = torch.jit.script(m)
        assert torch.equal(scripted(x), ref) and torch.equal(traced(x), ref)
        gm = torch.fx.symbolic_trace(m)
        assert "cat" in gm.code
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


def test_training_gradients_flow_through_every_region() -> None:
    m = _modules(TILINGS["quadtree"])["hsc-input"].train()
    m(torch.randn(2, 6, 17, 14)).pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())


def test_small_maps_are_concatenated_in_inference(monkeypatch) -> None:
    """Below the size where a saved copy outweighs the extra operator calls, inference concatenates."""
    m = _modules(TILINGS["2x2"])["regional-svd"].eval()
    x = torch.randn(2, 6, 17, 14)
    n_out = 2 * 8 * 17 * 14
    calls = _spy(monkeypatch, least=n_out + 1)
    with torch.inference_mode():
        small = m(x)
    assert not calls
    monkeypatch.setattr(assembly, "PASTE_MIN_ELEMENTS", n_out)
    with torch.inference_mode():
        assert torch.equal(m(x), small)
    assert calls == [4]
