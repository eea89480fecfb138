"""Model factories for ``hsc compress package.module:factory`` in the CLI tests.

With ``tests/`` on ``sys.path`` (pytest puts it there; the CLI tests add it for subprocesses),
``_factories:tiny_cnn`` names :func:`tiny_cnn`.
"""

from __future__ import annotations

import copy
import random

import torch
from torch import nn


def tiny_cnn() -> nn.Module:
    """A small 3-channel CNN (seeded, so every call gives the same weights)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def wide_cnn() -> nn.Module:
    """Three 64-channel 3×3 convs and a small head (seeded): layers large enough that the fake
    devices of the latency-budget tests see factorisation pay."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()


def randomise_bn(model: nn.Module) -> nn.Module:
    """Seeded, far-from-identity BatchNorm statistics and affine parameters (in place, eval mode):
    a fold that drops or mis-scales any of the four shows in the outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


# -- the execution forms built from a dense conv, for tests of forms no compressor produces yet -----

def quadtree_tiling() -> "Tiling":
    """A quadtree-like tiling on a 4×4 cell grid: the top-left quadrant split in four, three quadrants whole."""
    from hsc_plugin.tiling import Tiling

    regions = ((0, 1, 0, 1), (0, 1, 1, 2), (1, 2, 0, 1), (1, 2, 1, 2), (0, 2, 2, 4), (2, 4, 0, 2), (2, 4, 2, 4))
    tree = ("h", [("w", [("h", [("w", [0, 1]), ("w", [2, 3])]), 4]), ("w", [5, 6])])
    return Tiling((4, 4), regions, tree)


def conv_factors(W: torch.Tensor, rank: int, rank_in: int | None = None) -> tuple:
    """``(first, core, expand)`` of a weight ``W`` (Co×Ci×kh×kw): truncated SVD when ``rank_in`` is
    None (``first`` None, ``core`` rank×Ci×kh×kw), else Tucker-2 (``first`` rank_in×Ci), ``expand``
    Co×rank. Exact when the ranks are full."""
    from hsc_plugin.decomposition import tucker2

    if rank_in is None:
        U, S, Vh = torch.linalg.svd(W.double().reshape(W.shape[0], -1), full_matrices=False)
        core = (S[:rank, None] * Vh[:rank]).reshape(rank, *W.shape[1:])
        return None, core.to(W.dtype), U[:, :rank].to(W.dtype)
    U, core, V = tucker2(W, rank, rank_in)
    return V.T.to(W.dtype), core.to(W.dtype), U.to(W.dtype)


@torch.no_grad()
def regional_from_conv(conv: nn.Conv2d, tiling: "Tiling", rank: int, *, base: str = "svd",
                       rank_in: int | None = None, jitter: float = 0.0, seed: int = 0) -> nn.Module:
    """A :class:`RegionalExpansionConv2d` whose shared reduction is ``conv``'s SVD / Tucker-2 at the
    given ranks; every region's 1×1 is the same factor plus ``jitter``·noise (so regions differ)."""
    from hsc_plugin.modules import RegionalExpansionConv2d, conv_geometry

    w = conv.weight
    m = RegionalExpansionConv2d(conv.in_channels, conv.out_channels, conv_geometry(conv), tiling, rank,
                                base=base, rank_in=rank_in, bias=conv.bias is not None,
                                device=w.device, dtype=w.dtype)
    first, core, expand = conv_factors(w.detach(), rank, rank_in if base == "tucker2" else None)
    if first is not None:
        m.first.weight.copy_(first[:, :, None, None])
    m.reduce.weight.copy_(core)
    g = torch.Generator().manual_seed(seed)
    for e in m.expands:
        e.weight.copy_((expand + jitter * torch.randn(expand.shape, generator=g).to(expand))[:, :, None, None])
        if conv.bias is not None:
            e.bias.copy_(conv.bias)
    return m.train(conv.training)


