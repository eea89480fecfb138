"""Sequential refit (hsc_plugin.refit): exact at full rank (plain and per region), never raises the
calibration error through ``recover``/``compress``, compensates an earlier layer's error, leaves
the user's model and the reference untouched, and rejects bad input clearly."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import SmallCNN, assert_unchanged, snapshot
from torch import nn

from hsc_plugin import Budget, CalibrationError, compress, load, save
from hsc_plugin.modules import LowRankConv2d, RegionalExpansionConv2d, SpatioChannelConv2d, conv_geometry
from hsc_plugin.recovery import output_error, recover, reestimate_bn
from hsc_plugin.refit import ReferenceOutputs, sequential_refit
from hsc_plugin.tiling import Tiling


def _x(n: int = 32, c: int = 3, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g) * 2 + 0.5


@torch.no_grad()
def _svd_layer(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """Truncated SVD of ``conv`` (data-free); full rank (``rank = C_out``) is exact."""
    co = conv.out_channels
    m = LowRankConv2d(conv.in_channels, co, rank, conv_geometry(conv), bias=conv.bias is not None)
    u, s, vh = torch.linalg.svd(conv.weight.reshape(co, -1), full_matrices=False)
    m.reduce.weight.copy_((s[:rank, None] * vh[:rank]).reshape(rank, *conv.weight.shape[1:]))
    m.expand.weight.copy_(u[:, :rank, None, None])
    if conv.bias is not None:
        m.expand.bias.copy_(conv.bias)
    return m


def _two_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 10, 3, padding=1)).eval()


# ----------------------------------------------------------------------------- exactness


def test_full_rank_first_layer_stays_exact() -> None:
    ref = _two_convs()
    model = copy.deepcopy(ref)
    model[0] = _svd_layer(ref[0], 12)  # full rank: exact, and nothing before it
    x = _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = sequential_refit(ref, model, ["0"], x, batch_size=10)
    assert info["layers"] == 1 and info["factors"] == 1 and info["passes"] == 1
    assert info["moment_bytes"] == 8 * (13 * 13 + 12 * 13)  # (K+1)² + C_out·(K+1), float64
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-4
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-5)


def test_full_rank_recovers_a_perturbed_final_factor() -> None:
    """A wrong final factor over an exact reduction is refitted to the exact one (ridge → 0)."""
    ref = _two_convs()
    model = copy.deepcopy(ref)
    model[0] = _svd_layer(ref[0], 12)
    with torch.no_grad():
        model[0].expand.weight.add_(0.3 * torch.randn_like(model[0].expand.weight))
        model[0].expand.bias.add_(1.0)
    x = _x()
    assert output_error(ref, model, x) > 0.05
    sequential_refit(ref, model, ["0"], x, damping=1e-10)
    assert output_error(ref, model, x) <= 1e-4


@pytest.mark.parametrize("base", ["svd", "tucker2"])
@pytest.mark.parametrize("grid", [(2, 2), (3, 1)])
def test_regional_refit_is_per_region_and_exact_at_full_rank(grid: tuple[int, int], base: str) -> None:
    """Reference: a regional module with a different true 1×1 per region; the model: the same
    reduction with wrong 1×1s. The refit recovers each region's own factor (boxes right)."""
    torch.manual_seed(0)
    tiling = Tiling.uniform(grid, *grid)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1)
    truth = RegionalExpansionConv2d(5, 6, conv_geometry(conv), tiling, 6, base=base,
                                    rank_in=5 if base == "tucker2" else None)
    ref = nn.Sequential(truth, nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for e in model[0].expands:
            e.weight.copy_(torch.randn_like(e.weight))
            e.bias.zero_()
    x = _x(24, 5, 15)
    assert output_error(ref, model, x) > 0.1
    info = sequential_refit(ref, model, ["0"], x, damping=1e-10)
    assert info["factors"] == tiling.n_regions
    for e, t in zip(model[0].expands, truth.expands):
        torch.testing.assert_close(e.weight, t.weight, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(e.bias, t.bias, atol=1e-4, rtol=1e-4)
    # with the default damping an exact factor is a fixed point
    again = copy.deepcopy(model)
    sequential_refit(ref, again, ["0"], x)
    assert output_error(ref, again, x) <= 1e-4


@pytest.mark.parametrize("side", ["input", "output"])
def test_hsc_module_refit_is_per_region_and_cluster(side: str) -> None:
    """HSC's region/cluster module: each region's 1×1 (input side) or each (region, cluster) 1×1
    (output side, its own channels; a rank-0 cluster outputs its bias) is refitted on its own box."""
    torch.manual_seed(0)
    tiling = Tiling.uniform((2, 2), 2, 2)
    geo = conv_geometry(nn.Conv2d(5, 6, 3, padding=1))
    if side == "input":
        clusters, ranks = [[0, 1], [2, 3, 4]], [2, 3]
    else:
        clusters, ranks = [[0, 2, 4], [1, 3], [5]], [2, 2, 0]
    truth = SpatioChannelConv2d(5, 6, geo, tiling, side, [clusters] * 4, [ranks] * 4, bias=False)
    with torch.no_grad():
        for p in truth.parameters():
            p.copy_(torch.randn_like(p))
    ref = nn.Sequential(truth, nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    model = copy.deepcopy(ref)
    finals = [f.module for f in model[0].final_linears(8, 8)]
    assert len(finals) == (4 if side == "input" else 8)
    with torch.no_grad():
        for e in finals:
            e.weight.copy_(torch.randn_like(e.weight))
    x = _x(24, 5, 8)
    assert output_error(ref, model, x) > 0.1
    info = sequential_refit(ref, model, ["0"], x, damping=1e-10)
    assert info["factors"] == len(finals)
    assert output_error(ref, model, x) <= 1e-4
    assert model[0].spec()["bias"]  # it was given the (here zero) bias it fitted: save/load agree
    twin = SpatioChannelConv2d.from_spec(model[0].spec())
    twin.load_state_dict(model[0].state_dict())
    torch.testing.assert_close(twin(x), model[0](x))


# ----------------------------------------------------------------------------- error compensation


def test_second_layer_refit_compensates_the_first_layers_error() -> None:
    ref = _two_convs()
    model = copy.deepcopy(ref)
    model[0] = _svd_layer(ref[0], 1)   # compressed hard
    model[2] = _svd_layer(ref[2], 10)  # full rank: exact on the reference's own inputs
    x = _x(48)
    untouched = copy.deepcopy(model)
    error = output_error(ref, model, x)
    info = sequential_refit(ref, model, ["2"], x)  # only the second layer is refitted
    assert info["layers"] == 1
    assert_unchanged(model[0], snapshot(untouched[0]))
    assert output_error(ref, model, x) < 0.9 * error


def _three_convs_compressed() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(12, 10, 3, padding=1),
                        nn.ReLU(inplace=True), nn.Conv2d(10, 8, 3, padding=1)).eval()
    model = copy.deepcopy(ref)
    model[0], model[2], model[4] = _svd_layer(ref[0], 2), _svd_layer(ref[2], 3), _svd_layer(ref[4], 2)
    return ref, model


def test_kept_reference_outputs_give_the_same_refit_with_fewer_reference_passes() -> None:
    """The targets kept once per batch are the ones each layer's own reference pass computes
    (bit for bit, in-place ReLUs after the layers included), and a second refit reads them all."""
    ref, model = _three_convs_compressed()
    x = _x(40)
    plain, cached, again = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    names = ["0", "2", "4"]
    sequential_refit(ref, plain, names, x, batch_size=16)
    kept = ReferenceOutputs(ref, names, max_bytes=None)
    sequential_refit(ref, cached, names, x, batch_size=16, kept=kept)
    assert kept.passes == 3 and kept.enabled  # one full pass per batch (16 + 16 + 8 samples)
    assert kept.bytes == 4 * 40 * 16 * 16 * (12 + 10 + 8)
    sequential_refit(ref, again, names, x, batch_size=16, kept=kept)
    assert kept.passes == 3  # nothing recomputed
    for other in (cached, again):
        for (k, v), w in zip(plain.state_dict().items(), other.state_dict().values()):
            assert torch.equal(v, w), k


def test_kept_reference_outputs_past_their_limit_fall_back_to_reference_passes() -> None:
    ref, model = _three_convs_compressed()
    x = _x(40)
    plain, cached = copy.deepcopy(model), copy.deepcopy(model)
    sequential_refit(ref, plain, ["0", "2", "4"], x, batch_size=16)
    kept = ReferenceOutputs(ref, ["0", "2", "4"], max_bytes=4 * 16 * 16 * 16 * 30 + 1)  # one batch fits, not two
    sequential_refit(ref, cached, ["0", "2", "4"], x, batch_size=16, kept=kept)
    assert not kept.enabled and kept.bytes <= kept.max_bytes
    for (k, v), w in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.equal(v, w), k


def test_selection_shares_the_refit_targets_between_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """HSC refits each of its candidate allocations; with the targets shared the chosen model is
    the same as with each refit computing its own."""
    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = _x(48, size=32)
    shared = compress(net, "hsc", calib=x, budget=Budget(3.0), progress=False, seed=0)
    assert shared.report.recovery["selection"]["refit"] == "each" and len(shared.report.candidates) > 1
    passes: list[int] = []
    original = ReferenceOutputs.outputs

    def counted(self: ReferenceOutputs, name: str, xb: torch.Tensor) -> list[torch.Tensor] | None:
        out = original(self, name, xb)
        passes.append(self.passes)
        return out

    monkeypatch.setattr(ReferenceOutputs, "outputs", counted)
    again = compress(net, "hsc", calib=x, budget=Budget(3.0), progress=False, seed=0)
    assert passes and max(passes) == 1  # 48 samples, one batch of 64: one reference pass in all
    monkeypatch.setattr(ReferenceOutputs, "outputs", lambda self, name, xb: None)  # every refit on its own
    alone = compress(net, "hsc", calib=x, budget=Budget(3.0), progress=False, seed=0)
    assert shared.report.allocation == alone.report.allocation == again.report.allocation
    for (k, v), w in zip(alone.model.state_dict().items(), shared.model.state_dict().values()):
        assert torch.equal(v, w), k


# ----------------------------------------------------------------------------- guard, every compressor


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    reestimate_bn(model, _x(64, size=32))
    return model


METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "global_svd-data": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {"data_aware": True}),
    "hsc": ("hsc", {}),
}


