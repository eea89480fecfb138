"""The closed latency loop: the whole compressed model measured, the selection re-aimed until the
measured speed-up lands in [target, 1.1 × target] (:mod:`hsc_plugin.latency_loop`).

The fake devices here are deterministic and deliberately *not* additive: a layer timed alone does
not cost what it costs inside the whole model, by a known rule, so the per-layer prediction misses
the whole model's time by a known amount. No wall clock is involved.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hsc_plugin.pipeline as pipeline
from hsc_plugin import Budget, BudgetError, LatencyCostModel, compress, measure_costs
from hsc_plugin.latency_loop import WINDOW

from _factories import wide_cnn
from conftest import assert_unchanged, snapshot

RATE = 1e-7  # ms per MAC


class Skewed(LatencyCostModel):
    """Time = launches × launch cost + MACs × rate. A whole model (anything holding a ``Flatten``)
    pays ``launch_model`` per launch plus a fixed ``overhead``; a layer timed alone pays
    ``launch_alone`` per launch and everything times ``alone``."""

    def __init__(self, launch_alone: float = 0.02, launch_model: float = 0.02, alone: float = 1.0,
                 overhead: float = 0.0) -> None:
        super().__init__(batch=1)
        self.launch_alone, self.launch_model, self.alone, self.overhead = launch_alone, launch_model, alone, overhead
        self.whole = 0  # whole-model timings

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        launches = sum(1 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        macs = measure_costs(module, torch.zeros(1, *input_shape)).macs * RATE
        if any(isinstance(m, nn.Flatten) for m in module.modules()):
            self.whole += 1
            return launches * self.launch_model + macs + self.overhead
        return self.alone * (launches * self.launch_alone + macs)


def fast_in_model() -> Skewed:
    """The paper's case: a factorised layer's extra launches cost far less inside the model than
    alone, so the model measures faster than predicted (the budget overshoots)."""
    return Skewed(launch_alone=0.1, launch_model=0.01)


def slow_in_model() -> Skewed:
    """Layers alone at 2× their in-model time and a fixed per-model overhead the curves miss: the
    model measures slower than predicted (the budget is missed)."""
    return Skewed(alone=2.0, overhead=0.5)


X = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(1))
SHAPE = (3, 24, 24)


def _speedup(res) -> float:
    lat = res.report.latency
    return lat["before_ms"] / lat["after_ms"]


def _ranks(res) -> dict[str, dict[str, int]]:
    return {L.name: L.ranks for L in res.report.layers}


@pytest.mark.parametrize("device, ratio, misses", [(fast_in_model, 2.0, "over"), (slow_in_model, 1.6, "under")])
@pytest.mark.parametrize("method", ["global_svd", "tucker2"])
def test_closed_loop_lands_where_the_open_loop_misses(device, ratio: float, misses: str, method: str) -> None:
    model = wide_cnn()
    snap = snapshot(model)
    budget = Budget(ratio, metric="latency")
    opened = compress(model, method, calib=X, budget=budget, cost_model=device(), latency_rounds=0, progress=False)
    if misses == "over":
        assert _speedup(opened) > WINDOW * ratio  # accuracy given away
    else:
        assert _speedup(opened) < ratio  # budget missed, though predicted met
    dev = device()
    closed = compress(model, method, calib=X, budget=budget, cost_model=dev, progress=False)
    assert ratio <= _speedup(closed) <= WINDOW * ratio
    lat = closed.report.latency
    rounds = lat["rounds"]
    assert 2 <= len(rounds) <= 1 + 3  # the first allocation, then at most 3 re-aimed rounds
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    assert not (ratio <= rounds[0]["speedup"] <= WINDOW * ratio)  # the first round did miss
    kept = [r for r in rounds if r["kept"]]
    assert len(kept) == 1 and kept[0] is rounds[-1]
    assert lat["after_ms"] == pytest.approx(kept[0]["measured_ms"], rel=1e-9)
    assert lat["predicted_after_ms"] == pytest.approx(kept[0]["predicted_ms"], rel=1e-9)
    for r in rounds:
        assert r["speedup"] == pytest.approx(lat["before_ms"] / r["measured_ms"])
        assert r["target_ms"] > 0 and r["predicted_ms"] > 0
    assert closed.report.budget_met and closed.report.achieved_ratio == pytest.approx(_speedup(closed))
    assert "closed loop: " in closed.report.table() and f"kept round {kept[0]['round']}" in closed.report.table()
    # Whole-model timings: the dense model; per round the dense and the compressed model, paired;
    # a confirming pair for each round that met the ceiling; the final measurement. Layers are not re-timed.
    assert dev.whole == 1 + 2 * len(rounds) + 2 * sum(r["confirmed"] for r in rounds) + 1
    assert all(r["confirmed"] == (r["speedup"] >= ratio / (1 + closed.report.budget["tolerance"])) for r in rounds)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert closed.model(X).shape == (8, 10)


def test_too_fast_gives_accuracy_back() -> None:
    """Overshooting rounds are less accurate: the kept round has more rank (less predicted error)."""
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(2.0, metric="latency"), cost_model=fast_in_model(),
                   progress=False)
    rounds = res.report.latency["rounds"]
    assert rounds[0]["speedup"] > WINDOW * 2.0 and rounds[-1]["error"] < rounds[0]["error"]


def test_milliseconds_budget_lands_under_its_ceiling() -> None:
    dev = slow_in_model()
    before = dev.time(wide_cnn(), SHAPE)
    ms = before / 1.6
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(ms=ms), cost_model=dev, progress=False)
    after = res.report.latency["after_ms"]
    assert ms / WINDOW <= after <= ms
    assert res.report.budget_met


def test_every_candidate_allocation_meets_the_budget_as_measured(monkeypatch) -> None:
    """HSC compares several allocations (its own and its baselines'): each goes through the loop."""
    seen: dict[str, object] = {}
    real = pipeline.select

    def spy(compressor, prep, allocations):
        seen.update(allocations)
        return real(compressor, prep, allocations)

    monkeypatch.setattr(pipeline, "select", spy)
    dev = slow_in_model()
    ratio = 1.6
    res = compress(wide_cnn(), "hsc", calib=X, budget=Budget(ratio, metric="latency"), cost_model=dev, progress=False)
    before = res.report.latency["before_ms"]
    assert len(seen) >= 3
    for name, alloc in seen.items():
        assert alloc.rounds and alloc.measured_ms is not None, name
        assert ratio <= before / alloc.measured_ms <= WINDOW * ratio, (name, alloc.rounds)
    assert ratio <= _speedup(res) <= WINDOW * ratio


def test_unreachable_as_measured_is_a_budget_error_with_both_numbers_and_model_untouched() -> None:
    """A per-model overhead larger than the budget's ceiling: predicted to fit (the open loop takes
    it), measured never (the closed loop refuses, saying what was asked and what was measured)."""
    model = wide_cnn()
    snap = snapshot(model)
    budget = Budget(3.0, metric="latency")
    opened = compress(model, "global_svd", calib=X, budget=budget, progress=False, latency_rounds=0,
                      cost_model=Skewed(alone=2.0, overhead=6.0))
    assert opened.report.budget_met and _speedup(opened) < 2.0  # "met" as predicted only
    with pytest.raises(BudgetError, match=r"as measured: the target is [0-9.]+ ms, the fastest of \d+ allocation "
                                          r"round\(s\) measured [0-9.]+ ms"):
        compress(model, "global_svd", calib=X, budget=budget, progress=False,
                 cost_model=Skewed(alone=2.0, overhead=6.0))
    assert_unchanged(model, snap)
    with pytest.raises(BudgetError):
        compress(model, "global_svd", calib=X, budget=budget, progress=False, inplace=True,
                 cost_model=Skewed(alone=2.0, overhead=6.0))
    assert_unchanged(model, snap)


def test_a_budget_the_curves_refuse_is_measured_before_it_is_refused() -> None:
    """The layers alone predict at most ~5.5x (their extra launches cost 10x more alone than in the
    model): the open loop refuses 8x on the curves' word, the closed loop measures the fastest
    allocation whole, finds it faster than asked and re-aims into the window."""
    budget = Budget(8.0, metric="latency")
    with pytest.raises(BudgetError, match=r"Cannot reach 8x lower latency \(model\).* at minimum rank is [0-9.]+x"):
        compress(wide_cnn(), "global_svd", calib=X, budget=budget, cost_model=fast_in_model(), latency_rounds=0,
                 progress=False)
    model = wide_cnn()
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fastest allocation is a probe: not kept, not warned about
        res = compress(model, "global_svd", calib=X, budget=budget, cost_model=fast_in_model(), progress=False)
    assert 8.0 <= _speedup(res) <= WINDOW * 8.0 and res.report.budget_met
    rounds = res.report.latency["rounds"]
    first = rounds[0]
    assert res.report.latency["predicted_before_ms"] / first["predicted_ms"] < 8.0  # predicted out of reach ...
    assert first["speedup"] > WINDOW * 8.0  # ... measured faster than asked: accuracy was given back
    assert first["fastest"] and not any(r["fastest"] for r in rounds[1:])
    assert f"{first['speedup']:.2f}x (fastest)" in res.report.table()
    assert rounds[-1]["kept"] and rounds[-1]["error"] < first["error"]
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["global_svd", "tucker2"])
def test_a_re_aimed_goal_below_the_curves_floor_measures_the_fastest_allocation(method: str) -> None:
    """6.6x on the slow device: the first rounds miss, the re-aimed goal is below what minimum ranks
    predict, so the loop measures the fastest allocation (it used to step halfway back and refuse),
    and that one meets the ceiling."""
    with pytest.warns(UserWarning, match=r"6.6x lower latency is met only with \d+ layer\(s\) at their minimum rank"):
        res = compress(wide_cnn(), method, calib=X, budget=Budget(6.6, metric="latency"), cost_model=slow_in_model(),
                       progress=False)
    rounds = res.report.latency["rounds"]
    last = rounds[-1]
    assert last["kept"] and last["fastest"] and last["target_ms"] < last["predicted_ms"]  # asked below the floor
    assert 6.6 <= _speedup(res) and res.report.budget_met
    assert all(r["speedup"] < 6.6 for r in rounds[:-1])


