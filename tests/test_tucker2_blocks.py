"""Tucker-2 blocks inside the HSC layer (``block="tucker2"``): exact at full rank on the conv grid
for both channel sides, 1 and 2×2 regions, 1 and several clusters; the first 1×1 commutes with every
padding mode; a dropped cluster outputs its bias; specs round-trip and old specs still load."""

from __future__ import annotations

import json
import random

import pytest
import torch
from _factories import hsc_from_conv, set_block_bias
from test_conv_grid import CONFIGS, _id
from torch import nn

from hsc_plugin.modules import SpatioChannelConv2d, conv_geometry
from hsc_plugin.tiling import Tiling, output_box

GRID = [c for c in CONFIGS if c["groups"] == "1"]
LAYOUTS = [(1, 1), (1, 3), (4, 1), (4, 3)]  # (regions, clusters)
CIN, COUT = 6, 8


def _conv(c: dict) -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(CIN, COUT, c["kernel"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
                     bias=c["bias"], padding_mode=c["padding_mode"])
    return conv, torch.randn(3, CIN, 13, 12)


def _clusters(n: int, k: int, seed: int) -> list[list[int]]:
    perm = random.Random(seed).sample(range(n), n)
    return [perm[j::k] for j in range(k)]  # unsorted members: the index maps are exercised


def _tiling(regions: int) -> Tiling:
    return Tiling.full() if regions == 1 else Tiling.uniform((2, 2), 2, 2)


@torch.no_grad()
def _full_rank(conv: nn.Conv2d, side: str, regions: int, k: int, block: str,
               first: torch.Tensor | None = None) -> SpatioChannelConv2d:
    """Full ranks, firsts = identity (or ``first``: an invertible C_in map on the output side, its
    inverse folded into the core), core = the cluster's slice of W, expand = identity."""
    n_side = CIN if side == "input" else COUT
    region_clusters = [_clusters(n_side, k, seed) for seed in range(regions)]
    if side == "output":
        ranks = [[len(c) for c in cl] for cl in region_clusters]
        ranks_in = [[CIN] * k for _ in region_clusters]
    else:
        ranks = [[COUT] * k for _ in region_clusters]
        ranks_in = [[len(c) for c in cl] for cl in region_clusters]
    m = SpatioChannelConv2d(CIN, COUT, conv_geometry(conv), _tiling(regions), side, region_clusters, ranks,
                            bias=conv.bias is not None, block=block,
                            region_ranks_in=ranks_in if block == "tucker2" else None)
    W = conv.weight.detach()
    for blk in m.blocks:
        for i, f in zip(blk.kept, blk.factors()):
            c = blk.clusters[i]
            core = W[c] if side == "output" else W[:, c]
            if f["first"] is not None:
                A = torch.eye(len(c) if side == "input" else CIN) if first is None else first
                f["first"].copy_(A)
                core = torch.einsum("oikl,ij->ojkl", core, torch.linalg.inv(A))
            f["core"].copy_(core)
            f["expand"].copy_(torch.eye(f["expand"].shape[0]))
        set_block_bias(blk, conv.bias)
    return m


@pytest.mark.parametrize("block", ["svd", "tucker2"])
@pytest.mark.parametrize("regions,clusters", LAYOUTS)
@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("cfg", GRID, ids=_id)
def test_full_rank_is_exact(cfg: dict, side: str, regions: int, clusters: int, block: str) -> None:
    torch.manual_seed(0)
    conv, x = _conv(cfg)
    m = _full_rank(conv, side, regions, clusters, block)
    if block == "tucker2":
        assert all(len(b.firsts) == len(b.reduces) == len(b.kept) for b in m.blocks)
    with torch.no_grad():
        ref = conv(x)
        out = m(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("regions", [1, 4])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_a_real_first_1x1_commutes_with_padding(mode: str, regions: int) -> None:
    """A non-identity first 1×1 (output side: invertible C_in map, inverse folded into the cores) is
    exact under every padding mode, on the whole map (core pads) and on padded crops (regions)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=(1, 2), dilation=(1, 2), padding_mode=mode)
    x = torch.randn(2, CIN, 11, 14)
    A = torch.randn(CIN, CIN) + 3 * torch.eye(CIN)
    m = _full_rank(conv, "output", regions, 3, "tucker2", first=A)
    with torch.no_grad():
        assert (m(x) - conv(x)).abs().max().item() <= 1e-4


def test_dropped_cluster_outputs_its_bias() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    clusters = [_clusters(COUT, 3, s) for s in range(4)]
    ranks = [[2, 0, 2], [2, 2, 2], [0, 0, 0], [1, 1, 0]]
    m = hsc_from_conv(conv, _tiling(4), "output", clusters, ranks, block="tucker2",
                      region_ranks_in=[[3, 0, 2]] + [[2, 2, 2]] * 3)
    assert [len(b.firsts) for b in m.blocks] == [2, 3, 0, 2]
    x = torch.randn(2, CIN, 10, 10)
    with torch.no_grad():
        y = m(x)
    b = conv.bias.detach()
    for r, (cl, rk) in enumerate(zip(clusters, ranks)):
        o0, o1, q0, q1 = output_box(list(_tiling(4).regions[r]), 10, 10, [2, 2])
        for c, k in zip(cl, rk):
            if k == 0:
                want = b[c].view(1, -1, 1, 1).expand(2, -1, o1 - o0, q1 - q0)
                torch.testing.assert_close(y[:, c, o0:o1, q0:q1], want, rtol=0, atol=0)


def test_dropped_input_cluster_is_the_conv_without_those_inputs() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    cl = _clusters(CIN, 3, 0)
    m = hsc_from_conv(conv, Tiling.full(), "input", [cl], [[COUT, 0, COUT]], block="tucker2",
                      region_ranks_in=[[len(cl[0]), 5, len(cl[2])]])
    x = torch.randn(2, CIN, 9, 9)
    xz = x.clone()
    xz[:, cl[1]] = 0
    with torch.no_grad():
        assert (m(x) - conv(xz)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("side", ["input", "output"])
def test_spec_round_trip_and_error_shrinks_with_rank(side: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, CIN, 12, 12)
    n = CIN if side == "input" else COUT
    clusters = [_clusters(n, 2, s) for s in range(4)]
    errors = []
    for r in (1, 2, 3):
        ranks = [[r + 1, r] for _ in clusters] if side == "output" else [[r * 2, r * 2] for _ in clusters]
        ranks_in = [[r, r] for _ in clusters]
        m = hsc_from_conv(conv, _tiling(4), side, clusters, ranks, block="tucker2", region_ranks_in=ranks_in).eval()
        spec = json.loads(json.dumps(m.spec()))
        assert spec["block"] == "tucker2" and spec["region_ranks_in"] == ranks_in
        twin = SpatioChannelConv2d.from_spec(spec)
        twin.load_state_dict(m.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(twin.eval()(x), m(x), rtol=0, atol=0)
            errors.append((m(x) - conv(x)).norm().item())
    assert errors[0] > errors[1] > errors[2] > 0


def test_an_old_spec_without_block_still_loads() -> None:
    """Specs saved before Tucker-2 blocks have no ``block`` / ``region_ranks_in``: they are svd."""
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    m = hsc_from_conv(conv, _tiling(4), "output", [_clusters(COUT, 2, s) for s in range(4)], [[2, 1]] * 4)
    spec = m.spec()
    assert "block" not in spec and "region_ranks_in" not in spec
    old = {"type": "SpatioChannelConv2d", "in_channels": CIN, "out_channels": COUT,
           "geometry": json.loads(json.dumps(conv_geometry(conv))), "tiling": _tiling(4).to_dict(), "side": "output",
           "region_clusters": spec["region_clusters"], "region_ranks": spec["region_ranks"], "bias": True}
    twin = SpatioChannelConv2d.from_spec(old)
    assert twin.block == "svd" and all(len(b.firsts) == 0 for b in twin.blocks)
    twin.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, CIN, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), m(x), rtol=0, atol=0)


def test_bad_block_arguments_are_clear_errors() -> None:
    geo = conv_geometry(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="block"):
        SpatioChannelConv2d(4, 4, geo, Tiling.full(), "output", [[[0, 1, 2, 3]]], [[2]], block="cp")
    with pytest.raises(ValueError, match="ranks_in"):
        SpatioChannelConv2d(4, 4, geo, Tiling.full(), "output", [[[0, 1, 2, 3]]], [[2]], block="tucker2")
    with pytest.raises(ValueError, match="input rank 0"):
        SpatioChannelConv2d(4, 4, geo, Tiling.full(), "output", [[[0, 1], [2, 3]]], [[2, 1]], block="tucker2",
                            region_ranks_in=[[2, 0]])


@pytest.mark.parametrize("side", ["input", "output"])
def test_gradients_reach_every_factor(side: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    n = CIN if side == "input" else COUT
    m = hsc_from_conv(conv, _tiling(4), side, [_clusters(n, 2, s) for s in range(4)], [[2, 2]] * 4,
                      block="tucker2", region_ranks_in=[[2, 1]] * 4).train()
    m(torch.randn(2, CIN, 10, 10)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("block", ["svd", "tucker2"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_one_region_module_scripts(side: str, block: str) -> None:
    """A one-region HSC layer has no concatenation step; TorchScript must still compile it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    n = CIN if side == "input" else COUT
    m = hsc_from_conv(conv, Tiling.full(), side, [_clusters(n, 2, 0)], [[2, 3]], block=block,
                      region_ranks_in=[[2, 2]] if block == "tucker2" else None).eval()
    x = torch.randn(2, CIN, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(m)(x), m(x))
