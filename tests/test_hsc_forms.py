"""HSC as the hierarchy that contains its baselines (issue 12): block factorisers, regional expansion,
forms competing under every budget, candidate allocations judged on the calibration data, recovery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress, create_compressor
from hsc_plugin.calibration import LayerInfo
from hsc_plugin.compressors.hsc_plan import HSCPlan
from hsc_plugin.compressors.hsc_statistics import CellStats, ClusterContributions
from hsc_plugin.compressors.global_svd import SVDPlan
from hsc_plugin.compressors.regional_plan import (RegionalClustersPlan, RegionalExpansionPlan, RegionalSVDPlan,
                                                  RegionalTucker2Plan)
from hsc_plugin.compressors.tucker2 import Tucker2Plan
from hsc_plugin.decomposition import Moment
from hsc_plugin.registry import create
from hsc_plugin.strategy import Block, BlockFactoriser
from hsc_plugin.tiling import Tiling

from conftest import SmallCNN
from test_conv_grid import CONFIGS, _id, _make_conv
from test_determinism import without_wall_times
from test_latency_budget import FakeDevice

NO_RECOVERY = {"bn_reestimation": False, "bias_correction": False}


def _spatial_cnn() -> nn.Module:
    """3×3/5×5 convs only (Tucker-2 treats 1×1 convs and Linear layers as SVDs, HSC as blocks)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.ReLU(),
    ).eval()


def _images(n: int = 16, size: int = 16) -> torch.Tensor:
    """Inputs whose halves differ (regions then have something to gain)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    x[:, :, : size // 2] *= torch.tensor([3.0, 0.2, 1.0]).view(1, 3, 1, 1)
    return x


@pytest.mark.parametrize("side", ["output", "input"])
def test_tucker2_block_with_one_region_and_one_cluster_is_data_aware_tucker2(side: str) -> None:
    model, x = _spatial_cnn(), _images()
    common = {"rank": "fixed", "rank_ratio": 0.5, "progress": False, **NO_RECOVERY}
    hsc = compress(model, "hsc", calib=x, partition="none", clusterer="single", block="tucker2", channel_side=side,
                   alternatives=False, **common)
    t2 = compress(model, "tucker2", calib=x, data_aware=True, **common)
    a, b = hsc.model.state_dict(), t2.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for la, lb in zip(hsc.report.layers, t2.report.layers):
        assert la.ranks == {"r0c0out": lb.ranks["out"], "r0c0in": lb.ranks["in"]} and la.module == lb.module
        assert la.error == pytest.approx(lb.error, rel=1e-4, abs=1e-6)
        assert la.predicted_error == pytest.approx(lb.predicted_error, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["groups"] == "1"][::3], ids=_id)
def test_tucker2_blocks_are_exact_at_full_rank(cfg: dict, side: str) -> None:
    torch.manual_seed(0)
    model, x = _make_conv(cfg)
    res = compress(model, "hsc", calib=x, rank="fixed", rank_ratio=1.0, dense_fallback=False, block="tucker2",
                   channel_side=side, grid=(2, 2), n_clusters=3, min_region=2, progress=False)
    assert res.report.layers[0].status == "factorised"
    with torch.no_grad():
        assert (res.model(x) - model(x)).abs().max().item() <= 1e-4


def _cells(conv: nn.Conv2d, x: torch.Tensor, grid: tuple[int, int]) -> tuple[LayerInfo, CellStats]:
    with torch.no_grad():
        y = conv(x)
        if conv.bias is not None:
            y = y - conv.bias.view(1, -1, 1, 1)
    info = LayerInfo("conv", conv, tuple(x.shape[1:]), tuple(y.shape[1:]))
    cells = CellStats(conv.out_channels, grid, info.out_hw, "output", torch.device("cpu"))
    cells.update(x, y)
    return info, cells


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["groups"] == "1"], ids=_id)
def test_regional_expansion_is_exact_at_full_rank(cfg: dict) -> None:
    torch.manual_seed(0)
    model, x = _make_conv(cfg)
    conv = model[0]
    info, cells = _cells(conv, x, (2, 2))
    plan = RegionalSVDPlan(info, Tiling.uniform((2, 2), 2, 2), cells)
    new = plan.build(plan.full_ranks())
    with torch.no_grad():
        assert (new(x) - conv(x)).abs().max().item() <= 1e-4
    assert plan.predicted_error(plan.full_ranks()) == 0.0


def _regional_tucker2(conv: nn.Conv2d, x: torch.Tensor) -> tuple[RegionalTucker2Plan, RegionalSVDPlan, Tucker2Plan]:
    info, cells = _cells(conv, x, (2, 2))
    ins = CellStats(conv.in_channels, (2, 2), info.out_hw, "input", torch.device("cpu"))
    ins.update(x, x)
    whole = Moment(matrix=cells.S.sum(dim=(0, 1)))
    regional = RegionalSVDPlan(info, Tiling.uniform((2, 2), 2, 2), cells, whole=whole)
    tucker2 = Tucker2Plan(info, whole, ins.S.sum(dim=(0, 1)))
    return RegionalTucker2Plan(info, regional, tucker2), regional, tucker2


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["groups"] == "1" and c["kernel"] != 1], ids=_id)
def test_regional_tucker2_is_exact_at_full_rank(cfg: dict) -> None:
    torch.manual_seed(0)
    model, x = _make_conv(cfg)
    conv = model[0]
    plan, regional, _ = _regional_tucker2(conv, x)
    new = plan.build(plan.full_ranks())
    assert new.base == "svd"  # full input rank: the invertible first 1×1 is folded into the k×k reduction
    with torch.no_grad():
        assert (new(x) - conv(x)).abs().max().item() <= 1e-4
        assert (new(x) - regional.build(regional.full_ranks())(x)).abs().max().item() <= 1e-4
    assert plan.predicted_error(plan.full_ranks()) == 0.0


def test_regional_tucker2_is_tucker2s_reduction_with_the_regional_least_squares_1x1s() -> None:
    """Below full input rank: Tucker-2's first 1×1 and core (same output basis), the regional fits'
    1×1s, Tucker-2's MACs, and one more C_out × R_out map per extra region in parameters."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = _images(32, 12).repeat(1, 3, 1, 1)[:, :8]
    plan, regional, tucker2 = _regional_tucker2(conv, x)
    ranks = [5, 4]
    new, ref = plan.build(ranks), tucker2.build(ranks)
    assert new.base == "tucker2" and len(new.expands) == 4
    torch.testing.assert_close(new.first.weight, ref.first.weight)
    torch.testing.assert_close(new.reduce.weight, ref.core.weight)
    for r, e in enumerate(new.expands):
        torch.testing.assert_close(e.weight[:, :, 0, 0], regional.expansion(r, 5).float())
    assert plan.factorised_cost(ranks, "macs") == tucker2.factorised_cost(ranks, "macs")
    assert plan.factorised_cost(ranks, "params") == tucker2.factorised_cost(ranks, "params") + 3 * (5 * 12 + 12)
    with torch.no_grad():
        target = conv(x)
        errors = [((plan.build([k, 4])(x) - target).norm() / target.norm()).item() for k in (2, 5, 12)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="data-aware"):
        RegionalTucker2Plan(regional.info, regional, Tucker2Plan(regional.info, None, None))


