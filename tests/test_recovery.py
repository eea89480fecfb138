"""Label-free recovery (hsc_plugin.recovery): output error, BN re-estimation, bias correction per
channel and per region, the guarded ``recover`` that never raises the calibration error, save/load
after a bias-free layer got a bias, and clear errors on bad input that leave the model untouched."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import SmallCNN, assert_unchanged, snapshot
from torch import nn

from hsc_plugin import CalibrationError, compress, load, save
from hsc_plugin import recovery
from hsc_plugin.modules import LowRankConv2d, LowRankLinear, SpatioChannelConv2d, Tucker2Conv2d
from hsc_plugin.recovery import correct_bias, output_error, recover, reestimate_bn, replaced_modules
from hsc_plugin.tiling import Tiling, output_box

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {"data_aware": True}),
    "hsc-input": ("hsc", {"channel_side": "input", "alternatives": False}),  # regional modules, as asked
    "hsc-output": ("hsc", {"channel_side": "output", "alternatives": False}),
}


def _calib(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 2 + 0.5


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """SmallCNN whose BN statistics describe the calibration data (as a trained net's would)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    reestimate_bn(model, _calib())
    return model


_COMPRESSED: dict[str, nn.Module] = {}


def _compressed(reference: nn.Module, key: str) -> nn.Module:
    """A fresh copy of ``reference`` compressed 4x in MACs by METHODS[key] (compressed once)."""
    if key not in _COMPRESSED:
        method, opts = METHODS[key]
        _COMPRESSED[key] = compress(reference, method, calib=_calib(), budget=4.0, progress=False,
                                    bn_reestimation=False, **opts).model  # the factorised model itself
    return copy.deepcopy(_COMPRESSED[key])


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    mods, seen, hooks = dict(model.named_modules()), {}, []
    for n in names:
        hooks.append(mods[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


# ----------------------------------------------------------------------------- output error


class _DictOut(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        y = self.net(x)
        return {"logits": y, "aux": (y * 2, [y])}


def test_output_error_definition_and_modes(reference: nn.Module) -> None:
    x = _calib(16)
    other = copy.deepcopy(reference)
    with torch.no_grad():
        other.head[-1].bias.add_(0.5)
    assert output_error(reference, copy.deepcopy(reference), x) == 0.0
    with torch.no_grad():
        f, g = reference(x), other(x)
    want = float((g - f).norm() / f.norm())
    assert output_error(reference, other, x, batch_size=5) == pytest.approx(want, rel=1e-5)
    # tuple / dict / list outputs: every tensor leaf counts (here each scaled alike, so the same error)
    a, b = _DictOut(reference), _DictOut(other)
    b.train()
    modes = [m.training for m in a.modules()] + [m.training for m in b.modules()]
    assert output_error(a, b, [(x[:8], 0), (x[8:], 1)]) == pytest.approx(want, rel=1e-5)
    assert [m.training for m in a.modules()] + [m.training for m in b.modules()] == modes
    assert True in modes and False in modes


# ----------------------------------------------------------------------------- BN re-estimation


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Dropout(0.5), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4),
    ).eval()


def test_bn_reestimation_repairs_corrupted_statistics_and_restores_modes() -> None:
    x = _calib(48)
    ref = _bn_net()
    assert reestimate_bn(ref, x, batch_size=16) == 3
    broken = copy.deepcopy(ref)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(torch.randn_like(m.running_mean))
                m.running_var.mul_(3.0)
    broken[1].train()  # a dropout left in train mode must stay so, but not act during re-estimation
    before = output_error(ref, broken, x)
    assert before > 0.1
    assert reestimate_bn(broken, x, batch_size=16) == 3
    # same data, same batches, dropout off: exactly the reference's statistics again
    assert output_error(ref, broken, x) < 1e-5
    assert broken[5].momentum == 0.3 and broken[2].momentum == 0.1
    assert broken[1].training and not broken[2].training and not broken.training


def test_bn_reestimation_without_bn_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    snap = snapshot(model)
    assert reestimate_bn(model, _calib(8)) == 0
    assert_unchanged(model, snap)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.unused = _bn_net(), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_bn_not_reached_keeps_its_statistics() -> None:
    model = _WithUnused().eval()
    with torch.no_grad():
        model.unused.running_mean.fill_(3.0)
    assert reestimate_bn(model, _calib(16)) == 3
    assert float(model.unused.running_mean[0]) == 3.0 and int(model.unused.num_batches_tracked) == 0


def test_bn_reestimation_failing_midway_restores_statistics() -> None:
    model = _bn_net()
    snap = snapshot(model)
    with pytest.raises(CalibrationError):
        reestimate_bn(model, [_calib(8), torch.randn(8, 3, 16, 16)])  # second batch: other shape
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- output bias of each module type


def _conv_geometry() -> dict[str, Any]:
    return {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "padding_mode": "zeros"}


def _modules() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8)
    tiling = Tiling.uniform((2, 2), 2, 2)
    clusters = [[0, 2, 4], [1, 3], [5, 6, 7]]
    ranks = [[2, 1, 0], [0, 0, 0], [1, 1, 1], [3, 0, 2]]  # a dropped cluster, a zero-rank region
    return {
        "LowRankConv2d": (LowRankConv2d(6, 8, 2, _conv_geometry(), bias=False), x),
        "LowRankLinear": (LowRankLinear(6, 8, 2, bias=False), torch.randn(5, 6)),
        "Tucker2Conv2d": (Tucker2Conv2d(6, 8, 2, 3, _conv_geometry(), bias=False), x),
        "hsc-output": (SpatioChannelConv2d(6, 8, _conv_geometry(), tiling, "output", [clusters] * 4, ranks,
                                           bias=False), x),
        "hsc-input": (SpatioChannelConv2d(6, 8, _conv_geometry(), tiling, "input", [[[0, 1, 2], [3, 4, 5]]] * 4,
                                          [[1, 1], [0, 0], [2, 0], [1, 2]], bias=False), x),
    }


@pytest.mark.parametrize("kind", list(_modules()))
def test_add_output_bias_shifts_each_region_exactly(kind: str) -> None:
    module, x = _modules()[kind]
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        before = module(x)
        boxes = module.output_bias_regions(before.shape[-2], before.shape[-1]) if before.dim() == 4 else [None]
        delta = torch.randn(len(boxes), 8)
        module.add_output_bias(delta if len(boxes) > 1 else delta[0])
        shift = module(x) - before
    assert module.spec()["bias"] is True
    for (box, d) in zip(boxes, delta):
        if box is None:
            torch.testing.assert_close(shift, d.expand_as(shift))
        else:
            a, b, c, e = box
            region = shift[:, :, a:b, c:e]
            torch.testing.assert_close(region, d.view(1, -1, 1, 1).expand_as(region))
    with pytest.raises(ValueError, match="shape"):
        module.add_output_bias(torch.zeros(len(boxes) + 1, 8))


# ----------------------------------------------------------------------------- bias correction


@pytest.mark.parametrize("key", list(METHODS))
def test_bias_correction_zeroes_each_layers_mean_shift(reference: nn.Module, key: str) -> None:
    model = _compressed(reference, key)
    originals = replaced_modules(reference, model)
    assert originals and all(isinstance(o, (nn.Conv2d, nn.Linear)) for o in originals.values())
    x = _calib()
    inputs = _layer_inputs(model, list(originals), x)  # what each layer sees during the (one) pass

    def shift(name: str) -> torch.Tensor:
        with torch.no_grad():
            d = originals[name](inputs[name]) - model.get_submodule(name)(inputs[name])
        return d.mean((0, 2, 3)) if d.dim() == 4 else d.mean(0)

    before = {n: shift(n).abs().max() for n in originals}
    deltas = correct_bias(model, originals, x)
    assert set(deltas) == set(originals)
    scale = max(float(v) for v in before.values())
    assert scale > 1e-3
    for n in originals:
        if deltas[n].shape[0] == 1:  # per-region shifts are tested below
            assert float(shift(n).abs().max()) < 1e-5 * max(1.0, scale), n


def test_bias_correction_per_region_of_hsc(reference: nn.Module) -> None:
    model = _compressed(reference, "hsc-input")
    originals = replaced_modules(reference, model)
    regional = {n for n in originals if isinstance(model.get_submodule(n), SpatioChannelConv2d)
                and not model.get_submodule(n).single}
    assert regional
    x = _calib()
    inputs = _layer_inputs(model, list(regional), x)
    deltas = correct_bias(model, originals, x)
    differ = False
    for n in regional:
        m = model.get_submodule(n)
        with torch.no_grad():
            d = originals[n](inputs[n]) - m(inputs[n])
        assert deltas[n].shape == (len(m.regions), m.out_channels)
        differ |= bool((deltas[n] - deltas[n].mean(0)).abs().max() > 1e-4)
        for region in m.regions:
            a, b, c, e = output_box(region, d.shape[2], d.shape[3], m.grid)
            assert float(d[:, :, a:b, c:e].mean((0, 2, 3)).abs().max()) < 1e-5, (n, region)
    assert differ, "regions had the same shift: the test does not show per-region correction"


def test_bias_on_a_bias_free_layer_round_trips(reference: nn.Module, tmp_path) -> None:
    model = _compressed(reference, "hsc-output")
    name = "body.5"  # Conv2d(..., bias=False) before a BN
    assert reference.get_submodule(name).bias is None
    correct_bias(model, replaced_modules(reference, model), _calib())
    assert model.get_submodule(name).spec()["bias"] is True
    save(model, tmp_path / "m")
    torch.manual_seed(0)
    loaded = load(tmp_path / "m", SmallCNN().eval())
    x = _calib(8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- guarded recovery


@pytest.mark.parametrize("key", list(METHODS))
def test_recover_never_increases_the_error(reference: nn.Module, key: str) -> None:
    model = _compressed(reference, key)
    x = _calib()
    for kw in ({"bias": True, "bn": True}, {"bias": True, "bn": True, "refresh_reference": False}):
        m = copy.deepcopy(model)
        rep = recover(reference, m, replaced_modules(reference, m), x, **kw)
        assert rep["error_after"] <= rep["error_before"]
        for step in rep["steps"]:
            assert step["applied"] == (step["error_after"] <= step["error_before"])
        target = reference if rep["reference"] == "as given" else _refreshed(reference, x)
        assert output_error(target, m, x) == pytest.approx(rep["error_after"], rel=1e-6)


def _refreshed(reference: nn.Module, x: torch.Tensor) -> nn.Module:
    r = copy.deepcopy(reference)
    reestimate_bn(r, x)
    return r


def test_recover_undoes_a_step_that_hurts(reference: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _compressed(reference, "global_svd")
    x = _calib()
    real_bn, real_bias = recovery.reestimate_bn, recovery.correct_bias
    noise = torch.randn(2, 3, 32, 32) * 0.01 + 5  # statistics from two near-constant images
    monkeypatch.setattr(recovery, "reestimate_bn", lambda m, c, **kw: real_bn(m, noise, **kw))
    monkeypatch.setattr(recovery, "correct_bias", lambda m, o, c, **kw: real_bias(m, o, noise, **kw))
    snap = snapshot(model)
    rep = recover(reference, model, replaced_modules(reference, model), x, bias=True, bn=True,
                  refresh_reference=False)  # the refresh would use the patched function too
    assert [s["applied"] for s in rep["steps"]] == [False, False]
    assert all(s["error_after"] > s["error_before"] for s in rep["steps"])
    assert rep["error_after"] == rep["error_before"]
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error_and_changes_nothing(reference: nn.Module) -> None:
    model = _compressed(reference, "tucker2")
    originals = replaced_modules(reference, model)
    snap = snapshot(model)
    empty = torch.empty(0, 3, 32, 32)
    with pytest.raises(CalibrationError, match="empty"):
        output_error(reference, model, empty)
    with pytest.raises(CalibrationError, match="empty"):
        reestimate_bn(model, empty)
    with pytest.raises(CalibrationError, match="empty"):
        correct_bias(model, originals, empty)
    with pytest.raises(CalibrationError):
        correct_bias(model, originals, [])
    with pytest.raises(ValueError, match="not a module"):
        correct_bias(model, {"body.nope": nn.Conv2d(1, 1, 1)}, _calib())
    with pytest.raises(ValueError, match="not a module"):
        recover(reference, model, {"body.nope": nn.Conv2d(1, 1, 1)}, _calib())
    with pytest.raises(TypeError, match="add_output_bias"):
        correct_bias(model, {"body.1": reference.body[1]}, _calib())  # a BN, not a factorised layer
    with pytest.raises(CalibrationError):  # fails in the middle of the pass: nothing half-corrected
        correct_bias(model, originals, [_calib(8), torch.randn(8, 3, 16, 16)])
    assert_unchanged(model, snap)
