"""The worked third-party partitioner plugin (examples/plugin_foreground_partitioner).

A package outside hsc-plugin adds the ``foreground`` spatial partitioner through the ``hsc_plugin``
entry-point group; it is installed here the way a user installs it, listed by ``hsc plugins`` with
its distribution, unit-tested on synthetic cell statistics (every tiling it returns is checked for
validity), and used end to end by name in ``compress(..., "hsc", partition="foreground")``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hsc_plugin.registry
from hsc_plugin import Budget, compress, list_plugins
from hsc_plugin.cli import main
from hsc_plugin.spatial import Tiling

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin_foreground_partitioner"
DIST = "hsc-foreground-partitioner"
NAME = "foreground"
CLASS = "hsc_foreground_partitioner.partitioner.ForegroundPartitioner"
# --no-build-isolation: use the setuptools already installed instead of downloading one (offline CI)
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(EXAMPLE)]
SHARED_MRI = REPO.parent / "shared" / "data" / "brain-mri-128"

pytestmark = pytest.mark.usefixtures("foreground_plugin")  # every test imports the installed package


@pytest.fixture(scope="session")
def foreground_plugin() -> md.Distribution:
    """The example package, installed (CI installs it; otherwise it is installed here)."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        subprocess.run(PIP_INSTALL, check=True)
        importlib.invalidate_caches()
        hsc_plugin.registry._pm = None  # the plugin manager loaded the entry points before the install
        dist = md.distribution(DIST)
    if NAME not in hsc_plugin.registry.available("partitioner"):
        hsc_plugin.registry._pm = None
    return dist


# -- installation and discovery -------------------------------------------------------------------
def test_package_is_installed_with_its_entry_point(foreground_plugin: md.Distribution) -> None:
    assert foreground_plugin.version == "0.1.0"
    eps = [ep for ep in foreground_plugin.entry_points if ep.group == "hsc_plugin"]
    assert [(ep.name, ep.value) for ep in eps] == [("foreground", "hsc_foreground_partitioner.plugin")]
    assert hasattr(eps[0].load(), "hsc_partitioners")


def test_hsc_plugins_lists_it_with_its_distribution(foreground_plugin, capsys) -> None:
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if f" {NAME} " in line]
    assert len(rows) == 1, rows
    assert rows[0].split()[0] == "partitioner"
    assert f"{DIST} 0.1.0" in rows[0]
    assert rows[0].rstrip().endswith(CLASS)

    assert main(["plugins", "--json"]) == 0
    mine = [r for r in json.loads(capsys.readouterr().out) if r["name"] == NAME]
    assert mine == [{"kind": "partitioner", "name": NAME, "class": CLASS, "origin": f"{DIST} 0.1.0"}]
    # next to the built-ins, which keep their own origin
    origins = {i.name: i.origin for i in list_plugins("partitioner")}
    assert origins[NAME] == f"{DIST} 0.1.0"
    assert {origins[n] for n in ("none", "grid", "quadtree")} == {"hsc-plugin 0.1.0"}


# -- the tiling, on synthetic statistics ------------------------------------------------------------
def check_tiling(t: Tiling) -> None:
    """Cell-aligned rectangles that cover the grid exactly once, nested by a guillotine tree whose
    leaves are the region indices, each exactly once."""
    gh, gw = t.grid
    cover = np.zeros((gh, gw), dtype=int)
    for r0, r1, c0, c1 in t.regions:
        assert 0 <= r0 < r1 <= gh and 0 <= c0 < c1 <= gw, (t.regions, t.grid)
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all(), cover
    leaves: list[int] = []

    def rect(node: Any) -> tuple[int, int, int, int]:
        if isinstance(node, int):
            leaves.append(node)
            return tuple(t.regions[node])  # type: ignore[return-value]
        axis, children = node
        assert axis in ("h", "w") and len(children) >= 2, node
        rs = [rect(c) for c in children]
        if axis == "h":  # stacked top to bottom: same columns, consecutive rows
            assert all(r[2:] == rs[0][2:] for r in rs) and all(a[1] == b[0] for a, b in zip(rs, rs[1:])), rs
        else:  # side by side: same rows, consecutive columns
            assert all(r[:2] == rs[0][:2] for r in rs) and all(a[3] == b[2] for a, b in zip(rs, rs[1:])), rs
        return (rs[0][0], rs[-1][1], rs[0][2], rs[-1][3])

    assert rect(t.tree) == (0, gh, 0, gw)
    assert sorted(leaves) == list(range(t.n_regions))
    assert len(t.program()) == len([1 for _ in _inner(t.tree)])
    assert Tiling.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def _inner(node: Any):
    if not isinstance(node, int):
        yield node
        for c in node[1]:
            yield from _inner(c)


