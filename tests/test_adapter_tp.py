"""torch-pruning adapter: tp prunes our compressed models, LowRankPruner, MAC agreement, the example."""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning", reason="torch-pruning not installed (extra [tp])")
timm = pytest.importorskip("timm", reason="timm not installed (extra [timm])")

from conftest import REPO, SmallCNN, assert_unchanged, mri_root, snapshot  # noqa: E402
from hsc_plugin import BudgetError, compress, measure_costs  # noqa: E402
from hsc_plugin.adapters.torch_pruning import (  # noqa: E402
    LowRankPruner,
    SpatioChannelPruner,
    compare_macs,
    prune_channels,
    rank_layers,
    tp_kwargs,
)
from _factories import FORMS, factorise_convs, quadtree_tiling  # noqa: E402
from hsc_plugin.modules import (  # noqa: E402
    FactorisedModule,
    LowRankConv2d,
    LowRankLinear,
    RegionalExpansionConv2d,
    SpatioChannelConv2d,
    Tucker2Conv2d,
)
from hsc_plugin.tiling import Tiling  # noqa: E402

# every method, and HSC on both channel sides (the stem is an input-side HSC module by default)
VARIANTS = {"global_svd": ("global_svd", {}), "tucker2": ("tucker2", {}),
            "hsc": ("hsc", {"grid": 2, "channel_side": "input"}),
            "hsc_output": ("hsc", {"grid": 2, "channel_side": "output"})}


def _mri_images(n: int = 64, size: int = 64) -> torch.Tensor:
    """Real (structured) calibration images, grey repeated to 3 channels, as a user of timm does."""
    from hsc_plugin.mri import load_split

    ds = load_split(mri_root(), "train", size=size, max_per_class=n // 4)
    return ds.tensors[0][:n].repeat(1, 3, 1, 1)


X = _mri_images()


@pytest.fixture(scope="module")
def compressed() -> dict[str, nn.Module]:
    """A timm resnet18 (4 classes) compressed 2x by each variant, every layer (the stem included)."""
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    out = {}
    for name, (method, opts) in VARIANTS.items():
        model = compress(base, method, calib=X, budget="2x", progress=False, measure_error=False, **opts).model
        assert not isinstance(model.conv1, nn.Conv2d), f"{name}: the stem must be compressed"
        assert not isinstance(model.layer4[1].conv2, nn.Conv2d), f"{name}: layer4 must be compressed"
        out[name] = model
    return out


def _ranks(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorisedModule):
            s = m.spec()
            out[name] = {k: v for k, v in s.items() if k.startswith(("rank", "region_ranks"))}
    return out


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, (SpatioChannelConv2d, RegionalExpansionConv2d)):
        return m.out_channels
    return [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1].out_channels


def _subsequence(short: list[int], long: list[int]) -> bool:
    it = iter(long)
    return all(any(v == w for w in it) for v in short)


def _tp_prune(model: nn.Module, **kw_opts) -> None:
    kw = tp_kwargs(model, **kw_opts)
    kw["ignored_layers"].append(model.fc)
    tp.pruner.MetaPruner(model, X[:1], importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.3, **kw).step()


def _round_trip(module: nn.Module) -> nn.Module:
    """What save/load does per replaced layer: rebuild from spec(), load the weights strictly."""
    twin = type(module).from_spec(module.spec())
    twin.load_state_dict(module.state_dict(), strict=True)
    return twin.eval()


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """The same resnet18 with every conv in a form no compressor makes yet (built from its weights)."""
    torch.manual_seed(0)
    base = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    return {form: factorise_convs(base, form) for form in FORMS}


@pytest.mark.parametrize("method", list(VARIANTS))
def test_tp_prunes_compressed_resnet18_keeping_ranks(compressed, method):
    _check_tp_prunes_keeping_ranks(copy.deepcopy(compressed[method]), method)


@pytest.mark.parametrize("form", FORMS)
def test_tp_prunes_new_forms_keeping_ranks(built, form):
    model = copy.deepcopy(built[form])
    _check_tp_prunes_keeping_ranks(model, form)
    c = compare_macs(model, X[:2])  # tp counts the pruned forms' convs as we do
    assert c.agree and c.params == c.tp_params, c


