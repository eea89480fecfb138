"""Plugins: a third-party package adds a rank selector through the entry-point group exactly as
a user's would; ``hsc plugins`` lists it with its distribution; ``compress`` selects it by name.
Unknown names and options are clear errors."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hsc_plugin.registry
from hsc_plugin import Budget, compress, list_plugins
from hsc_plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "plugin_rank_selector"
DIST = "hsc-example-selector"
SELECTOR = "uniform_macs"
BUILTINS = {
    "compressor": {"global_svd", "tucker2"},
    "rank_selector": {"energy", "fixed", "budget", "scaled", "vbmf"},
}
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(EXAMPLE)]



@pytest.fixture(scope="session")
def example_plugin() -> md.Distribution:
    """The example plugin package, installed (CI installs it; otherwise it is installed here)."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        done = subprocess.run(PIP_INSTALL, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(PIP_INSTALL)} failed:\n{done.stdout}\n{done.stderr}"
        importlib.invalidate_caches()
        hsc_plugin.registry._pm = None  # the plugin manager loaded entry points before the install
        dist = md.distribution(DIST)
    if SELECTOR not in hsc_plugin.registry.available("rank_selector"):
        hsc_plugin.registry._pm = None
    return dist


def _spread(report, names: list[str]) -> float:
    """max - min of the layers' MAC share (after / before); a layer kept dense has share 1."""
    layers = {L.name: L for L in report.layers}
    shares = [layers[n].macs_after / layers[n].macs_before for n in names]
    return max(shares) - min(shares)


CONVS = ["stem", "body.0", "body.3", "body.5", "body.8", "body.10"]


def test_example_package_is_installed_with_its_entry_point(example_plugin: md.Distribution) -> None:
    assert example_plugin.version == "0.1.0"
    eps = [ep for ep in example_plugin.entry_points if ep.group == "hsc_plugin"]
    assert [(ep.name, ep.value) for ep in eps] == [("example", "hsc_example_selector.plugin")]
    assert hasattr(eps[0].load(), "hsc_rank_selectors")


def test_hsc_plugins_lists_the_plugin_with_its_distribution(example_plugin, capsys) -> None:
    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = [line for line in lines if f" {SELECTOR} " in line]
    assert len(row) == 1, lines
    assert row[0].split()[0] == "rank_selector"
    assert "hsc-example-selector 0.1.0" in row[0]
    assert row[0].rstrip().endswith("hsc_example_selector.selector.UniformMACsSelector")