def stats(energy: np.ndarray, out_hw: tuple[int, int] | None = None, channels: int = 3) -> SimpleNamespace:
    """A CellStats-like object whose cells have the given per-pixel energy (trace(S) / count)."""
    gh, gw = energy.shape
    h, w = out_hw or (8 * gh, 8 * gw)
    re, ce = [i * h // gh for i in range(gh + 1)], [j * w // gw for j in range(gw + 1)]
    count = torch.tensor([[(re[i + 1] - re[i]) * (ce[j + 1] - ce[j]) for j in range(gw)] for i in range(gh)],
                         dtype=torch.float64)
    rng = np.random.default_rng(0)
    S = torch.zeros(gh, gw, channels, channels, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            a = torch.as_tensor(rng.standard_normal((channels, channels)))
            A = a @ a.T + 0.1 * torch.eye(channels, dtype=torch.float64)
            S[i, j] = A / A.trace() * float(energy[i, j]) * count[i, j]
    return SimpleNamespace(grid=(gh, gw), out_hw=(h, w), S=S, count=count,
                           region=lambda r0, r1, c0, c1: S[r0:r1, c0:c1].sum(dim=(0, 1)))


def part(**options: Any):
    from hsc_foreground_partitioner import ForegroundPartitioner

    return ForegroundPartitioner(**options)


def test_bright_centre_is_isolated_from_the_background_bands() -> None:
    e = np.full((8, 8), 1e-4)
    e[2:6, 2:6] = 1.0
    e[3, 4] = 2.0
    t = part().partition(stats(e))
    check_tiling(t)
    assert t.n_regions == 5
    assert (2, 6, 2, 6) in t.regions
    assert t.tree == ("h", [0, ("w", [1, 2, 3]), 4])  # top / (left | foreground | right) / bottom
    for r in t.regions:
        if r != (2, 6, 2, 6):
            assert e[r[0]:r[1], r[2]:r[3]].max() < 0.05 * e.max()


def test_off_centre_foreground_drops_the_empty_bands() -> None:
    e = np.zeros((8, 8))
    e[1:5, 3:8] = 1.0  # touches the right edge: no right band
    t = part().partition(stats(e))
    check_tiling(t)
    assert set(t.regions) == {(0, 1, 0, 8), (1, 5, 0, 3), (1, 5, 3, 8), (5, 8, 0, 8)}
    assert t.tree == ("h", [0, ("w", [1, 2]), 3])


@pytest.mark.parametrize("energy", [np.ones((8, 8)), np.zeros((8, 8)),
                                    np.random.default_rng(1).uniform(0.5, 1.0, (8, 8))],
                         ids=["uniform", "no signal", "no background"])
def test_without_a_clear_background_one_region(energy: np.ndarray) -> None:
    t = part().partition(stats(energy))
    check_tiling(t)
    assert t == Tiling.full((8, 8))


def test_small_maps_and_thin_bands_get_no_region_of_their_own() -> None:
    e = np.zeros((4, 4))
    e[1:3, 1:3] = 1.0
    assert part().partition(stats(e, out_hw=(8, 8))) == Tiling.full((4, 4))  # 2-pixel bands < min_region
    assert part(min_region=2).partition(stats(e, out_hw=(8, 8))).n_regions == 5
    e = np.zeros((8, 8))
    e[1:7, 1:7] = 1.0  # 1-cell bands: 8 px at 64×64 (kept), 3 px at 24×24 (joined to the foreground)
    assert part().partition(stats(e)).n_regions == 5
    assert part().partition(stats(e, out_hw=(24, 24))) == Tiling.full((8, 8))


def test_max_regions_merges_the_smallest_bands_and_threshold_moves_the_box() -> None:
    e = np.full((8, 8), 1e-6)
    e[2:6, 2:6] = 1.0
    e[1, 1:7] = 0.08  # a dim rim above the bright block
    t5 = part().partition(stats(e))
    assert (1, 6, 1, 7) in t5.regions  # the rim counts as foreground at 5%
    t10 = part(threshold=0.1).partition(stats(e))
    assert (2, 6, 2, 6) in t10.regions  # not at 10%
    t3 = part(threshold=0.1, max_regions=3).partition(stats(e))
    check_tiling(t3)
    assert t3.n_regions == 3
    assert t3.regions == ((0, 2, 0, 8), (2, 6, 0, 8), (6, 8, 0, 8))  # left/right bands (smallest) merged
    assert part(max_regions=1).partition(stats(e)) == Tiling.full((8, 8))


def test_invalid_options_are_refused() -> None:
    for bad in ({"threshold": 1.0}, {"threshold": -0.1}, {"max_regions": 0}, {"min_region": 0}):
        with pytest.raises(ValueError):
            part(**bad)


def test_random_maps_always_give_valid_tilings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        gh, gw = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        h, w = int(rng.integers(gh, 80)), int(rng.integers(gw, 80))
        e = rng.uniform(0, 1, (gh, gw)) ** 8 * (rng.uniform(size=(gh, gw)) < 0.5)
        opts = {"threshold": float(rng.uniform(0, 0.5)), "max_regions": int(rng.integers(1, 7)),
                "min_region": int(rng.integers(1, 9))}
        t = part(**opts).partition(stats(e, out_hw=(h, w), channels=2))
        check_tiling(t)
        assert t.n_regions <= min(5, opts["max_regions"])
        if e.max() > 0:  # every foreground cell lies in one region: the one holding the brightest cell
            fg = [r for r in t.regions if r[0] <= np.argmax(e) // gw < r[1] and r[2] <= np.argmax(e) % gw < r[3]]
            r0, r1, c0, c1 = fg[0]
            inside = np.zeros_like(e, dtype=bool)
            inside[r0:r1, c0:c1] = True
            assert not (e >= opts["threshold"] * e.max())[~inside].any()
        for r0, r1, c0, c1 in t.regions:  # every region min_region pixels a side (or the whole axis)
            assert r1 * h // gh - r0 * h // gh >= min(opts["min_region"], h)
            assert c1 * w // gw - c0 * w // gw >= min(opts["min_region"], w)


def test_real_cell_statistics_from_hsc() -> None:
    from hsc_plugin.compressors.hsc import CellStats

    y = torch.zeros(2, 4, 32, 32)
    y[:, :, 8:24, 4:28] = torch.randn(2, 4, 16, 24)
    cs = CellStats(4, (8, 8), (32, 32), "output", torch.device("cpu"))
    cs.update(y, y)
    t = part().partition(cs)
    check_tiling(t)
    assert t.regions == ((0, 2, 0, 8), (2, 6, 0, 1), (2, 6, 1, 7), (2, 6, 7, 8), (6, 8, 0, 8))


# -- end to end --------------------------------------------------------------------------------------
def _mri_root() -> Path:
    if SHARED_MRI.is_dir() and (SHARED_MRI / "train").is_dir():
        return SHARED_MRI
    from hsc_plugin.mri.data import bundled_sample_path

    return bundled_sample_path()


@pytest.fixture(scope="module")
def bordered_mri() -> torch.Tensor:
    """Real MRI slices (pixels in [0, 1], their own dark border) at 32×32, centred on a 64×64 black
    canvas: a wide background ring, as in slices padded to a common size. (At 24×24 and smaller the
    16-pixel ring would be thinner than ``min_region`` in the stride-2 layers: one region there.)"""
    from hsc_plugin.mri.data import load_split

    img = load_split(_mri_root(), "train", size=32, max_per_class=4, seed=0, normalize=False).tensors[0]
    x = torch.zeros(len(img), 1, 64, 64)
    x[:, :, 16:48, 16:48] = img
    return x


def _cnn() -> nn.Module:
    # No biases: the background stays exactly zero through every layer (a bias, or a BatchNorm
    # shift, turns it into a constant that is not "empty" by energy; see the example's README).
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    ).eval()


def _foreground(regions: list[dict[str, Any]], grid: tuple[int, int]) -> int:
    """Index of the region holding the centre cell."""
    ci, cj = grid[0] // 2, grid[1] // 2
    return next(i for i, r in enumerate(regions) if r["cells"][0] <= ci < r["cells"][1] and r["cells"][2] <= cj < r["cells"][3])


def test_compress_selects_it_by_name_and_background_gets_less_rank(foreground_plugin, bordered_mri) -> None:
    model, x = _cnn(), bordered_mri
    res = compress(model, "hsc", calib=x, budget=Budget(3.0), partition="foreground")
    rep = res.report
    assert rep.budget_met, (rep.achieved_ratio, rep.budget)
    assert rep.options["partition"]["name"] == NAME
    with torch.no_grad():
        y = res.model(x)
        assert y.shape == model(x).shape and torch.isfinite(y).all()
        assert res.model(torch.zeros(2, 1, 64, 80)).shape == (2, 4)  # relative tiling: any input size
    split = 0
    for layer in rep.layers:
        regions = layer.details.get("regions", [])
        if len(regions) < 2:
            continue
        split += 1
        grid = tuple(layer.details["tiling"]["grid"])
        fg = _foreground(regions, grid)
        fg_rank = sum(regions[fg]["ranks"])
        for i, r in enumerate(regions):
            if i != fg:  # every background pixel runs through fewer filters than a foreground pixel
                assert sum(r["ranks"]) < fg_rank, (layer.name, regions)
    assert split == 4, [(L.name, L.details.get("tiling")) for L in rep.layers]


def test_full_rank_is_exact_and_options_go_through_the_object(foreground_plugin, bordered_mri, tmp_path) -> None:
    from hsc_foreground_partitioner import ForegroundPartitioner

    from hsc_plugin import load, save

    model, x = _cnn(), bordered_mri
    res = compress(model, "hsc", calib=x, rank="energy", energy=1.0, dense_fallback=False,
                   partition=ForegroundPartitioner(threshold=0.1, max_regions=3))
    assert res.report.options["partition"] == {"name": NAME, "threshold": 0.1, "max_regions": 3, "min_region": 4}
    tiled = [L for L in res.report.layers if len(L.details.get("regions", [])) > 1]
    assert len(tiled) == 4 and all(len(L.details["regions"]) == 3 for L in tiled)
    with torch.no_grad():
        for a, b in ((model[:8], res.model[:8]), (model, res.model)):  # the feature map, then the logits
            ref, out = a(x), b(x)
            assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
        # the saved model loads without the plugin: the tiling is stored, not the partitioner
        save(res, tmp_path / "fg")
        back = load(tmp_path / "fg", _cnn())
        assert torch.equal(back(x), res.model(x))