def test_a_budget_out_of_reach_as_predicted_and_as_measured_says_both() -> None:
    """Layers alone at 2x their in-model time would let 3x look reachable; a per-model overhead the
    curves cannot see makes it unreachable whole. 20x is out of reach on both counts: the refusal
    gives the curves' best and the measured best, and the model is untouched."""
    model = wide_cnn()
    snap = snapshot(model)
    dev = slow_in_model()
    with pytest.raises(BudgetError, match=r"Cannot reach 20x lower latency .* at minimum rank is [0-9.]+x; measured "
                                          r"whole, the fastest allocation is [0-9.]+x faster") as err:
        compress(model, "global_svd", calib=X, budget=Budget(20.0, metric="latency"), cost_model=dev, progress=False)
    best = float(str(err.value).split("the fastest allocation is ")[1].split("x")[0])
    assert 1.0 < best < 20.0
    assert dev.whole == 1 + 2  # the dense model, then one paired timing of the fastest allocation: no more rounds
    assert_unchanged(model, snap)


def test_open_loop_measures_nothing_more() -> None:
    """latency_rounds=0 is the per-layer prediction alone: no rounds, no extra whole-model timing,
    the budget judged as predicted."""
    dev = slow_in_model()
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(1.6, metric="latency"), cost_model=dev,
                   latency_rounds=0, progress=False)
    lat = res.report.latency
    assert "rounds" not in lat and "closed loop" not in res.report.table()
    assert dev.whole == 2  # the dense model before, the result after
    assert res.report.achieved_ratio == pytest.approx(lat["predicted_before_ms"] / lat["predicted_after_ms"])