def test_hsc_plugins_json_from_the_command_line(example_plugin) -> None:
    exe = shutil.which("hsc")
    cmd = [exe] if exe else [sys.executable, "-m", "hsc_plugin.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    mine = [r for r in rows if r["name"] == SELECTOR]
    assert mine == [{"kind": "rank_selector", "name": SELECTOR,
                     "class": "hsc_example_selector.selector.UniformMACsSelector",
                     "origin": "hsc-example-selector 0.1.0"}]
    for kind, names in BUILTINS.items():
        found = {r["name"]: r["origin"] for r in rows if r["kind"] == kind}
        assert names <= set(found), (kind, found)
        assert {found[n] for n in names} == {"hsc-plugin 0.1.0"}


def test_builtins_come_from_the_hsc_plugin_distribution(example_plugin) -> None:
    infos = list_plugins()
    for kind, names in BUILTINS.items():
        origins = {i.name: i.origin for i in infos if i.kind == kind}
        for n in names:
            assert origins.get(n) == "hsc-plugin 0.1.0", (kind, n, origins)
    # and the built-ins register through the entry-point group, like the plugin does
    ours = {ep.value for ep in md.distribution("hsc-plugin").entry_points if ep.group == "hsc_plugin"}
    assert {"hsc_plugin.compressors", "hsc_plugin.strategies.rank"} <= ours


@pytest.mark.parametrize("method", ["global_svd", "tucker2"])
def test_compress_uses_the_plugin_by_name(example_plugin, small_cnn: nn.Module, method: str) -> None:
    x = torch.randn(8, 3, 32, 32)
    res = compress(small_cnn, method, calib=x, budget=Budget(3.0), rank=SELECTOR)
    assert res.report.options["rank"] == SELECTOR
    assert res.report.budget_met and abs(res.report.achieved_ratio / 3.0 - 1) <= 0.02
    assert res.model(x).shape == (8, 10)
    # every conv is factorised to about the same share of its MACs (that is what the selector does)
    assert all(L.status == "factorised" for L in res.report.layers if L.name in CONVS)
    assert _spread(res.report, CONVS) < 0.25

    ref = compress(small_cnn, method, calib=x, budget=Budget(3.0), rank="budget")
    assert ref.report.budget_met
    assert [L.ranks for L in res.report.layers] != [L.ranks for L in ref.report.layers]
    assert _spread(res.report, CONVS) < _spread(ref.report, CONVS)


def test_plugin_meets_a_parameter_budget(example_plugin, small_cnn: nn.Module) -> None:
    res = compress(small_cnn, "global_svd", calib=torch.randn(4, 3, 32, 32), budget=Budget(2.5, metric="params"),
                   rank=SELECTOR, rank_multiple=4)
    assert res.report.budget_met and abs(res.report.params_ratio / 2.5 - 1) <= 0.02
    assert all(r % 4 == 0 for L in res.report.layers if L.name in CONVS for r in L.ranks.values())


def test_cli_selects_the_plugin_by_name(example_plugin, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # for _factories
    rep = tmp_path / "r.json"
    rc = main(["compress", "_factories:tiny_cnn", "--method", "global_svd", "--macs", "3x", "--input-size",
               "3,32,32", "-o", f"rank={SELECTOR}", "--report", str(rep)])
    assert rc == 0 and "met=True" in capsys.readouterr().out
    report = json.loads(rep.read_text())
    assert report["options"]["rank"] == SELECTOR and report["budget_met"] is True


def test_plugin_object_with_options_and_budget_rules(example_plugin, small_cnn: nn.Module) -> None:
    from hsc_example_selector import UniformMACsSelector

    x = torch.randn(4, 3, 32, 32)
    res = compress(small_cnn, "global_svd", calib=x, rank=UniformMACsSelector(fraction=0.3))
    assert res.report.options["rank"] == {"name": SELECTOR, "fraction": 0.3}
    layers = {L.name: L for L in res.report.layers}
    for n in CONVS:
        assert 0.15 < layers[n].macs_after / layers[n].macs_before <= 0.3 + 1e-9, n
    with pytest.raises(ValueError, match="does not take a budget"):
        compress(small_cnn, "global_svd", calib=x, budget=Budget(3.0), rank=UniformMACsSelector(fraction=0.3))
    with pytest.raises(ValueError, match=f"{SELECTOR}.*needs a budget"):
        compress(small_cnn, "global_svd", calib=x, rank=SELECTOR)
    with pytest.raises(ValueError, match="fraction"):
        UniformMACsSelector(fraction=1.5)


@pytest.mark.parametrize(
    ("method", "options", "suggestion"),
    [
        ("global_svd", {"rank": "energi"}, "'energy'"),
        ("global_svd", {"rank": "uniform_mac"}, f"'{SELECTOR}'"),  # plugins take part in suggestions
        ("global-svd", {}, "'global_svd'"),
        ("Tucker_2", {}, "'tucker2'"),
    ],
)
def test_unknown_name_suggests_the_close_one(example_plugin, small_cnn, method, options, suggestion) -> None:
    with pytest.raises(ValueError, match=f"Did you mean {suggestion}") as err:
        compress(small_cnn, method, calib=torch.randn(2, 3, 32, 32), **options)
    assert "Available" in str(err.value)


def test_unknown_option_is_named(example_plugin, small_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"global_svd.*\['foo'\]") as err:
        compress(small_cnn, "global_svd", calib=x, foo=1)
    assert "data_aware" in str(err.value)  # and it lists what the compressor takes
    # a third-party selector's own options go to the object, not to the compressor
    with pytest.raises(ValueError, match=r"\['fraction'\]"):
        compress(small_cnn, "global_svd", calib=x, rank=SELECTOR, fraction=0.3)


# -- hsc sub-commands come from plugins (hook hsc_cli_commands), the experiment's included ------
def test_core_cli_does_not_import_the_experiment() -> None:
    code = ("import sys, hsc_plugin.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('hsc_plugin.mri')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_experiment_commands_are_added_by_its_hook(capsys) -> None:
    pm = hsc_plugin.registry.get_plugin_manager()
    experiment = importlib.import_module("hsc_plugin.mri.cli")
    assert experiment in [impl.plugin for impl in pm.hook.hsc_cli_commands.get_hookimpls()]
    assert main(["plugins"]) == 0
    assert "hsc_plugin.mri" not in capsys.readouterr().out  # commands are not a strategy kind
    name = pm.get_name(experiment)
    pm.unregister(experiment)
    try:
        with pytest.raises(SystemExit) as exc:  # without the plugin, hsc has no demo command
            main(["demo", "--help"])
        assert exc.value.code == 2 and "invalid choice: 'demo'" in capsys.readouterr().err
    finally:
        pm.register(experiment, name=name)
    for command in ("demo", "reproduce", "sweep"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: hsc {command}" in capsys.readouterr().out


class _HelloCommand:
    @hsc_plugin.registry.hookimpl
    def hsc_cli_commands(self, subparsers) -> None:
        p = subparsers.add_parser("hello", help="a third-party command")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)


def test_a_third_party_plugin_adds_a_command(capsys) -> None:
    hsc_plugin.registry.register(_HelloCommand(), name="test-hello-command")
    try:
        assert main(["hello", "--name", "hsc"]) == 3  # its return value is the exit status
    finally:
        hsc_plugin.registry.get_plugin_manager().unregister(name="test-hello-command")
    assert capsys.readouterr().out == "hello hsc\n"
    with pytest.raises(SystemExit):
        main(["hello"])