def test_regional_expansion_error_is_exact_and_beats_svd_at_equal_rank() -> None:
    """Its predicted error is the measured calibration error (least squares is exact), it falls
    with the rank, and at every rank it is at most one-region SVD's (same features, more maps)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = _images(32, 12).repeat(1, 3, 1, 1)[:, :8]
    info, cells = _cells(conv, x, (2, 2))
    plan = RegionalSVDPlan(info, Tiling.uniform((2, 2), 2, 2), cells)
    svd = SVDPlan(info, cells.S.sum(dim=(0, 1)))
    with torch.no_grad():
        ref = conv(x) - conv.bias.view(1, -1, 1, 1)
        last = float("inf")
        for k in (1, 2, 4, 8, 16):
            err = ((plan.build([k])(x) - conv.bias.view(1, -1, 1, 1) - ref).norm() / ref.norm()).item()
            assert err == pytest.approx(plan.predicted_error([k]), rel=1e-3, abs=1e-5)
            assert plan.predicted_error([k]) <= svd.predicted_error([k]) + 1e-9
            assert err <= last + 1e-6
            last = err
    assert plan.factorised_cost([4], "macs") == svd.factorised_cost([4], "macs")


def _baseline_plans(conv: nn.Conv2d, x: torch.Tensor) -> tuple[LayerInfo, CellStats, dict[str, object]]:
    """The four one-region baselines of a conv (data-aware / data-free SVD and Tucker-2)."""
    info, cells = _cells(conv, x, (2, 2))
    ins = CellStats(conv.in_channels, (2, 2), info.out_hw, "input", torch.device("cpu"))
    ins.update(x, x)
    whole = cells.S.sum(dim=(0, 1))
    return info, cells, {"svd": SVDPlan(info, whole), "svd-datafree": SVDPlan(info, None),
                         "tucker2": Tucker2Plan(info, whole, ins.S.sum(dim=(0, 1))),
                         "tucker2-datafree": Tucker2Plan(info, None, None)}


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["groups"] == "1" and c["kernel"] != 1][::2], ids=_id)
@pytest.mark.parametrize("base", ["svd", "svd-datafree", "tucker2", "tucker2-datafree"])
def test_regional_expansion_of_each_baseline_is_exact_at_full_rank(cfg: dict, base: str) -> None:
    torch.manual_seed(0)
    model, x = _make_conv(cfg)
    conv = model[0]
    info, cells, plans = _baseline_plans(conv, x)
    plan = RegionalExpansionPlan(info, plans[base], Tiling.uniform((2, 2), 2, 2), cells)
    assert plan.family == f"{base}-regional"
    new = plan.build(plan.full_ranks())
    with torch.no_grad():
        assert (new(x) - conv(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("base", ["svd", "svd-datafree", "tucker2", "tucker2-datafree"])
def test_regional_expansion_of_a_baseline_keeps_its_reduction_and_costs(base: str) -> None:
    """The base's own first factors at its own ranks, a least-squares 1×1 per region: the base's
    MACs, one C_out × R map more per extra region in parameters, and — for an SVD, whose features
    are exactly its basis' coordinates — calibration error at most the base's at every rank."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = _images(32, 12).repeat(1, 3, 1, 1)[:, :8]
    info, cells, plans = _baseline_plans(conv, x)
    one = plans[base]
    plan = RegionalExpansionPlan(info, one, Tiling.uniform((2, 2), 2, 2), cells)
    ranks_list = [[2], [5], [9]] if base.startswith("svd") else [[2, 4], [5, 4], [9, 6]]
    with torch.no_grad():
        target = conv(x)
        for ranks in ranks_list:
            new, ref = plan.build(ranks), one.build(ranks)
            assert len(new.expands) == 4 and new.reduce.out_channels == ranks[0]
            if base.startswith("svd"):
                torch.testing.assert_close(new.reduce.weight, ref.reduce.weight)
                err, err_ref = ((new(x) - target).norm().item(), (ref(x) - target).norm().item())
                assert err <= err_ref * (1 + 1e-5)
            else:
                torch.testing.assert_close(new.first.weight, ref.first.weight)
                torch.testing.assert_close(new.reduce.weight, ref.core.weight)
            assert plan.factorised_cost(ranks, "macs") == one.factorised_cost(ranks, "macs")
            assert plan.factorised_cost(ranks, "params") == one.factorised_cost(ranks, "params") + 3 * (ranks[0] * 12 + 12)
            assert plan.retained(ranks) == one.retained(ranks)
    with pytest.raises(ValueError, match="two regions"):
        RegionalExpansionPlan(info, one, Tiling.full((2, 2)), cells)