@torch.no_grad()
def regional_clusters_from_conv(conv: nn.Conv2d, tiling: "Tiling", *, jitter: float = 0.0, seed: int = 0) -> nn.Module:
    """A :class:`RegionalExpansionConv2d` on two random input clusters (one if C_in is 1), each
    cluster's k×k conv its columns' SVD at about a quarter of C_out; every region's 1×1 the clusters'
    SVD bases side by side plus ``jitter``·noise."""
    from hsc_plugin.modules import RegionalExpansionConv2d, conv_geometry

    ci, co, w = conv.in_channels, conv.out_channels, conv.weight.detach()
    k = min(2, ci)
    perm = random.Random(seed).sample(range(ci), ci)
    clusters = [sorted(perm[j::k]) for j in range(k)]
    ranks = [max(1, min(co, len(c) * w[0, 0].numel()) // 4) for c in clusters]
    m = RegionalExpansionConv2d(ci, co, conv_geometry(conv), tiling, sum(ranks), base="clusters", clusters=clusters,
                                ranks=ranks, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    bases = []
    for core, c, r in zip(m.first.cores(), clusters, ranks):
        _, reduce, expand = conv_factors(w[:, c], r, None)
        core.copy_(reduce)
        bases.append(expand)
    g = torch.Generator().manual_seed(seed)
    expand = torch.cat(bases, 1)
    for e in m.expands:
        e.weight.copy_((expand + jitter * torch.randn(expand.shape, generator=g).to(expand))[:, :, None, None])
        if conv.bias is not None:
            e.bias.copy_(conv.bias)
    return m.train(conv.training)


@torch.no_grad()
def set_block_bias(blk: nn.Module, bias: torch.Tensor | None) -> None:
    """Give a :class:`RegionBlock` the conv's bias wherever it keeps one (expands, dropped, constant)."""
    if bias is None:
        return
    if blk.total_rank == 0:
        blk.const_bias.copy_(bias)
    if blk.side == "input":
        if len(blk.expands):
            blk.expands[0].bias.copy_(bias)
        return
    for e, i in zip(blk.expands, blk.kept):
        e.bias.copy_(bias[blk.clusters[i]])
    if blk.n_dropped:
        blk.dropped_bias.copy_(bias[blk.dropped])


@torch.no_grad()
def hsc_from_conv(conv: nn.Conv2d, tiling: "Tiling", side: str, region_clusters: list, region_ranks: list, *,
                  block: str = "svd", region_ranks_in: list | None = None) -> nn.Module:
    """A :class:`SpatioChannelConv2d` at the given ranks whose every (region, cluster) path is the
    SVD / Tucker-2 of that cluster's slice of ``conv``'s weight (rows on the output side, input
    channels on the input side): every region starts from the same factors."""
    from hsc_plugin.modules import SpatioChannelConv2d, conv_geometry

    w = conv.weight.detach()
    m = SpatioChannelConv2d(conv.in_channels, conv.out_channels, conv_geometry(conv), tiling, side, region_clusters,
                            region_ranks, bias=conv.bias is not None, device=w.device, dtype=w.dtype,
                            block=block, region_ranks_in=region_ranks_in)
    for blk in m.blocks:
        for i, f in zip(blk.kept, blk.factors()):
            sub = w[blk.clusters[i]] if side == "output" else w[:, blk.clusters[i]]
            first, core, expand = conv_factors(sub, blk.ranks[i], blk.ranks_in[i] if block == "tucker2" else None)
            if first is not None:
                f["first"].copy_(first)
            f["core"].copy_(core)
            f["expand"].copy_(expand)
        set_block_bias(blk, conv.bias)
    return m.train(conv.training)


FORMS = ("regional-svd", "regional-tucker2", "regional-clusters", "hsc-tucker2-input", "hsc-tucker2-output")
"""Execution forms no compressor produces yet, built by :func:`factorise_convs` for the deployment tests."""


def form_from_conv(conv: nn.Conv2d, form: str, tiling: "Tiling", seed: int = 0) -> nn.Module:
    """``conv`` as one of :data:`FORMS` at about half its ranks (2 clusters per region for HSC)."""
    ci, co = conv.in_channels, conv.out_channels
    if form.startswith("regional"):
        if form == "regional-svd":
            rank = max(1, min(co, conv.weight[0].numel()) // 2)
            return regional_from_conv(conv, tiling, rank, jitter=0.05, seed=seed)
        if form == "regional-clusters":
            return regional_clusters_from_conv(conv, tiling, jitter=0.05, seed=seed)
        return regional_from_conv(conv, tiling, max(1, co // 2), base="tucker2", rank_in=max(1, ci // 2),
                                  jitter=0.05, seed=seed)
    side = form.rsplit("-", 1)[1]
    n = ci if side == "input" else co
    k = min(2, n)
    region_clusters, region_ranks, region_ranks_in = [], [], []
    for r in range(tiling.n_regions):  # other clusters in every region
        perm = random.Random(seed * 1000 + r).sample(range(n), n)
        cl = [sorted(perm[j::k]) for j in range(k)]
        region_clusters.append(cl)
        if side == "output":
            region_ranks.append([max(1, len(c) // 2) for c in cl])
            region_ranks_in.append([max(1, ci // 2)] * k)
        else:
            region_ranks.append([max(1, co // 4)] * k)
            region_ranks_in.append([max(1, len(c) // 2) for c in cl])
    return hsc_from_conv(conv, tiling, side, region_clusters, region_ranks, block="tucker2",
                         region_ranks_in=region_ranks_in)


def factorise_convs(model: nn.Module, form: str, tiling: "Tiling | None" = None) -> nn.Module:
    """A copy of ``model`` with every ungrouped ``nn.Conv2d`` replaced by ``form`` (2×2 regions by default)."""
    from hsc_plugin.tiling import Tiling

    tiling = tiling or Tiling.uniform((2, 2), 2, 2)
    out = copy.deepcopy(model)
    names = [n for n, m in out.named_modules() if type(m) is nn.Conv2d and m.groups == 1]
    for i, name in enumerate(names):
        parent, _, leaf = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, leaf, form_from_conv(getattr(holder, leaf), form, tiling, seed=i))
    return out
