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

from _factories import wide_cnn
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


def test_latency_ratio_budget_is_met_as_predicted_and_reported() -> None:
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
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
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
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
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
    dev = FakeDevice()
    before = dev.time(model, (3, 24, 24))
    ms = 0.55 * before
    res = compress(model, "tucker2", calib=x, budget=Budget(ms=ms), cost_model=dev, progress=False)
    assert res.report.latency["predicted_after_ms"] <= ms * 1.02
    assert res.report.budget["ms"] == ms and res.report.budget["metric"] == "latency"


@pytest.mark.parametrize("method", ["global_svd", "tucker2", "hsc"])
def test_every_compressor_takes_a_latency_budget(method: str) -> None:
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
    res = compress(model, method, calib=x, budget="latency=1.6x", cost_model=FakeDevice(), progress=False)
    assert res.report.budget_met
    with torch.no_grad():
        assert res.model(x).shape == (8, 10)


def test_impossible_latency_budget_is_explained_and_model_untouched() -> None:
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
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

    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
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
        compress(wide_cnn(), "global_svd", budget=Budget(2.0, metric="latency"), cost_model="fast",
                 example_input=torch.randn(1, 3, 24, 24))


class FreeLaunches(FakeDevice):
    """A device where only MACs cost time (a big batch on a big accelerator, roughly)."""

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        self.calls += 1
        return measure_costs(module, torch.zeros(1, *input_shape)).macs * MS_PER_MAC * self.batch


def _forms(res) -> dict[str, str]:
    return {L.name: L.details["form"] for L in res.report.layers if L.status == "factorised" and "form" in L.details}


def _two_halves(n: int = 8, c: int = 8, hw: int = 16) -> torch.Tensor:
    """Images whose left half uses the first half of the channels and the right half the others:
    each half's conv outputs span few directions (4 channels × 9 offsets < 48), the whole map's all
    of them, and no input projection (Tucker-2's) can drop a channel without losing half a region."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, c, hw, hw)
    x[:, : c // 2, :, : hw // 2] = torch.randn(n, c // 2, hw, hw // 2, generator=g)
    x[:, c // 2:, :, hw // 2:] = torch.randn(n, c - c // 2, hw, hw - hw // 2, generator=g)
    return x


@pytest.mark.parametrize("side", ["input", "output"])
def test_hsc_splits_into_regions_only_where_measured_time_pays(side: str) -> None:
    """Launch-bound device: the many small kernels of 2×2 regions cost more time than their
    accuracy is worth, so the conv takes a one-region form. MAC-bound device: regions cost
    nothing extra, and their lower error (each half needs fewer ranks) wins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 48, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    x = _two_halves()
    own = {"baselines": (), "data_free_baselines": False}  # HSC's own form choice, not its baselines'
    bound = compress(model, "hsc", calib=x, budget=Budget(1.6, metric="latency"), cost_model=FakeDevice(),
                     channel_side=side, progress=False, **own)
    forms = _forms(bound)
    assert forms and all(f.startswith("1 region") for f in forms.values()), forms
    assert bound.report.budget_met
    free = compress(model, "hsc", calib=x, budget=Budget(1.6, metric="latency"), cost_model=FreeLaunches(),
                    channel_side=side, progress=False, **own)
    assert _forms(free)["0"].startswith("4 regions"), _forms(free)
    assert free.report.budget_met
    # The report keeps every form's measured curve and names the chosen one.
    for name, form in forms.items():
        entry = bound.report.latency["layers"][name]
        assert entry["form"] == form and len(entry["forms"]) >= 2
        assert entry["curve_macs_ms"] == entry["forms"][form]
        assert f"{name}: {form}" in bound.report.table()
    with torch.no_grad():
        assert bound.model(x).shape == free.model(x).shape == model(x).shape


