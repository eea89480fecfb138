"""Latency budgets: the allocation follows the device's measured cost model, not MACs.

Wall-clock time is machine-dependent, so these tests plug in a deterministic cost model (a
subclass of ``LatencyCostModel`` overriding ``time``): every kernel launch costs a fixed
overhead plus time proportional to its MACs. That is the shape real CPU/GPU timings have, and it
makes the expected decisions checkable.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, BudgetError, LatencyCostModel, compress, measure_costs

from conftest import assert_unchanged, snapshot

LAUNCH_MS = 0.02
MS_PER_MAC = 1e-7


class FakeDevice(LatencyCostModel):
    """Time = launches × overhead + MACs × rate (per sample × batch)."""

    def __init__(self, **kw) -> None:
        super().__init__(batch=1, **kw)
        self.calls = 0

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        self.calls += 1
        launches = sum(1 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        macs = measure_costs(module, torch.zeros(1, *input_shape)).macs
        return launches * LAUNCH_MS + macs * MS_PER_MAC * self.batch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()


def test_latency_ratio_budget_is_met_as_predicted_and_reported() -> None:
    model, x = _model(), torch.randn(8, 3, 24, 24)
    snap = snapshot(model)
    dev = FakeDevice()
    res = compress(model, "global_svd", calib=x, budget=Budget(1.8, metric="latency"), data_aware=True,
                   cost_model=dev, progress=False)
    lat = res.report.latency
    assert lat is not None and dev.calls > 0
    assert lat["before_ms"] == pytest.approx(dev.time(model, (3, 24, 24)))
    assert lat["before_ms"] / lat["predicted_after_ms"] == pytest.approx(1.8, rel=0.02)
    assert res.report.budget_met and res.report.achieved_ratio == pytest.approx(1.8, rel=0.02)
    # The fake device is exactly additive, so the measured time of the result is the prediction.
    assert lat["after_ms"] == pytest.approx(lat["predicted_after_ms"], rel=1e-6)
    assert lat["after_ms"] == pytest.approx(dev.time(res.model, (3, 24, 24)), rel=1e-9)
    assert_unchanged(model, snap)
    assert "latency" in res.report.table()


def test_layers_that_do_not_pay_in_time_stay_dense() -> None:
    """Linear layers are launch-bound on the fake device: two launches never beat one."""
    model, x = _model(), torch.randn(8, 3, 24, 24)
    res = compress(model, "global_svd", calib=x, budget=Budget(1.5, metric="latency"), data_aware=True,
                   cost_model=FakeDevice(), progress=False)
    layers = {L.name: L for L in res.report.layers}
    for name in ("8", "10"):
        assert layers[name].status == "dense"
        assert "does not pay in measured time" in layers[name].reason
        assert isinstance(res.model[int(name)], nn.Linear)
    # With a MAC budget the same layers would be judged by MACs alone.
    assert any(L.status == "factorised" for L in res.report.layers)


def test_budget_in_milliseconds_is_a_ceiling() -> None:
    model, x = _model(), torch.randn(8, 3, 24, 24)
    dev = FakeDevice()
    before = dev.time(model, (3, 24, 24))
    ms = 0.55 * before
    res = compress(model, "tucker2", calib=x, budget=Budget(ms=ms), cost_model=dev, progress=False)
    assert res.report.latency["predicted_after_ms"] <= ms * 1.02
    assert res.report.budget["ms"] == ms and res.report.budget["metric"] == "latency"


@pytest.mark.parametrize("method", ["global_svd", "tucker2", "hsc"])
def test_every_compressor_takes_a_latency_budget(method: str) -> None:
    model, x = _model(), torch.randn(8, 3, 24, 24)
    res = compress(model, method, calib=x, budget="latency=1.6x", cost_model=FakeDevice(), progress=False)
    assert res.report.budget_met
    with torch.no_grad():
        assert res.model(x).shape == (8, 10)


def test_impossible_latency_budget_is_explained_and_model_untouched() -> None:
    model, x = _model(), torch.randn(8, 3, 24, 24)
    snap = snapshot(model)
    with pytest.raises(BudgetError, match="Cannot reach 20x lower latency"):
        compress(model, "global_svd", calib=x, budget=Budget(20.0, metric="latency"), cost_model=FakeDevice(),
                 progress=False)
    assert_unchanged(model, snap)


def test_cost_model_curve_is_monotone_in_macs() -> None:
    """The interpolated time never decreases when ranks grow (noise cannot invert the order)."""
    from hsc_plugin.compressors.global_svd import GlobalSVD  # noqa: F401  (registers the plan type)

    class Noisy(FakeDevice):
        def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
            t = super().time(module, input_shape)
            return t * (0.5 if self.calls % 2 else 1.0)  # every other timing "got lucky"

    model, x = _model(), torch.randn(8, 3, 24, 24)
    res = compress(model, "global_svd", calib=x, budget=Budget(1.5, metric="latency"), cost_model=Noisy(),
                   progress=False)
    for layer in res.report.latency["layers"].values():
        ms = [p[1] for p in layer["curve_macs_ms"]]
        assert ms == sorted(ms)


def test_latency_budget_parsing_and_validation() -> None:
    assert Budget.parse("4.5ms") == Budget(ms=4.5)
    assert Budget.parse("latency=2x") == Budget(2.0, metric="latency")
    assert Budget(ms=3).metric == "latency"
    with pytest.raises(ValueError, match="not both"):
        Budget(2.0, ms=3.0)
    with pytest.raises(ValueError, match="milliseconds"):
        Budget(ms=-1.0)
    with pytest.raises(ValueError, match="latency budget"):
        Budget(ms=2.0, metric="params")
    with pytest.raises(TypeError, match="cost_model"):
        compress(_model(), "global_svd", budget=Budget(2.0, metric="latency"), cost_model="fast",
                 example_input=torch.randn(1, 3, 24, 24))
