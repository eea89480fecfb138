"""tune_pointwise: 1×1 convs run as a matmul where the device's clock says it is faster, with the
untuned model's outputs, parameters and behaviour everywhere else."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from hsc_plugin import Budget, LatencyCostModel, compress, load, measure_costs, save, tune_pointwise
from hsc_plugin import tuning
from hsc_plugin.modules import FactorisedModule
from hsc_plugin.tuning import PointwiseConv2d

from _factories import FORMS, factorise_convs, tiny_cnn, wide_cnn

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _tucker2() -> nn.Module:
    return compress(tiny_cnn().eval(), "tucker2", calib=X, budget="2x", progress=False,
                    measure_error=False).model.eval()


def _dense_pointwise() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 1), nn.ReLU(),
                         nn.Conv2d(32, 4, 1, bias=False)).eval()


MODELS = {"tucker2": _tucker2, "dense 1x1": _dense_pointwise,
          **{form: lambda form=form: factorise_convs(tiny_cnn(), form).eval() for form in FORMS}}


def _pointwise(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, PointwiseConv2d)]


@pytest.mark.parametrize("name", list(MODELS))
def test_matmul_execution_gives_the_same_outputs_and_leaves_the_model(name):
    model = MODELS[name]()
    snap = snapshot(model)
    tuned = tune_pointwise(model, X[:2], execution="matmul")
    assert_unchanged(model, snap)
    eligible = tuned.tuned_pointwise
    assert eligible and all(r["execution"] == "matmul" for r in eligible)
    assert len(_pointwise(tuned)) == len(eligible)
    for x in (X, X[:1], torch.randn(3, 3, 40, 24)):  # other batches and map sizes than the example
        with torch.inference_mode():
            torch.testing.assert_close(tuned(x), model(x), rtol=1e-5, atol=1e-5)
    assert tuned.state_dict().keys() == model.state_dict().keys()


class _FakeDevice:
    """A clock that only moves when a 1×1 conv runs: ``conv`` per conv kernel call, ``matmul`` per matmul."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: nn.Module, conv: float, matmul: float) -> None:
        self.t = 0.0
        real = tuning._matmul

        def timed_matmul(c, x):
            self.t += matmul
            return real(c, x)

        monkeypatch.setattr(tuning, "_matmul", timed_matmul)
        for m in model.modules():
            if type(m) is nn.Conv2d and m.kernel_size == (1, 1):
                m.register_forward_pre_hook(lambda *_: setattr(self, "t", self.t + conv))

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("matmul, margin, switched", [(0.5, 0.1, True), (0.95, 0.1, False), (0.95, 0.0, True),
                                                      (2.0, 0.1, False)])
def test_auto_follows_the_measurement(monkeypatch, matmul, margin, switched):
    model = _tucker2()
    clock = _FakeDevice(monkeypatch, model, conv=1.0, matmul=matmul)
    tuned = tune_pointwise(model, X[:1], clock=clock, runs=5, margin=margin)
    records = tuned.tuned_pointwise
    assert records
    for r in records:
        assert r["conv_ms"] == pytest.approx(1000.0) and r["matmul_ms"] == pytest.approx(1000.0 * matmul)
        assert r["execution"] == ("matmul" if switched else "conv")
    assert len(_pointwise(tuned)) == (len(records) if switched else 0)


def test_grad_mode_and_channels_last_inputs_run_the_conv(monkeypatch):
    calls = []
    real = tuning._matmul
    monkeypatch.setattr(tuning, "_matmul", lambda c, x: calls.append(1) or real(c, x))
    conv = nn.Conv2d(6, 16, 1).eval()
    layer = tune_pointwise(nn.Sequential(conv).eval(), torch.randn(2, 6, 8, 8), execution="matmul")[0]
    assert isinstance(layer, PointwiseConv2d)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    y = layer(x)  # grad mode: the conv, as torch-pruning and training trace it
    assert "Convolution" in type(y.grad_fn).__name__ and not calls
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        layer(x.contiguous(memory_format=torch.channels_last))
        assert not calls
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x[:, :, 1:7, 2:5]), conv(x[:, :, 1:7, 2:5]), rtol=1e-5, atol=1e-6)  # a crop
    assert len(calls) == 2


def test_channels_last_example_keeps_every_conv():
    model = _tucker2().to(memory_format=torch.channels_last)
    tuned = tune_pointwise(model, X[:1].contiguous(memory_format=torch.channels_last), execution="matmul")
    assert tuned.tuned_pointwise and all(r["execution"] == "conv" for r in tuned.tuned_pointwise)
    assert not _pointwise(tuned)