def _check_tp_prunes_keeping_ranks(model: nn.Module, method: str) -> None:
    ranks = _ranks(model)
    io = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules()
          if isinstance(m, (SpatioChannelConv2d, RegionalExpansionConv2d))}
    assert ranks, "the compressed model has factorised layers"
    bn_before = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    _tp_prune(model)
    bn_after = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert 0.6 * bn_before < bn_after < 0.8 * bn_before  # ~30% of the channels are gone
    after = _ranks(model)
    for name, r in ranks.items():  # ignored rank layers: no rank shrank
        if "region_ranks" in r:  # HSC: a cluster whose channels were all pruned goes, with its rank
            for key in {"region_ranks", "region_ranks_in"} & set(r):
                assert all(_subsequence(a, b) for a, b in zip(after[name][key], r[key]))
        else:
            assert after[name] == r
    stem = model.conv1  # issue 14: tp pruned bn1 but not the factorised stem's outputs
    assert _out_channels(stem) == model.bn1.num_features < 64
    y = model(X)
    assert y.shape == (len(X), 4) and torch.isfinite(y).all()
    for m in model.modules():  # every replaced layer still rebuilds from its spec
        if isinstance(m, FactorisedModule):
            x = torch.randn(1, m.spec().get("in_channels", 0) or m.spec()["in_features"], 8, 8)
            if "in_features" in m.spec():
                x = x[:, :, 0, 0]
            torch.testing.assert_close(_round_trip(m)(x), m.eval()(x))
    if method.startswith(("hsc", "regional")):
        kind = SpatioChannelConv2d if method.startswith("hsc") else RegionalExpansionConv2d
        mods = [m for m in model.modules() if isinstance(m, kind)]
        assert mods and any(m.tiling.n_regions > 1 for m in mods)
        now = {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, kind)}
        # their own channels were pruned too, both sides (HSC's models mix both kinds of regional module)
        assert any(now[n][0] < io[n][0] for n in now)
        assert any(now[n][1] < io[n][1] for n in now)


def test_prune_ranks_true_shrinks_ranks(compressed):
    model = copy.deepcopy(compressed["global_svd"])
    before = _ranks(model)
    assert tp_kwargs(model, prune_ranks=True)["ignored_layers"] == []
    assert len(tp_kwargs(model)["ignored_layers"]) == len(rank_layers(model)) == len(before)
    _tp_prune(model, prune_ranks=True)
    after = _ranks(model)
    assert any(after[n]["rank"] < before[n]["rank"] for n in before)
    m = next(m for n, m in model.named_modules() if n in before and after[n]["rank"] < before[n]["rank"])
    x = torch.randn(1, m.reduce.in_channels, 8, 8)
    torch.testing.assert_close(_round_trip(m)(x), m.eval()(x))  # spec() follows the pruned rank
    assert torch.isfinite(model(X)).all()


