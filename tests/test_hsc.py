"""HSC: the three levels, the execution module, and the HSC acceptance criteria."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress
from hsc_plugin.compressors.hsc import CellStats, balance_clusters
from hsc_plugin.registry import create
from hsc_plugin.spatial import SpatioChannelConv2d, Tiling
from hsc_plugin.strategy import ChannelClusterer, SpatialPartitioner

from conftest import SmallCNN, mri_root


def _cnn(in_chans: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).eval()


def test_one_region_one_cluster_equals_data_aware_svd() -> None:
    """Same optimum: per-layer calibration errors (measured and predicted) agree."""
    model, x = _cnn(), torch.randn(16, 3, 24, 24)
    svd = compress(model, "global_svd", calib=x, data_aware=True, rank="fixed", rank_ratio=0.4,
                   dense_fallback=False)
    hsc = compress(model, "hsc", calib=x, partition="none", clusterer="single", channel_side="output",
                   rank="fixed", rank_ratio=0.4, dense_fallback=False)
    for a, b in zip(svd.report.layers, hsc.report.layers):
        assert a.name == b.name
        assert list(a.ranks.values()) == list(b.ranks.values())
        assert a.error == pytest.approx(b.error, rel=1e-5, abs=1e-7)
        assert a.predicted_error == pytest.approx(b.predicted_error, rel=1e-6, abs=1e-9)
    with torch.no_grad():
        assert torch.allclose(svd.model(x), hsc.model(x), atol=1e-5)


def test_predicted_error_is_the_calibration_error_output_side() -> None:
    """Discarded eigenvalues are exactly the calibration error of each (region, cluster) block."""
    model, x = _cnn(), torch.randn(16, 3, 24, 24)
    res = compress(model, "hsc", calib=x, grid=(2, 2), n_clusters=3, channel_side="output", min_region=2,
                   rank="fixed", rank_ratio=0.3, dense_fallback=False, targets=["2"])
    layer = res.report.layers[0]
    assert layer.details["tiling"]["regions"] and len(layer.details["regions"]) == 4
    assert layer.error == pytest.approx(layer.predicted_error, rel=1e-4)


@pytest.mark.parametrize("side", ["input", "output"])
def test_runs_at_other_input_sizes(side: str) -> None:
    model, x = _cnn(), torch.randn(8, 3, 32, 32)
    res = compress(model, "hsc", calib=x, grid=(2, 2), channel_side=side, rank="energy", energy=1.0,
                   dense_fallback=False)
    assert any(isinstance(m, SpatioChannelConv2d) and len(m.blocks) == 4 for m in res.model.modules())
    for shape in [(2, 3, 48, 40), (1, 3, 20, 28)]:
        z = torch.randn(*shape)
        with torch.no_grad():
            assert torch.allclose(res.model(z), model(z), atol=1e-4)


@pytest.mark.parametrize("ratio", [3.0, 6.0])
@pytest.mark.parametrize("side", ["input", "output"])
def test_mri_alexnet_budgets(ratio: float, side: str) -> None:
    from hsc_plugin.mri import alexnet_mri, load_split

    data = load_split(mri_root(), "train", 64, max_per_class=8)
    model = alexnet_mri(width=0.25, input_size=64).eval()
    res = compress(model, "hsc", calib=data.tensors[0], budget=Budget(ratio), channel_side=side)
    assert res.report.budget_met and abs(res.report.achieved_ratio / ratio - 1) <= 0.02
    assert res.model(data.tensors[0][:2]).shape == (2, 4)


@pytest.mark.parametrize("ratio", [3.0, 6.0])
def test_resnet18_budgets(ratio: float) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(4, 3, 64, 64)
    res = compress(model, "hsc", calib=x, budget=Budget(ratio))
    assert res.report.budget_met and abs(res.report.achieved_ratio / ratio - 1) <= 0.02
    with torch.no_grad():
        assert res.model(x).shape == (4, 1000)


def test_resnet18_full_rank_is_exact() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    res = compress(model, "hsc", calib=x, rank="energy", energy=1.0, dense_fallback=False)
    with torch.no_grad():
        assert (res.model(x) - model(x)).abs().max().item() <= 1e-4


def test_zero_rank_region_outputs_the_bias() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mod = SpatioChannelConv2d(4, 6, {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1),
                                     "dilation": (1, 1), "padding_mode": "zeros"},
                              Tiling.uniform((2, 2), 2, 2), "output", [[list(range(6))]] * 4,
                              [[0], [2], [0], [6]])
    mod.blocks[0].const_bias.copy_(conv.bias.detach())
    y = mod(torch.randn(1, 4, 8, 8))
    assert torch.allclose(y[0, :, :4, :4], conv.bias.detach().view(6, 1, 1).expand(6, 4, 4))


def test_trains_and_exports() -> None:
    model, x = _cnn(), torch.randn(8, 3, 32, 32)
    res = compress(model, "hsc", calib=x, budget=Budget(2.0), grid=(2, 2))
    m = res.model.train()
    out = m(x)
    out.sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        scripted = torch.jit.script(m)
        assert torch.allclose(scripted(x), ref, atol=1e-5)
        exported = torch.export.export(m, (x,))
        assert torch.allclose(exported.module()(x), ref, atol=1e-5)


def test_same_seed_same_result() -> None:
    model, x = _cnn(), torch.randn(8, 3, 32, 32)
    runs = [compress(model, "hsc", calib=x, budget=Budget(3.0), clusterer="kmeans", seed=3) for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].report.to_dict()["layers"] == runs[1].report.to_dict()["layers"]


@pytest.mark.parametrize("name", ["agglomerative", "spectral", "kmeans"])
def test_clusterers_recover_blocks(name: str) -> None:
    """Three groups of perfectly co-activating channels are found (fixed k and automatic k)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 5)
    A = np.where(labels[:, None] == labels[None, :], 0.95, 0.05) + rng.uniform(0, 0.02, (15, 15))
    A = (A + A.T) / 2
    np.fill_diagonal(A, 1.0)
    for k in (3, None):
        found = create("clusterer", name, ChannelClusterer, n_clusters=k, seed=0).cluster(A)
        assert len(found) == 15
        pairs = labels[:, None] == labels[None, :]
        assert np.array_equal(found[:, None] == found[None, :], pairs)