def test_state_dict_loads_either_way_saves_and_scripts(tmp_path):
    model = _tucker2()
    tuned = tune_pointwise(model, X[:1], execution="matmul")
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(tuned.state_dict(), strict=True)
    tuned.load_state_dict(model.state_dict(), strict=True)
    save(tuned, tmp_path)  # the deployment choice is not saved: weights and structure are
    loaded = load(tmp_path, tiny_cnn().eval()).eval()
    scripted = torch.jit.script(tuned)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(X), model(X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(X), model(X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.trace(tuned, X[:1])(X), model(X), rtol=1e-5, atol=1e-5)


def test_real_clock_times_every_layer():
    model = _tucker2()
    tuned = tune_pointwise(model, X[:2], runs=3)
    records = tuned.tuned_pointwise
    assert records and all(r["conv_ms"] > 0 and r["matmul_ms"] > 0 for r in records)
    assert len(_pointwise(tuned)) == sum(r["execution"] == "matmul" for r in records)
    with torch.inference_mode():
        torch.testing.assert_close(tuned(X), model(X), rtol=1e-5, atol=1e-5)


def test_inplace_tunes_the_given_model():
    model = _tucker2()
    out = tune_pointwise(model, X[:1], execution="matmul", inplace=True)
    assert out is model and _pointwise(model)


def test_torch_pruning_prunes_a_tuned_model():
    tp = pytest.importorskip("torch_pruning")
    from hsc_plugin.adapters.torch_pruning import tp_kwargs

    model = tune_pointwise(_tucker2(), X[:1], execution="matmul")
    before = [p.out_channels for p in _pointwise(model)]
    kw = tp_kwargs(model)
    kw["ignored_layers"].append(model[-1])
    tp.pruner.MetaPruner(model, X[:1], importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.3, **kw).step()
    after = [p.out_channels for p in _pointwise(model)]  # the same layers, still tuned
    assert len(after) == len(before) and any(a < b for a, b in zip(after, before))
    assert all(p.weight.shape[0] == p.out_channels for p in _pointwise(model))
    with torch.inference_mode():
        y = model(X)
    assert y.shape == (4, 10) and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, error", [({"execution": "fast"}, ValueError), ({"runs": 0}, ValueError),
                                           ({"example": [X[:1]]}, TypeError)])
def test_bad_options_are_refused_before_anything_changes(kwargs, error):
    model = _tucker2()
    snap = snapshot(model)
    args = {"example": X[:1], **kwargs}
    with pytest.raises(error):
        tune_pointwise(model, args.pop("example"), inplace=True, **args)
    assert_unchanged(model, snap)


def test_train_mode_is_refused():
    with pytest.raises(RuntimeError, match="eval"):
        tune_pointwise(_tucker2().train(), X[:1])


def _matmul_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timing of the tuner says the matmul takes half the conv's time."""
    monkeypatch.setattr(tuning, "round_robin", lambda calls, **_: {
        "conv": {"median_ms": 1.0}, "matmul": {"median_ms": 0.5}})


class _TunedFake(LatencyCostModel):
    """A deterministic device on which a tuned 1×1 factor costs half a launch."""

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        m = self.deployed(module, input_shape)
        launches = sum(0.5 if isinstance(x, PointwiseConv2d) else 1.0 for x in m.modules()
                       if isinstance(x, (nn.Conv2d, nn.Linear)))
        return launches * 0.05 + measure_costs(m, torch.zeros(1, *input_shape)).macs * 1e-6 * self.batch


def test_cost_model_times_a_tuned_copy_of_the_factorised_layers(monkeypatch):
    _matmul_faster(monkeypatch)
    model = _tucker2()
    snap = snapshot(model)
    cm = LatencyCostModel(2, tune_pointwise=True)
    deployed = cm.deployed(model, (3, 32, 32))
    assert deployed is not model
    assert_unchanged(model, snap)
    inside = {f"{n}.{c}" for n, m in deployed.named_modules() if isinstance(m, FactorisedModule)
              for c, _ in m.named_modules() if c}
    names = {n for n, m in deployed.named_modules() if isinstance(m, PointwiseConv2d)}
    assert names and names <= inside
    dense = _dense_pointwise()
    assert not _pointwise(cm.deployed(dense, (3, 8, 8)))  # the model's own layers are left alone
    assert LatencyCostModel(2).deployed(model, (3, 32, 32)) is model
    assert LatencyCostModel(2, tune_pointwise=True, channels_last=True).deployed(model, (3, 32, 32)) is model
    with pytest.raises(ValueError, match="ONNX Runtime"):
        LatencyCostModel(2, tune_pointwise=True, runtime="onnxruntime")


def test_a_tuned_model_is_tuned_again_only_for_other_settings(monkeypatch):
    _matmul_faster(monkeypatch)
    calls = []
    real = tuning.tune_pointwise
    monkeypatch.setattr(tuning, "tune_pointwise", lambda *a, **k: calls.append(k) or real(*a, **k))
    cm = LatencyCostModel(2, tune_pointwise=True)
    deployed = cm.deployed(_tucker2(), (3, 32, 32))
    assert len(calls) == 1
    assert cm.deployed(deployed, (3, 32, 32)) is deployed  # the pipeline times its tuned result as it is
    assert len(calls) == 1
    for other in (LatencyCostModel(4, tune_pointwise=True), LatencyCostModel(2, tune_pointwise=True, threads=1),
                  LatencyCostModel(2, tune_pointwise=True, runs=3)):
        assert other.deployed(deployed, (3, 32, 32)) is not deployed
    assert len(calls) == 4


def test_latency_budget_returns_the_model_it_timed(monkeypatch):
    _matmul_faster(monkeypatch)
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
    res = compress(model, "tucker2", calib=x, budget=Budget(1.5, metric="latency"), data_aware=True,
                   cost_model=_TunedFake(batch=1, tune_pointwise=True), progress=False)
    names = [n for n, m in res.model.named_modules() if isinstance(m, PointwiseConv2d)]
    assert names and sorted(res.report.latency["pointwise_matmul"]) == sorted(names)
    assert "run as a matmul" in res.report.table()
    with torch.inference_mode():
        y_matmul = res.model(x)
    torch.testing.assert_close(res.model(x), y_matmul, rtol=1e-5, atol=1e-5)  # grad mode: the convs