def _random_hsc(side: str, tiling: Tiling, balanced: bool, bias: bool, gen: random.Random,
                block: str = "svd") -> SpatioChannelConv2d:
    cin, cout = 12, 10
    clusters, ranks, ranks_in = [], [], []
    for _ in range(tiling.n_regions):
        n = cin if side == "input" else cout
        perm = gen.sample(range(n), n)
        if balanced:
            clusters.append([sorted(perm[:n // 2]), sorted(perm[n // 2:])])
            ranks.append([3, 3])
            ranks_in.append([2, 3])
        else:
            clusters.append([sorted(perm[:3]), sorted(perm[3:7]), sorted(perm[7:])])
            ranks.append([2, 0, 3])  # a zero-rank cluster: its outputs are the bias
            ranks_in.append([2, 1, 3] if side == "input" else [4, 2, 5])
    geo = {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "padding_mode": "zeros"}
    m = SpatioChannelConv2d(cin, cout, geo, tiling, side, clusters, ranks, bias=bias, block=block,
                            region_ranks_in=ranks_in if block == "tucker2" else None)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        for b in m.blocks:
            b.dropped_bias.normal_()
    return m.eval()


CASES = [(side, regions, balanced, block) for side in ("input", "output") for regions in (1, 4)
         for balanced in ((False, True) if side == "input" else (False,)) for block in ("svd", "tucker2")]


@pytest.mark.parametrize("side,regions,balanced,block", CASES)
def test_hsc_pruning_equals_slicing_the_layer(side, regions, balanced, block):
    """Pruned HSC module == the original with the pruned inputs zeroed, restricted to kept outputs."""
    gen = random.Random(sum(map(ord, f"{side}{regions}{balanced}{block}")))  # str hash() varies per run
    tiling = Tiling.full() if regions == 1 else Tiling.uniform((2, 2), 2, 2)
    fn = SpatioChannelPruner()
    for trial in range(6):
        m = _random_hsc(side, tiling, balanced, bias=trial % 3 != 0, gen=gen, block=block)
        ranks = [b.ranks for b in m.blocks]
        ranks_in = [b.ranks_in for b in m.blocks]
        x = torch.randn(2, 12, 8, 8)
        n_in, n_out = (gen.randint(1, 11), gen.randint(1, 9)) if trial else (11, 9)
        drop_in = sorted(gen.sample(range(12), n_in))
        drop_out = sorted(gen.sample(range(10), n_out))
        keep_in = [i for i in range(12) if i not in drop_in]
        keep_out = [i for i in range(10) if i not in drop_out]
        xz = x.clone()
        xz[:, drop_in] = 0
        with torch.no_grad():
            ref = m(xz)[:, keep_out]
        fn(m, drop_in, to_output=False)
        fn(m, drop_out, to_output=True)
        assert (m.in_channels, m.out_channels) == (len(keep_in), len(keep_out))
        with torch.no_grad():
            y = m(x[:, keep_in])
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(_round_trip(m)(x[:, keep_in]), y)
        for b, r, q in zip(m.blocks, ranks, ranks_in):
            assert _subsequence(b.ranks, r)  # ranks are kept (only emptied clusters vanish)
            assert _subsequence(b.ranks_in, q) and b.block == block


@pytest.mark.parametrize("base", ["svd", "tucker2", "clusters"])
@pytest.mark.parametrize("tiling", ["1", "2x2", "quadtree"])
def test_regional_pruning_equals_slicing_the_layer(tiling, base):
    """Pruned regional module == the original with the pruned inputs zeroed, restricted to kept outputs."""
    gen = random.Random(sum(map(ord, tiling + base)))
    t = {"1": Tiling.full(), "2x2": Tiling.uniform((2, 2), 2, 2), "quadtree": quadtree_tiling()}[tiling]
    geo = {"kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "padding_mode": "reflect"}
    for trial in range(4):
        # clusters: unequal (separate convs) or equal (one grouped conv); pruning may empty one
        cl = [[0, 4, 8], [1, 5, 9, 10], [2, 3, 6, 7, 11]] if trial % 2 else [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
        rk = [2, 1, 2] if trial % 2 else [3, 3]
        extra = {"clusters": cl, "ranks": rk, "rank": sum(rk)} if base == "clusters" else {"rank": 5}
        m = RegionalExpansionConv2d(12, 10, geo, t, base=base, rank_in=4, bias=trial % 2 == 0, **extra)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        m.eval()
        x = torch.randn(2, 12, 16, 15)
        drop_in = sorted(gen.sample(range(12), gen.randint(1, 11)))
        drop_out = sorted(gen.sample(range(10), gen.randint(1, 9)))
        keep_in = [i for i in range(12) if i not in drop_in]
        keep_out = [i for i in range(10) if i not in drop_out]
        xz = x.clone()
        xz[:, drop_in] = 0
        with torch.no_grad():
            ref = m(xz)[:, keep_out]
        SpatioChannelPruner()(m, drop_in, to_output=False)
        SpatioChannelPruner()(m, drop_out, to_output=True)
        assert (m.in_channels, m.out_channels) == (len(keep_in), len(keep_out))
        if base == "clusters":  # a cluster emptied by the pruning goes with its rank
            assert m.spec()["ranks"] == [r for c, r in zip(cl, rk) if set(c) - set(drop_in)]
        else:
            assert (m.spec()["rank"], m.spec()["rank_in"]) == (5, 4 if base == "tucker2" else None)
        with torch.no_grad():
            y = m(x[:, keep_in])
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(_round_trip(m)(x[:, keep_in]), y)


def test_tp_kwargs_ask_the_types():
    """Every type that asks to be one layer gets the pruning function and is a root type; others are refused."""
    kw = tp_kwargs(nn.Sequential(nn.Conv2d(3, 3, 1)))
    one_op = {SpatioChannelConv2d, RegionalExpansionConv2d}
    assert set(kw["customized_pruners"]) == one_op and one_op <= set(kw["root_module_types"])
    geo = {"kernel_size": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "padding_mode": "zeros"}
    with pytest.raises(NotImplementedError, match="LowRankConv2d"):
        prune_channels(LowRankConv2d(4, 4, 2, geo), in_keep=[0, 1])


def test_hsc_pruning_keeps_ranks_when_clusters_survive():
    m = _random_hsc("output", Tiling.uniform((2, 2), 2, 2), False, True, random.Random(1))
    ranks = [b.ranks for b in m.blocks]
    SpatioChannelPruner()(m, [0], to_output=False)
    assert [b.ranks for b in m.blocks] == ranks
    with pytest.raises(ValueError):
        prune_channels(m, out_keep=[])


def test_low_rank_pruner_iterative_meets_budget_and_edits_in_place():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(8, 3, 32, 32)
    dense = measure_costs(model, x[:1]).macs
    pruner = LowRankPruner(model, x[:1], method="global_svd", macs_ratio=2.0, iterative_steps=3,
                           ignored_layers=[model.head], progress=False)
    assert pruner.per_step_ratio[-1] == pytest.approx(2.0)
    for i in (1, 2, 3):
        report = pruner.step()
        assert pruner.model is model and report is not None
        assert pruner.achieved_ratio() == pytest.approx(pruner.per_step_ratio[i], rel=0.02)
    assert dense / measure_costs(model, x[:1]).macs == pytest.approx(2.0, rel=0.02)
    assert all(type(m) in (nn.Linear, nn.Flatten, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Sequential)
               for m in model.head.modules())  # ignored layers stay dense
    assert any(isinstance(m, (LowRankConv2d, LowRankLinear, Tucker2Conv2d)) for m in model.modules())
    with pytest.warns(UserWarning):
        assert pruner.step() is None


def test_low_rank_pruner_failing_step_leaves_model_as_it_was():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(8, 3, 32, 32)
    snap = snapshot(model)
    with pytest.raises(BudgetError):
        LowRankPruner(model, x[:1], method="global_svd", macs_ratio=60.0, progress=False).step()
    assert_unchanged(model, snap)
    pruner = LowRankPruner(model, x[:1], method="global_svd", macs_ratio=60.0, iterative_steps=30,
                           progress=False)
    pruner.step()  # 1/30 of the way: reachable
    snap = snapshot(model)
    pruner.current_step = 29  # jump to the last, unreachable step
    with pytest.raises(BudgetError):
        pruner.step()
    assert_unchanged(model, snap)
    assert pruner.current_step == 29


def test_low_rank_pruner_hsc_steps():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 32, 32)
    pruner = LowRankPruner(model, x[:1], method="hsc", budget="2x", calib=x, iterative_steps=2,
                           ignored_layers=[model.head], progress=False, measure_error=False)
    pruner.step()
    pruner.step()
    assert pruner.achieved_ratio() == pytest.approx(2.0, rel=0.02)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("method", list(VARIANTS))
def test_mac_counts_agree_with_tp(compressed, method, small_cnn):
    x = torch.randn(2, 3, 32, 32)
    name, opts = VARIANTS[method]
    small = compress(small_cnn, name, calib=torch.randn(16, 3, 32, 32), budget="2x", progress=False,
                     measure_error=False, **opts).model
    pruned = copy.deepcopy(compressed[method])
    _tp_prune(pruned)
    for model, inp in ((small, x), (compressed[method], X[:2]), (pruned, X[:2])):
        c = compare_macs(model, inp)
        assert c.ours == measure_costs(model, inp[:1]).macs
        assert c.agree, c
        assert c.tp_total > c.ours  # tp also counts bias adds, BN, ReLU and pooling
        assert c.params == c.tp_params


def test_example_runs():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "tp_prune.py"), "--size", "32", "--steps", "3"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "+ tp 30% channels" in proc.stdout