def test_hsc_alternatives_off_keeps_the_partitioners_form_and_mac_budgets_never_time() -> None:
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
    fixed = compress(model, "hsc", calib=x, budget=Budget(1.3, metric="latency"), cost_model=FakeDevice(),
                     alternatives=False, progress=False)
    assert all(f.startswith("4 regions") for n, f in _forms(fixed).items() if n in ("2", "4"))
    assert all("forms" not in e for e in fixed.report.latency["layers"].values())
    macs = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False, alternatives=False)
    assert all(f.startswith("4 regions") for n, f in _forms(macs).items() if n in ("2", "4"))
    assert macs.report.latency is None  # a MAC budget is never timed


def test_choose_forms_follows_the_budget() -> None:
    """Two forms of one layer: A is cheap but plateaus at a high error, B costs a fixed overhead
    but reaches a lower error. A tight budget must take A, a loose one B."""
    from hsc_plugin.calibration import LayerInfo
    from hsc_plugin.form_choice import choose_forms, frontier
    from hsc_plugin.plan import LayerPlan, RankBlock

    class Toy(LayerPlan):
        def __init__(self, energies: list[float], overhead: float, per_rank: float) -> None:
            info = LayerInfo("toy", nn.Conv2d(4, 4, 3), (4, 8, 8), (4, 6, 6))
            super().__init__(info, [RankBlock(energies, min_rank=1)], {"macs": 100.0}, total_energy=10.0)
            self.overhead, self.per_rank = overhead, per_rank

        def factorised_cost(self, ranks: list[int], metric: str) -> float:
            return self.overhead + self.per_rank * ranks[0]

        def build(self, ranks: list[int]) -> nn.Module:
            raise NotImplementedError

    a = Toy([5.0, 1.0, 1.0, 1.0], overhead=0.0, per_rank=10.0)   # error 0.5 at cost 10
    b = Toy([9.0, 0.5, 0.25, 0.25], overhead=25.0, per_rank=10.0)  # error 0.1 at cost 35
    pts = frontier(b, "macs")
    assert [c for c, _ in pts] == sorted(c for c, _ in pts) and pts[-1] == (100.0, 0.0)
    assert choose_forms([[a, b]], "macs", 20.0) == [0]
    assert choose_forms([[a, b]], "macs", 40.0) == [1]
    assert choose_forms([[a, b]], "macs", None) == [0]
    assert choose_forms([[a]], "macs", 40.0) == [0]


def test_channels_last_cost_model_times_a_copy_in_nhwc() -> None:
    """Timing in channels_last must not convert the caller's module (a layer of the user's model)."""
    seen: list[bool] = []
    conv = nn.Conv2d(8, 8, 3, padding=1)
    cm = LatencyCostModel(batch=2, runs=1, warmup=0, channels_last=True)
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    ms = cm.time(conv, (8, 6, 6))
    hook.remove()
    assert ms > 0 and seen and all(seen)  # inputs were NHWC (the hook travels with the copy)
    assert conv.weight.is_contiguous()  # the caller's layer is still NCHW
    assert cm.config()["channels_last"] is True
    with pytest.raises(ValueError):
        LatencyCostModel(batch=0)


def test_a_budget_met_only_at_minimum_ranks_warns_and_says_so() -> None:
    """Asking for nearly all a device can give leaves layers at rank 1: the budget is met, but the
    user is told which layers were floored instead of finding out from the accuracy."""
    model, x = wide_cnn(), torch.randn(8, 3, 24, 24)
    with pytest.warns(UserWarning, match="minimum rank"):
        res = compress(model, "global_svd", calib=x, budget=Budget(30.0, scope="targets", tolerance=0.9),
                       data_aware=True, progress=False)
    floored = [L for L in res.report.layers if "minimum rank" in L.reason]
    assert floored and all(L.status == "factorised" and set(L.ranks.values()) == {1} for L in floored)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a comfortable budget does not warn
        compress(model, "global_svd", calib=x, budget=Budget(1.5), data_aware=True, progress=False)