def test_regional_expansion_of_a_layer_that_is_not_svd_or_tucker2_is_a_clear_error() -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = _images(8, 12).repeat(1, 3, 1, 1)[:, :8]
    info, cells, plans = _baseline_plans(conv, x)
    base = plans["svd"]
    base.build = lambda ranks: nn.Conv2d(8, 12, 3, padding=1)  # e.g. a third-party plan's module
    plan = RegionalExpansionPlan(info, base, Tiling.uniform((2, 2), 2, 2), cells)
    with pytest.raises(TypeError, match="regional expansion of a Conv2d"):
        plan.build([4])


@torch.no_grad()
def _regional_clusters(conv: nn.Conv2d, x: torch.Tensor, clusters: list[list[int]]) -> RegionalClustersPlan:
    """The regional expansion of the one-region input-cluster form (svd blocks) on a 2×2 grid."""
    y = conv(x) - (conv.bias.view(1, -1, 1, 1) if conv.bias is not None else 0)  # statistics are pre-bias
    info = LayerInfo("conv", conv, tuple(x.shape[1:]), tuple(y.shape[1:]))
    tiling = Tiling.uniform((2, 2), 2, 2)
    ins = CellStats(conv.in_channels, (2, 2), info.out_hw, "input", torch.device("cpu"))
    ins.update(x, y)
    contributions = ClusterContributions(conv, tiling, [clusters] * 4, ins)
    if contributions.needs_pass:
        contributions.update(x, y)
    one = contributions.merged()
    W = info.weight64()
    factoriser = create("block_factoriser", "svd", BlockFactoriser)
    factors = [[factoriser.factorise(Block(W[:, idx], m, None, f"c{c}"))
                for c, (idx, m) in enumerate(zip(clusters, one.moments()[0]))]]
    base = HSCPlan(info, one.tiling, "input", [clusters], factors)
    return RegionalClustersPlan(info, base, tiling, contributions)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["groups"] == "1"][::2], ids=_id)
