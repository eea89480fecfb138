"""The NNI adapter: config_list selection, budgets, evaluator calibration and fine-tuning,
composition with NNI's L1NormPruner + ModelSpeedup, and the example script."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

nni = pytest.importorskip("nni", reason="the NNI adapter needs the [nni] extra (pip install 'hsc-plugin[nni]')")

from nni.compression import TorchEvaluator  # noqa: E402
from nni.compression.pruning import L1NormPruner  # noqa: E402

from conftest import REPO, assert_unchanged, snapshot  # noqa: E402
from hsc_plugin import hookimpl, measure_costs, registry  # noqa: E402
from hsc_plugin.adapters.nni import (  # noqa: E402
    LowRankCompressor,
    SpeedupIncompatibleError,
    check_speedup_compatible,
    finetune,
    speedup,
)
from hsc_plugin.compressors import GlobalSVD  # noqa: E402
from hsc_plugin.modules import LowRankConv2d, LowRankLinear, Tucker2Conv2d  # noqa: E402

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
FACTORISED = (LowRankConv2d, LowRankLinear, Tucker2Conv2d)
ALL = {"stem", "body.0", "body.3", "body.5", "body.8", "body.10", "head.2", "head.4"}
logging.getLogger("nni").setLevel(logging.WARNING)


def _quiet_logger() -> logging.Logger:
    log = logging.getLogger("test_adapter_nni.speedup")
    log.setLevel(logging.WARNING)
    return log


def _factorised(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, FACTORISED)}


# -- selection: NNI's keys mean what they mean for NNI's own pruners ---------------------------
SELECTIONS = [
    ({"op_types": ["Linear"]}, {"head.2", "head.4"}),
    ({"op_names": ["body.3", "head.4"]}, {"body.3", "head.4"}),
    ({"op_names_re": [r"body\.[05]$"]}, {"body.0", "body.5"}),
    ({"op_types": ["Conv2d"], "exclude_op_names": ["stem", "body.10"]}, {"body.0", "body.3", "body.5", "body.8"}),
    ({"op_types": ["Conv2d", "Linear"], "exclude_op_types": ["Linear"]},
     {"stem", "body.0", "body.3", "body.5", "body.8", "body.10"}),
    ({"op_types": ["Conv2d", "Linear"], "exclude_op_names_re": [r"head\.", r"body\.1"]},
     {"stem", "body.0", "body.3", "body.5", "body.8"}),
]


@pytest.mark.parametrize("selection,expected", SELECTIONS, ids=[next(reversed(s)) for s, _ in SELECTIONS])
def test_each_selection_key_is_honoured(small_cnn, selection, expected):
    config = {**selection, "method": "global_svd", "rank_ratio": 0.25}
    model, report = LowRankCompressor(small_cnn, [config], dummy_input=X).compress()
    assert {L.name for L in report.layers} == expected
    assert all(L.status == "factorised" for L in report.layers), [(L.name, L.reason) for L in report.layers]
    assert _factorised(model) == expected
    untouched = ALL - expected
    mods = dict(model.named_modules())
    assert all(type(mods[n]) in (nn.Conv2d, nn.Linear) for n in untouched)
    # NNI's own pruner with the same selection wraps the same Conv2d/Linear layers.
    probe = copy.deepcopy(small_cnn)
    pruner = L1NormPruner(probe, [{**selection, "sparse_ratio": 0.5}])
    nni_selected = {n for n in pruner._module_wrappers if n in ALL}
    pruner.unwrap_model()
    assert nni_selected == expected


def test_modules_that_cannot_be_factorised_are_ignored_unless_named(small_cnn):
    # ".*" also matches the root, containers, BatchNorm and ReLU (NNI's own L1NormPruner asserts
    # on those); only Conv2d/Linear layers are taken.
    model, report = LowRankCompressor(small_cnn, [{"op_names_re": [".*"], "method": "global_svd",
                                                   "rank_ratio": 0.25}], dummy_input=X).compress()
    assert {L.name for L in report.layers} == ALL == _factorised(model)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        LowRankCompressor(small_cnn, [{"op_names": ["body.1"], "method": "global_svd"}], dummy_input=X).compress()


def test_later_entry_overrides_and_groups_run_in_sequence(small_cnn):
    snap = snapshot(small_cnn)
    config_list = [
        {"op_types": ["Conv2d"], "exclude_op_names": ["stem"], "method": "global_svd", "rank_ratio": 0.25},
        {"op_names": ["body.5"], "method": "tucker2", "rank_ratio": 0.5},
        {"op_names": ["head.2"], "method": "global_svd", "rank_ratio": 0.25},  # same settings as entry 0
    ]
    comp = LowRankCompressor(small_cnn, config_list, dummy_input=X)
    assert [g.names for g in comp.groups] == [["body.0", "body.3", "body.8", "body.10", "head.2"], ["body.5"]]
    model, report = comp.compress()
    mods = dict(model.named_modules())
    assert isinstance(mods["body.5"], Tucker2Conv2d)
    assert all(isinstance(mods[n], LowRankConv2d) for n in ("body.0", "body.3", "body.8", "body.10"))
    assert isinstance(mods["head.2"], LowRankLinear) and type(mods["stem"]) is nn.Conv2d
    assert report.method == "global_svd+tucker2"
    assert [s["method"] for s in report.options["stages"]] == ["global_svd", "tucker2"]
    assert report.macs_before == measure_costs(small_cnn, X).macs
    assert report.macs_after == measure_costs(model, X).macs
    assert model(X).shape == (1, 10)
    assert_unchanged(small_cnn, snap)


@pytest.mark.parametrize("config,needle", [
    ({"op_types": ["Conv2d"], "sparse_ratio": 0.5}, "sparse_ratio"),
    ({"op_types": ["Conv2d"], "macs_ration": 3.0}, "did you mean 'macs_ratio'"),
    ({"op_types": ["Conv2d"], "method": "global_svd", "grid": [2, 2]}, "'grid'"),
    ({"op_types": ["Conv2d"], "method": "svd"}, "method must be one of"),
    ({"op_types": ["Conv2d"], "macs_ratio": 3.0, "params_ratio": 2.0}, "macs_ratio"),
    ({"op_types": ["Conv2d"], "macs_ratio": 0.5}, "macs_ratio"),
    ({"op_types": ["Conv2d"], "method": "global_svd", "energy": 2.0}, "energy"),
    ({"exclude_op_names": ["stem"], "method": "global_svd"}, "op_types"),
    ({"op_names": ["body.33"], "method": "global_svd"}, "body.33"),
    ({"op_types": ["BatchNorm2d"], "method": "global_svd"}, "selects no Conv2d/Linear"),
])
def test_bad_config_is_rejected_clearly(small_cnn, config, needle):
    snap = snapshot(small_cnn)
    with pytest.raises(ValueError, match=None) as info:
        LowRankCompressor(small_cnn, [config], dummy_input=X)
    assert needle in str(info.value)
    assert_unchanged(small_cnn, snap)


def test_model_scope_budget_needs_one_group(small_cnn):
    config_list = [{"op_types": ["Conv2d"], "method": "global_svd", "macs_ratio": 2.0, "budget_scope": "model"},
                   {"op_types": ["Linear"], "method": "tucker2", "rank_ratio": 0.5}]
    with pytest.raises(ValueError, match="single config group"):
        LowRankCompressor(small_cnn, config_list, dummy_input=X)


def test_macs_ratio_is_met(small_cnn):
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = {"op_types": ["Conv2d", "Linear"], "method": "global_svd", "macs_ratio": 3.0, "data_aware": True}
    model, report = LowRankCompressor(small_cnn, [config], calib=calib).compress()
    measured = measure_costs(small_cnn, X).macs / measure_costs(model, X).macs
    assert report.budget_met and abs(measured / 3.0 - 1) <= 0.02, measured
    assert report.calibration_samples == 8


def test_params_ratio_per_group(small_cnn):
    config = {"op_types": ["Conv2d"], "exclude_op_names": ["stem"], "method": "tucker2", "params_ratio": 2.0,
              "budget_scope": "targets"}
    model, report = LowRankCompressor(small_cnn, [config], dummy_input=X).compress()
    names = ["body.0", "body.3", "body.5", "body.8", "body.10"]
    before = sum(p.numel() for n in names for p in small_cnn.get_submodule(n).parameters())
    after = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    assert abs(before / after / 2.0 - 1) <= 0.02, before / after


# -- a third-party compressor, registered at run time, from a config_list ----------------------
class _SkippingSVD(GlobalSVD):
    """A third-party compressor: Global SVD with an option of its own, ``keep_dense`` (layer names
    it leaves as they are)."""

    name = "test_skipping_svd"

    def __init__(self, *, keep_dense: tuple[str, ...] | list[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.keep_dense = tuple(keep_dense)

    def plan(self, info, *args, **kwargs):
        if info.name in self.keep_dense:
            return "kept dense by keep_dense"
        return super().plan(info, *args, **kwargs)


class _ThirdPartyPlugin:
    @hookimpl
    def hsc_compressors(self) -> list[type]:
        return [_SkippingSVD]


def test_a_compressor_registered_at_run_time_is_usable_from_a_config_list(small_cnn):
    config = {"op_types": ["Conv2d"], "method": _SkippingSVD.name, "macs_ratio": 1.5, "keep_dense": ["body.3"]}
    with pytest.raises(ValueError, match="method must be one of"):
        LowRankCompressor(small_cnn, [config], dummy_input=X)  # not registered yet
    registry.register(_ThirdPartyPlugin(), name="test-third-party-compressor")
    try:
        with pytest.raises(ValueError, match="keep_dens"):  # its own options are checked like ours
            LowRankCompressor(small_cnn, [{**config, "keep_dens": ["body.3"]}], dummy_input=X)
        model, report = LowRankCompressor(small_cnn, [config], dummy_input=X).compress()
    finally:
        registry.get_plugin_manager().unregister(name="test-third-party-compressor")
    assert report.method == _SkippingSVD.name and report.budget_met
    layers = {L.name: L for L in report.layers}
    assert layers["body.3"].status != "factorised" and "keep_dense" in layers["body.3"].reason
    assert "body.3" not in _factorised(model) and len(_factorised(model)) >= 2
    assert isinstance(model.get_submodule("body.3"), nn.Conv2d)
    assert abs(measure_costs(small_cnn, X).macs / measure_costs(model, X).macs / 1.5 - 1) <= 0.02
    assert _SkippingSVD.name not in registry.available("compressor")  # unregistered again


# -- evaluator: calibration from its training data, fine-tuning with every new parameter -------
class _Recorder:
    """A TorchEvaluator over fixed random batches that records what the training loop sees."""

    def __init__(self, model: nn.Module, n_batches: int = 5) -> None:
        g = torch.Generator().manual_seed(3)
        self.data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
                     for _ in range(n_batches)]
        self.user_steps = 0
        self.optimizer_params: list[set[int]] = []
        optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.05)
        self.evaluator = TorchEvaluator(self.training_func, optimizer, self.training_step)

    def training_step(self, batch, model):
        self.user_steps += 1
        x, y = batch
        return F.cross_entropy(model(x), y)

    def training_func(self, model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        self.optimizer_params.append({id(p) for g in optimizers.param_groups for p in g["params"]})
        model.train()
        step = 0
        for _ in range(max_epochs or 1):
            for batch in self.data:
                optimizers.zero_grad()
                training_step(batch, model).backward()
                optimizers.step()
                step += 1
                if max_steps is not None and step >= max_steps:
                    return


def test_calibration_comes_from_the_evaluator(small_cnn):
    snap = snapshot(small_cnn)
    rec = _Recorder(small_cnn, n_batches=5)
    config = {"op_types": ["Conv2d"], "method": "global_svd", "macs_ratio": 2.0, "data_aware": True}
    model, report = LowRankCompressor(small_cnn, [config], rec.evaluator, calib_batches=3).compress()
    assert report.calibration_samples == 3 * 4  # 3 batches of 4 from the training loop
    assert rec.user_steps == 0  # batches were collected without running the user's training step
    assert report.budget_met
    assert_unchanged(small_cnn, snap)


def test_finetuning_trains_every_new_factor_parameter(small_cnn):
    snap = snapshot(small_cnn)
    rec = _Recorder(small_cnn)
    config = {"op_types": ["Conv2d", "Linear"], "method": "global_svd", "macs_ratio": 2.0, "data_aware": True}
    comp = LowRankCompressor(small_cnn, [config], rec.evaluator, calib_batches=2)
    model, report = comp.compress()
    factors = {n: p for n, p in model.named_parameters() if ".reduce." in n or ".expand." in n}
    assert factors
    before = {n: p.detach().clone() for n, p in factors.items()}
    finetune(model, rec.evaluator, max_steps=3)
    in_optimizer = rec.optimizer_params[-1]
    assert all(id(p) in in_optimizer for p in model.parameters())
    weights = [n for n in factors if n.endswith("weight")]
    assert weights and all(not torch.equal(factors[n], before[n]) for n in weights), \
        [n for n in weights if torch.equal(factors[n], before[n])]
    # The evaluator still builds the optimizer of the original model, all of it.
    rec.evaluator.bind_model(small_cnn)
    opt = rec.evaluator._optimizers[0]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in small_cnn.parameters()}
    rec.evaluator.unbind_model()
    assert_unchanged(small_cnn, snap)
    # compress(max_steps=...) fine-tunes too: the same compression then different weights.
    tuned, _ = LowRankCompressor(small_cnn, [config], rec.evaluator, calib_batches=2).compress(max_steps=2)
    assert any(not torch.equal(p, before[n]) for n, p in tuned.named_parameters() if n in before)
    assert_unchanged(small_cnn, snap)


def test_finetune_needs_an_evaluator(small_cnn):
    config = {"op_types": ["Linear"], "method": "global_svd", "rank_ratio": 0.5}
    with pytest.raises(ValueError, match="evaluator"):
        LowRankCompressor(small_cnn, [config], dummy_input=X).compress(max_steps=1)


# -- composition with NNI's pruners ----------------------------------------------------------
def test_l1norm_pruner_and_speedup_on_a_global_svd_model(small_cnn):
    config = {"op_types": ["Conv2d"], "exclude_op_names": ["stem"], "method": "global_svd", "rank_ratio": 0.5}
    model, _ = LowRankCompressor(small_cnn, [config], dummy_input=X).compress()
    check_speedup_compatible(model)
    macs = measure_costs(model, X).macs
    ranks = {n: model.get_submodule(n).reduce.out_channels for n in ("body.5", "body.8")}
    pruner = L1NormPruner(model, [{"op_names": ["body.0.expand", "body.5.expand"], "sparse_ratio": 0.25}])
    _, masks = pruner.compress()
    with pytest.raises(SpeedupIncompatibleError, match="unwrap_model"):
        speedup(model, torch.randn(2, 3, 32, 32), masks)
    pruner.unwrap_model()
    speedup(model, torch.randn(2, 3, 32, 32), masks, logger=_quiet_logger())
    # body.0 feeds a grouped conv: NNI's mask-conflict fix keeps some channels for the groups.
    assert 24 <= model.get_submodule("body.0.expand").out_channels < 32
    assert model.get_submodule("body.5.expand").out_channels == 48
    assert {n: model.get_submodule(n).reduce.out_channels for n in ranks} == ranks  # ranks untouched
    assert model.eval()(X).shape == (1, 10)
    assert measure_costs(model, X).macs < macs


def test_hsc_through_speedup_is_a_clear_error(small_cnn):
    calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    config = {"op_names": ["body.5"], "method": "hsc", "grid": [2, 2], "n_clusters": 2, "alternatives": False}
    model, report = LowRankCompressor(small_cnn, [config], calib=calib).compress()
    assert report.layers[0].module == "SpatioChannelConv2d"
    pruner = L1NormPruner(model, [{"op_names": ["stem"], "sparse_ratio": 0.25}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with pytest.raises(SpeedupIncompatibleError, match=r"'body\.5' \(SpatioChannelConv2d\)"):
        speedup(model, torch.randn(2, 3, 32, 32), masks)


# -- the example --------------------------------------------------------------------------------
def test_example_script_runs():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "nni_compress.py"), "--steps", "3",
                           "--per-class", "8"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [L for L in proc.stdout.splitlines() if L.startswith(("dense ", "global_svd 2x", "+ fine-tuned"))]
    assert len(lines) == 3, proc.stdout[-3000:]
    macs = [int(L.split()[-3].replace(",", "")) for L in lines]
    assert macs[0] > macs[1] > macs[2]