def test_balanced_clusters_run_as_grouped_conv() -> None:
    A = np.eye(8)
    out = balance_clusters([[0, 1, 2, 3, 4, 5], [6], [7]], A)
    assert sorted(len(c) for c in out) == [2, 3, 3] and sorted(sum(out, [])) == list(range(8))
    model, x = _cnn(), torch.randn(8, 3, 32, 32)
    res = compress(model, "hsc", calib=x, budget=Budget(3.0), partition="none", balanced=True, n_clusters=4,
                   alternatives=False)  # exactly this form: forms would otherwise compete
    grouped = [m for m in res.model.modules() if isinstance(m, nn.Conv2d) and m.groups == 4]
    assert grouped, "balanced input clusters should execute as one grouped conv"
    assert res.report.budget_met


def _cell_stats(energy: np.ndarray) -> CellStats:
    gh, gw = energy.shape
    cs = CellStats(3, (gh, gw), (4 * gh, 4 * gw), "output", torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    for i in range(gh):
        for j in range(gw):
            B = torch.randn(3, 3, generator=rng, dtype=torch.float64)
            cs.S[i, j] = float(energy[i, j]) * (B @ B.T)
    return cs


def test_partitioners() -> None:
    grid = create("partitioner", "grid", SpatialPartitioner, grid=(2, 2))
    t = grid.partition(_cell_stats(np.ones((8, 8))))
    assert t.n_regions == 4 and sorted(t.regions) == [(0, 4, 0, 4), (0, 4, 4, 8), (4, 8, 0, 4), (4, 8, 4, 8)]
    small = CellStats(3, (2, 2), (4, 4), "output", torch.device("cpu"))
    assert grid.partition(small).n_regions == 1  # maps smaller than 2 × min_region get no regions
    quad = create("partitioner", "quadtree", SpatialPartitioner, max_depth=2)
    # Each quadrant has its own rank-1 direction: one region needs rank 4, quadrants rank 1 each.
    quads = CellStats(4, (8, 8), (32, 32), "output", torch.device("cpu"))
    for i in range(8):
        for j in range(8):
            v = torch.eye(4, dtype=torch.float64)[2 * (i >= 4) + (j >= 4)]
            quads.S[i, j] = torch.outer(v, v)
    t = quad.partition(quads)
    assert t.n_regions == 4 and sorted(t.regions) == [(0, 4, 0, 4), (0, 4, 4, 8), (4, 8, 0, 4), (4, 8, 4, 8)]
    # Identical statistics everywhere: splitting cannot help, one region.
    same = _cell_stats(np.ones((8, 8)))
    same.S[:] = same.S[0, 0]
    assert quad.partition(same).n_regions == 1
    with pytest.raises(ValueError, match="Did you mean"):
        create("partitioner", "gird", SpatialPartitioner)


@pytest.mark.parametrize("side", ["input", "output"])
def test_save_load_round_trip(tmp_path, side: str) -> None:
    from hsc_plugin import load, save

    model, x = _cnn(), torch.randn(8, 3, 32, 32)
    res = compress(model, "hsc", calib=x, budget=Budget(3.0), grid=(2, 2), channel_side=side,
                   alternatives=False)  # HSC's region modules (the stem then stays dense)
    save(res, tmp_path / "m")
    loaded = load(tmp_path / "m", _cnn())
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model(x))
    with pytest.raises(ValueError, match="no layer"):
        load(tmp_path / "m", nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize("side", ["input", "output"])
def test_fixed_grid_needs_only_its_own_cells(side: str) -> None:
    """A 2×2 grid gathers statistics on 2×2 cells and a depth-2 quadtree on 4×4 (16× and 4× less
    memory than an 8×8 grid), and each gives the same compressed layers as the 8×8 grid."""
    from hsc_plugin.compressors.hsc import HSC
    from hsc_plugin.calibration import trace_layers

    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 32, 32)
    info = trace_layers(model, ["body.8"], x[:1])["body.8"]
    assert HSC(grid=(2, 2))._grid(info) == (2, 2)
    assert HSC(partition="none")._grid(info) == (1, 1)
    assert HSC(partition="quadtree")._grid(info) == (4, 4)  # halving twice needs no finer cells
    from hsc_plugin.strategies.partition import QuadtreePartitioner

    assert HSC(partition=QuadtreePartitioner(max_depth=3))._grid(info) == (8, 8)
    for opts in ({"grid": (2, 2)}, {"partition": "quadtree", "min_gain": 0.0}):
        opts = dict(opts)
        if "min_gain" in opts:  # split wherever allowed, so the tiling is not trivial
            opts["partition"] = QuadtreePartitioner(min_gain=opts.pop("min_gain"))
        opts["alternatives"] = False  # the partitioner's regions (what the statistics grid feeds)
        coarse = compress(model, "hsc", calib=x, budget=Budget(3.0), channel_side=side, progress=False, **opts)
        fine = compress(model, "hsc", calib=x, budget=Budget(3.0), channel_side=side, cells=8, progress=False,
                        **opts)
        assert [L.ranks for L in coarse.report.layers] == [L.ranks for L in fine.report.layers]
        tilings = [L.details.get("tiling", {}).get("regions") for L in coarse.report.layers]
        assert any(t and len(t) > 1 for t in tilings)
        with torch.no_grad():
            torch.testing.assert_close(coarse.model(x), fine.model(x), rtol=1e-4, atol=1e-5)


def test_blocks_can_be_dropped_under_a_tight_budget() -> None:
    """HSC blocks start at rank 0 (bias only), so budgets far below one rank per block are
    reachable; the shared pipeline must not raise them to rank 1 (it did, via rank_multiple)."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 32, 32)
    res = compress(model, "hsc", calib=x, budget=Budget(25.0, scope="targets"), progress=False,
                   alternatives=False)  # HSC's own blocks (a baseline's allocation could win otherwise)
    assert abs(res.report.achieved_ratio / 25.0 - 1) <= 0.02
    assert any(v == 0 for L in res.report.layers for v in L.ranks.values())
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()