@pytest.mark.parametrize("key", list(METHODS))
def test_refit_never_raises_the_calibration_error(reference: nn.Module, key: str) -> None:
    method, opts = METHODS[key]
    x = _x(64, size=32)
    small = compress(reference, method, calib=x, budget=Budget(3.0), progress=False, bn_reestimation=False,
                     **opts).model
    rep = recover(reference, small, _factorised(small), x, bn=False, refit=True, refresh_reference=False)
    step = rep["steps"][0]
    assert step["step"] == "sequential_refit"
    assert rep["error_after"] <= rep["error_before"]
    assert step["applied"] == (step["error_after"] <= step["error_before"])
    assert step["applied"] and step["info"]["layers"] > 0  # here it does lower it
    assert output_error(reference, small, x) == pytest.approx(rep["error_after"], rel=1e-6)
    # through compress: recorded in the report, and the final error is at most the unrecovered one
    result = compress(reference, method, calib=x, budget=Budget(3.0), progress=False, sequential_refit=True, **opts)
    steps = result.report.recovery["steps"]
    assert steps[0]["step"] == "sequential_refit"
    assert result.report.calibration_error <= result.report.recovery["error_before"]
    assert result.report.options["sequential_refit"] is True


def _factorised(model: nn.Module) -> dict[str, nn.Module]:
    from hsc_plugin.modules.base import FactorisedModule

    return {n: m for n, m in model.named_modules() if isinstance(m, FactorisedModule)}