def test_regional_expansion_of_input_clusters_is_exact_at_full_rank(cfg: dict) -> None:
    torch.manual_seed(0)
    model, x = _make_conv(cfg)
    plan = _regional_clusters(model[0], x, [[0, 3], [1, 4, 5], [2]])
    new = plan.build(plan.full_ranks())
    assert type(new).__name__ == "RegionalExpansionConv2d" and new.base == "clusters"
    with torch.no_grad():
        assert (new(x) - model[0](x)).abs().max().item() <= 1e-4
    assert plan.predicted_error(plan.full_ranks()) == pytest.approx(0.0, abs=1e-9)


def test_regional_expansion_of_input_clusters_beats_one_region_at_equal_ranks() -> None:
    """The one-region input-cluster form's k×k convs, a least-squares 1×1 per region: its MACs, one
    C_out × K map more per extra region in parameters, predicted error at most the base's at every
    rank, and a measured calibration error that falls with the rank and stays below the base's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = _images(32, 12).repeat(1, 3, 1, 1)[:, :8]
    plan = _regional_clusters(conv, x, [[0, 2, 4, 6], [1, 3, 5, 7]])
    base = plan.base
    with torch.no_grad():
        target = conv(x)
        last = float("inf")
        for ranks in ([1, 1], [2, 1], [3, 3], [6, 4], [9, 9]):
            new, ref = plan.build(ranks), base.build(ranks)
            for w, c in zip(new.first.cores(), range(2)):  # the base's reduction, cluster by cluster
                torch.testing.assert_close(w, ref.blocks[0].factors()[c]["core"])
            err, err_ref = (new(x) - target).norm().item(), (ref(x) - target).norm().item()
            assert err <= err_ref * (1 + 1e-5) and err <= last + 1e-6
            last = err
            assert plan.predicted_error(ranks) <= base.predicted_error(ranks) + 1e-12
            assert plan.factorised_cost(ranks, "macs") == base.factorised_cost(ranks, "macs")
            assert plan.factorised_cost(ranks, "params") == base.factorised_cost(ranks, "params") + 3 * (
                sum(ranks) * 12 + 12)
    with torch.no_grad():  # no features: the bias
        torch.testing.assert_close(plan.build([0, 0])(x), conv.bias.view(1, -1, 1, 1).expand_as(target))
    with pytest.raises(ValueError, match="two regions"):
        RegionalClustersPlan(plan.info, plan.base, Tiling.full((2, 2)), None)  # type: ignore[arg-type]
    two = HSCPlan(plan.info, Tiling.uniform((2, 2), 2, 2), "input", [base.clusters[0]] * 4, base.factors * 4)
    with pytest.raises(ValueError, match="one-region"):
        RegionalClustersPlan(plan.info, two, plan.tiling, None)  # type: ignore[arg-type]


def test_hsc_offers_the_regional_expansion_of_its_input_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget and input clusters, every spatial conv with two or more whole-map clusters is
    also offered as their reduction with a 1×1 per region, and the allocation can take it."""
    made: list[RegionalClustersPlan] = []
    init = RegionalClustersPlan.__init__

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(RegionalClustersPlan, "__init__", spy)
    model, x = _spatial_cnn(), _images(16, 16)
    res = compress(model, "hsc", calib=x, budget=3.0, grid=(2, 2), min_region=2, n_clusters=2, progress=False,
                   **NO_RECOVERY)
    assert {p.info.name for p in made} == {"0", "2", "4"}
    assert all(p.form == "4 regions, regional 1x1 on 2 input clusters" for p in made)
    assert res.report.macs_before / res.report.macs_after == pytest.approx(3.0, rel=Budget(3.0).tolerance)