def test_an_exact_prediction_takes_one_round() -> None:
    """On an additive device the first allocation already lands: nothing is re-aimed."""
    dev = Skewed()
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(1.8, metric="latency"), cost_model=dev,
                   progress=False)
    rounds = res.report.latency["rounds"]
    assert len(rounds) == 1 and rounds[0]["kept"]
    assert rounds[0]["measured_ms"] == pytest.approx(rounds[0]["predicted_ms"], rel=1e-9)
    assert 1.8 <= _speedup(res) <= WINDOW * 1.8


def test_mac_and_param_budgets_and_target_scope_are_untouched() -> None:
    for budget in (Budget(2.0), Budget(2.0, metric="params")):
        dev = Skewed()
        a = compress(wide_cnn(), "global_svd", calib=X, budget=budget, cost_model=dev, progress=False)
        b = compress(wide_cnn(), "global_svd", calib=X, budget=budget, cost_model=dev, latency_rounds=0, progress=False)
        assert _ranks(a) == _ranks(b) and a.report.latency is None and dev.whole == 0
    targets = Budget(1.6, metric="latency", scope="targets")
    a = compress(wide_cnn(), "global_svd", calib=X, budget=targets, cost_model=slow_in_model(), progress=False)
    b = compress(wide_cnn(), "global_svd", calib=X, budget=targets, cost_model=slow_in_model(), latency_rounds=0,
                 progress=False)
    assert _ranks(a) == _ranks(b) and "rounds" not in a.report.latency  # the whole model does not measure targets


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_latency_rounds_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="latency_rounds"):
        compress(wide_cnn(), "global_svd", calib=X, budget=Budget(2.0, metric="latency"), latency_rounds=bad)


