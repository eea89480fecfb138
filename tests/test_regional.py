"""RegionalExpansionConv2d: exact at full rank on the conv grid, per-region 1×1s act per region,
the MACs of its base form, a JSON spec round trip, and gradients through the crops — on SVD's,
Tucker-2's and the input clusters' reductions."""

from __future__ import annotations

import pytest
import torch
from _factories import quadtree_tiling, regional_from_conv
from test_conv_grid import CONFIGS, _id
from torch import nn

from hsc_plugin import measure_costs
from hsc_plugin.modules import (LowRankConv2d, RegionalExpansionConv2d, SpatioChannelConv2d, Tucker2Conv2d,
                                conv_geometry)
from hsc_plugin.tiling import Tiling, output_box

TILINGS = {
    "1": Tiling.full(),
    "2x2": Tiling.uniform((2, 2), 2, 2),
    "3x1": Tiling.uniform((3, 1), 3, 1),
    "quadtree": quadtree_tiling(),
}
GRID = [c for c in CONFIGS if c["groups"] == "1"]  # the module factorises ungrouped convs


def _conv(c: dict) -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(6, 8, c["kernel"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                     bias=c["bias"], padding_mode=c["padding_mode"])
    return conv, torch.randn(3, 6, 13, 12)


# Input clusters for base="clusters": unequal (separate convs) and equal (one grouped conv).
CLUSTERS = {"clusters": [[4, 0], [1, 3, 5], [2]], "clusters-balanced": [[0, 3, 4], [5, 1, 2]]}


@torch.no_grad()
def _full_rank(conv: nn.Conv2d, tiling: Tiling, base: str) -> RegionalExpansionConv2d:
    """rank = C_out, reduce = W, every expand = identity + the conv's bias (tucker2: first = identity;
    clusters: each cluster's conv is W's columns, each region's 1×1 sums the clusters' outputs)."""
    co, ci = conv.out_channels, conv.in_channels
    clusters = CLUSTERS.get(base)
    kw = {"clusters": clusters, "ranks": [co] * len(clusters)} if clusters else {}
    m = RegionalExpansionConv2d(ci, co, conv_geometry(conv), tiling, co * len(clusters or [0]),
                                base="clusters" if clusters else base, rank_in=ci if base == "tucker2" else None,
                                bias=conv.bias is not None, **kw)
    if base == "tucker2":
        m.first.weight.copy_(torch.eye(ci)[:, :, None, None])
    if clusters:
        for w, c in zip(m.first.cores(), clusters):
            w.copy_(conv.weight[:, c])
    else:
        m.reduce.weight.copy_(conv.weight)
    for e in m.expands:
        e.weight.copy_(torch.eye(co).repeat(1, len(clusters or [0]))[:, :, None, None])
        if conv.bias is not None:
            e.bias.copy_(conv.bias)
    return m


@pytest.mark.parametrize("base", ["svd", "tucker2", "clusters", "clusters-balanced"])
@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("cfg", GRID, ids=_id)
def test_full_rank_is_exact(cfg: dict, tiling: str, base: str) -> None:
    torch.manual_seed(0)
    conv, x = _conv(cfg)
    m = _full_rank(conv, TILINGS[tiling], base)
    with torch.no_grad():
        ref = conv(x)
        out = m(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tiling", ["2x2", "3x1", "quadtree"])
def test_each_region_uses_its_own_expand(tiling: str) -> None:
    """A different bias per region shows up exactly on that region's pixels (and only there)."""
    torch.manual_seed(0)
    t = TILINGS[tiling]
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    m = _full_rank(conv, t, "svd")
    x = torch.randn(2, 5, 23, 18)
    with torch.no_grad():
        for i, e in enumerate(m.expands):
            e.bias.add_(10.0 * (i + 1))
        ref = conv(x)
        out = m(x)
    h, w = ref.shape[2:]
    covered = torch.zeros(h, w, dtype=torch.int)
    for i, region in enumerate(t.regions):
        o0, o1, q0, q1 = output_box(list(region), h, w, list(t.grid))
        assert o1 > o0 and q1 > q0
        diff = out[:, :, o0:o1, q0:q1] - ref[:, :, o0:o1, q0:q1]
        torch.testing.assert_close(diff, torch.full_like(diff, 10.0 * (i + 1)), rtol=0, atol=1e-4)
        covered[o0:o1, q0:q1] += 1
    assert bool((covered == 1).all())  # the regions tile the map


def test_region_empty_at_a_small_input_size() -> None:
    """A 4×4-cell tiling on a 3×3 map has empty regions: they are skipped, the map is still exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    m = _full_rank(conv, quadtree_tiling(), "svd")
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        assert (m(x) - conv(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("base", ["svd", "tucker2"])
@pytest.mark.parametrize("tiling", list(TILINGS))
def test_macs_equal_the_base_form(tiling: str, base: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(1, 16, 20, 20)
    geo = conv_geometry(conv)
    if base == "svd":
        ref = LowRankConv2d(16, 24, 5, geo)
        m = RegionalExpansionConv2d(16, 24, geo, TILINGS[tiling], 5)
    else:
        ref = Tucker2Conv2d(16, 24, 4, 5, geo)
        m = RegionalExpansionConv2d(16, 24, geo, TILINGS[tiling], 5, base="tucker2", rank_in=4)
    macs = measure_costs(nn.Sequential(m), x).macs
    assert macs == measure_costs(nn.Sequential(ref), x).macs > 0
    n = TILINGS[tiling].n_regions
    params = sum(p.numel() for p in m.parameters())
    assert params == sum(p.numel() for p in ref.parameters()) + (n - 1) * (24 * 5 + 24)


@pytest.mark.parametrize("tiling", ["2x2", "quadtree"])
@pytest.mark.parametrize("clusters,ranks", [([[0, 5, 9], [1, 2, 3, 4], [6, 7, 8, 10, 11]], [3, 2, 4]),
                                            ([[0, 2, 4, 6], [1, 3, 5, 7]], [3, 3])])
def test_clusters_macs_equal_the_one_region_cluster_form(tiling: str, clusters: list, ranks: list) -> None:
    """On input clusters: the MACs of HSC's one-region input-cluster module at the same ranks, and
    one C_out × K map (and bias) per extra region in parameters; equal clusters run grouped."""
    conv = nn.Conv2d(12, 24, 3, padding=1)
    x = torch.randn(1, 12, 20, 20)
    geo = conv_geometry(conv)
    ref = SpatioChannelConv2d(12, 24, geo, Tiling.full(), "input", [clusters], [ranks])
    m = RegionalExpansionConv2d(12, 24, geo, TILINGS[tiling], sum(ranks), base="clusters", clusters=clusters,
                                ranks=ranks)
    assert m.first.grouped == (len({len(c) for c in clusters}) == 1 and len(set(ranks)) == 1)
    macs = measure_costs(nn.Sequential(m), x).macs
    assert macs == measure_costs(nn.Sequential(ref), x).macs > 0
    n = TILINGS[tiling].n_regions
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters()) + (n - 1) * (
        24 * sum(ranks) + 24)


@pytest.mark.parametrize("clusters", list(CLUSTERS))
def test_clusters_spec_round_trip(clusters: str) -> None:
    import json

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect", bias=False)
    m = _full_rank(conv, quadtree_tiling(), clusters).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    spec = json.loads(json.dumps(m.spec()))
    assert spec["base"] == "clusters" and spec["clusters"] == CLUSTERS[clusters]
    twin = RegionalExpansionConv2d.from_spec(spec)
    twin.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 6, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), m(x), rtol=0, atol=0)
    assert m.rank_layers() == list(m.first.convs)
    assert m.first.out_channels == spec["rank"] == 8 * len(CLUSTERS[clusters])


@pytest.mark.parametrize("base", ["svd", "tucker2"])
def test_spec_round_trip_and_rank_layers(base: str) -> None:
    import json

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect", bias=False)
    m = regional_from_conv(conv, quadtree_tiling(), 4, base=base, rank_in=3, jitter=0.1).eval()
    spec = json.loads(json.dumps(m.spec()))  # what save() writes
    assert spec["type"] == "RegionalExpansionConv2d" and spec["base"] == base
    twin = RegionalExpansionConv2d.from_spec(spec)
    twin.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 6, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), m(x), rtol=0, atol=0)
    assert m.to_dense() is None
    want = [m.first, m.reduce] if base == "tucker2" else [m.reduce]
    assert m.rank_layers() == want
    assert set(m.state_dict()) == ({"first.weight"} if base == "tucker2" else set()) | {"reduce.weight"} | {
        f"expands.{i}.weight" for i in range(7)}


def test_bad_arguments_are_clear_errors() -> None:
    geo = conv_geometry(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="base"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 2, base="cp")
    with pytest.raises(ValueError, match="rank_in"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 2, base="tucker2")
    with pytest.raises(ValueError, match="rank"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 0)
    with pytest.raises(ValueError, match="clusters and their ranks"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 3, base="clusters", clusters=[[0, 1], [2, 3]], ranks=[1, 1])
    with pytest.raises(ValueError, match="disjoint"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 2, base="clusters", clusters=[[0, 1], [1, 3]], ranks=[1, 1])
    with pytest.raises(ValueError, match="disjoint"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 2, base="clusters", clusters=[[0, 1], [4]], ranks=[1, 1])
    with pytest.raises(ValueError, match=">= 1"):
        RegionalExpansionConv2d(4, 4, geo, Tiling.full(), 2, base="clusters", clusters=[[0, 1], [2]], ranks=[2, 0])


def test_gradients_reach_every_factor() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    m = regional_from_conv(conv, TILINGS["2x2"], 3, base="tucker2", rank_in=2).train()
    m(torch.randn(2, 4, 10, 10)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_nni_speedup_cannot_handle_it_and_says_so() -> None:
    """What ``speedup_incompatible`` claims, tried: NNI's ModelSpeedup fails inside on the crops, so
    the adapter refuses such a model up front with an error naming the module."""
    pytest.importorskip("nni", reason="nni is an extra")
    from nni.compression.pruning import L1NormPruner
    from nni.compression.speedup import ModelSpeedup

    from hsc_plugin.adapters.nni import SpeedupIncompatibleError, check_speedup_compatible

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    model[2] = regional_from_conv(model[2], TILINGS["2x2"], 4)
    with pytest.raises(SpeedupIncompatibleError, match=r"'2' \(RegionalExpansionConv2d\)"):
        check_speedup_compatible(model)
    pruner = L1NormPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.25}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TypeError, match="slice indices must be integers"):
        ModelSpeedup(model, x, masks, graph_module=torch.fx.symbolic_trace(model)).speedup_model()