def test_refit_round_trips_through_save_load(reference: nn.Module, tmp_path: Any) -> None:
    """A bias-free layer (``body.4``) gets a fitted bias; save/load keeps it."""
    x = _x(64, size=32)
    result = compress(reference, "global_svd", calib=x, budget=Budget(3.0), progress=False,
                      sequential_refit=True, bn_reestimation=False)
    assert result.report.recovery["steps"][0]["applied"]
    save(result, tmp_path / "m")
    torch.manual_seed(0)
    loaded = load(tmp_path / "m", SmallCNN().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- untouched, bad input


class _Flaky:
    """Calibration batches whose ``fail_on_pass``-th iteration yields a NaN batch."""

    def __init__(self, x: torch.Tensor, fail_on_pass: int) -> None:
        self.x, self.fail_on_pass, self.passes = x, fail_on_pass, 0

    def __iter__(self) -> Any:
        self.passes += 1
        bad = self.passes == self.fail_on_pass
        return iter([self.x[:16], self.x[16:] * float("nan") if bad else self.x[16:]])


def test_user_model_and_reference_untouched_and_bad_input(reference: nn.Module) -> None:
    x = _x(32, size=32)
    snap = snapshot(reference)
    compress(reference, "tucker2", calib=x, budget=Budget(3.0), progress=False, data_aware=True,
             sequential_refit=True)
    assert_unchanged(reference, snap)
    with pytest.raises(TypeError, match="sequential_refit must be True or False, got 'yes'"):
        compress(reference, "global_svd", calib=x, budget=Budget(3.0), sequential_refit="yes")
    small = compress(reference, "global_svd", calib=x, budget=Budget(3.0), progress=False,
                     bn_reestimation=False).model
    with torch.no_grad():
        small.body[1].running_mean.add_(1.0)  # differs from the reference's: the refit would copy it
    before = snapshot(small)
    with pytest.raises(ValueError, match="'head.3' is not a factorised module"):
        sequential_refit(reference, small, ["head.3"], x)
    with pytest.raises(CalibrationError, match="NaN"):  # fails after two layers: the model as it was
        sequential_refit(reference, small, list(_factorised(small)), _Flaky(x, fail_on_pass=4))
    assert_unchanged(small, before)
    sequential_refit(reference, small, list(_factorised(small)), x)
    assert_unchanged(reference, snap)