def _compressed(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("hsc_plugin") for m in module.modules())


class Drifting(Skewed):
    """The machine gets ``slow`` × slower for everything after the dense model's first timing (another
    job started): a round timed alone would read slower than it is and the loop would give accuracy
    away; timed beside the dense model, the speed-up is unchanged."""

    def __init__(self, slow: float) -> None:
        super().__init__(launch_alone=0.1, launch_model=0.01)
        self.slow = slow

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        first = self.whole == 0
        t = super().time(module, input_shape)
        return t if first or not any(isinstance(m, nn.Flatten) for m in module.modules()) else t * self.slow


class Lucky(Skewed):
    """Every other whole-model timing of a compressed model reads ``luck`` × its time (a quiet moment
    on a noisy machine); the dense model always reads true."""

    def __init__(self, luck: float) -> None:
        super().__init__(launch_alone=0.1, launch_model=0.01)
        self.luck, self.compressed_timings = luck, 0

    def time(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        t = super().time(module, input_shape)
        if any(isinstance(m, nn.Flatten) for m in module.modules()) and _compressed(module):
            self.compressed_timings += 1
            return t * self.luck if self.compressed_timings % 2 == 1 else t
        return t


@pytest.mark.parametrize("slow", [1.5, 0.7])
def test_rounds_are_judged_beside_the_dense_model_so_drift_does_not_move_the_landing(slow: float) -> None:
    ratio = 2.0
    dev = Drifting(slow)
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(ratio, metric="latency"), cost_model=dev,
                   progress=False)
    rounds = res.report.latency["rounds"]
    for r in rounds:
        assert r["dense_ms"] == pytest.approx(slow * res.report.latency["before_ms"])  # the drift is there
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["model_ms"])  # and cancels in the pair
    true = Skewed(launch_alone=0.1, launch_model=0.01)
    speedup = true.time(wide_cnn(), SHAPE) / true.time(res.model, SHAPE)
    assert ratio <= speedup <= WINDOW * ratio


def test_a_landing_is_confirmed_by_a_second_timing_and_judged_by_the_slower() -> None:
    """One lucky timing lands a round that is really too slow: the confirming timing catches it and
    the loop goes on, so what it keeps lands on the true times."""
    ratio = 2.0
    dev = Lucky(0.8)
    res = compress(wide_cnn(), "global_svd", calib=X, budget=Budget(ratio, metric="latency"), cost_model=dev,
                   progress=False)
    kept = next(r for r in res.report.latency["rounds"] if r["kept"])
    true = Skewed(launch_alone=0.1, launch_model=0.01)
    assert kept["model_ms"] == pytest.approx(true.time(res.model, SHAPE))  # the unlucky (true) reading
    speedup = true.time(wide_cnn(), SHAPE) / true.time(res.model, SHAPE)
    assert ratio <= speedup <= WINDOW * ratio


def test_hsc_s_own_allocation_failing_leaves_the_choice_to_candidates_that_meet_the_budget(monkeypatch) -> None:
    """HSC's own allocation refused as measured, a baseline's candidate allocation meeting the budget:
    the candidate is kept (with a warning) instead of refusing a budget another candidate meets."""
    real = pipeline.allocate_measured
    calls: list[int] = []

    def own_refused(compressor, prep, candidates, latency, cost_model, **kw):
        calls.append(1)
        if len(calls) == 1:  # the compressor's own allocation comes first
            raise BudgetError("hsc could not reach the target as measured (test)")
        return real(compressor, prep, candidates, latency, cost_model, **kw)

    monkeypatch.setattr(pipeline, "allocate_measured", own_refused)
    ratio = 1.6
    with pytest.warns(UserWarning, match=r"its own allocation cannot meet the budget \(hsc could not reach"):
        res = compress(wide_cnn(), "hsc", calib=X, budget=Budget(ratio, metric="latency"), cost_model=slow_in_model(),
                       progress=False)
    assert res.report.allocation != "hsc" and "hsc" not in res.report.candidates
    assert res.report.budget_met and ratio <= _speedup(res) <= WINDOW * ratio

    def all_refused(*args, **kw):
        raise BudgetError("refused (test)")

    monkeypatch.setattr(pipeline, "allocate_measured", all_refused)
    model = wide_cnn()
    snap = snapshot(model)
    with pytest.raises(BudgetError, match=r"refused \(test\)"):
        compress(model, "hsc", calib=X, budget=Budget(ratio, metric="latency"), cost_model=slow_in_model(),
                 progress=False)
    assert_unchanged(model, snap)