@pytest.mark.parametrize("budget", [Budget(3.0), Budget(2.5, metric="params")], ids=["macs", "params"])
def test_the_baselines_allocations_are_also_tried_with_regional_1x1s(budget: Budget) -> None:
    """Under MAC and parameter budgets each baseline's allocation is also tried with a 1×1 per region
    (within the budget, parameters included); ``regional_baselines=False`` and latency budgets do not."""
    model, x = _spatial_cnn(), _images(16, 24)
    res = compress(model, "hsc", calib=x, budget=budget, progress=False)
    regional = {k for k in res.report.candidates if k.endswith("regional 1x1s)")}
    assert regional == {f"{b} ({k}, regional 1x1s)" for b in ("global_svd", "tucker2") for k in ("data-aware", "data-free")}
    assert res.report.budget_met
    assert res.report.calibration_error == min(res.report.candidates.values())
    off = compress(model, "hsc", calib=x, budget=budget, progress=False, regional_baselines=False)
    assert not any(k.endswith("regional 1x1s)") for k in off.report.candidates)
    assert res.report.calibration_error <= off.report.calibration_error * (1 + 1e-4) + 1e-7
    lat = compress(model, "hsc", calib=x, budget=Budget(1.3, metric="latency"), cost_model=FakeDevice(), progress=False)
    assert not any(k.endswith("regional 1x1s)") for k in lat.report.candidates)


@pytest.mark.parametrize("budget", [Budget(3.0), Budget(2.5, metric="params"), Budget(1.3, metric="latency")],
                         ids=["macs", "params", "latency"])
@pytest.mark.parametrize("model_fn", [_spatial_cnn, lambda: SmallCNN().eval()], ids=["spatial", "small_cnn"])
def test_hsc_calibration_error_is_at_most_each_baseline_s(budget: Budget, model_fn) -> None:
    torch.manual_seed(0)
    model, x = model_fn(), _images(16, 24)
    opts = {"calib": x, "budget": budget, "progress": False}
    if budget.metric == "latency":
        opts["cost_model"] = FakeDevice()
    hsc = compress(model, "hsc", **opts)
    assert hsc.report.budget_met and hsc.report.calibration_error is not None
    for method in ("global_svd", "tucker2"):
        if budget.metric == "latency":
            opts["cost_model"] = FakeDevice()
        base = compress(model, method, data_aware=True, **opts)
        assert hsc.report.calibration_error <= base.report.calibration_error * (1 + 1e-4) + 1e-7, (
            method, hsc.report.candidates, base.report.calibration_error)
    assert set(hsc.report.candidates) >= {"hsc", "global_svd (data-aware)", "tucker2 (data-aware)"}
    assert hsc.report.calibration_error == min(hsc.report.candidates.values())


@pytest.mark.parametrize("method,options", [("hsc", {}), ("global_svd", {"data_aware": True}),
                                            ("tucker2", {"data_aware": True}), ("hsc", {"channel_side": "output"})])
def test_recovery_never_increases_calibration_error(method: str, options: dict) -> None:
    model = SmallCNN().eval()
    torch.manual_seed(1)
    x = _images(16, 24)
    res = compress(model, method, calib=x, budget=Budget(4.0), bias_correction=True, progress=False, **options)
    rec = res.report.recovery
    assert rec is not None and rec["steps"]
    assert rec["error_after"] <= rec["error_before"] + 1e-12
    for step in rec["steps"]:
        if step["applied"]:
            assert step["error_after"] <= step["error_before"]


def test_forms_compete_under_a_mac_budget_and_the_report_names_them() -> None:
    model, x = _spatial_cnn(), _images(16, 24)
    res = compress(model, "hsc", calib=x, budget=Budget(3.0), progress=False, baselines=())
    forms = [L.details.get("form") for L in res.report.layers if L.status == "factorised"]
    assert forms and all(forms)
    table = res.report.table()
    assert all(f[:24] in table for f in forms)
    fixed = compress(model, "hsc", calib=x, budget=Budget(3.0), progress=False, alternatives=False)
    assert all(L.details.get("form", "").startswith("4 regions") for L in fixed.report.layers
               if L.status == "factorised")


def test_one_compressor_object_is_reentrant() -> None:
    """Two compressions with different budgets through one object give what two fresh objects give."""
    model, x = _spatial_cnn(), _images(12, 16)
    shared = create_compressor("hsc", progress=False)
    a1 = shared.compress(model, x, budget=Budget(3.0))
    b1 = shared.compress(model, x, budget=Budget(2.0, metric="params"))
    a2 = create_compressor("hsc", progress=False).compress(model, x, budget=Budget(3.0))
    b2 = create_compressor("hsc", progress=False).compress(model, x, budget=Budget(2.0, metric="params"))
    for r1, r2 in ((a1, a2), (b1, b2)):
        s1, s2 = r1.model.state_dict(), r2.model.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
        assert without_wall_times(r1.report.to_dict()) == without_wall_times(r2.report.to_dict())
