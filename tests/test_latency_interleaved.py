"""Interleaved timing (issue 14.2): a slow start does not bias a comparison; noise is reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin.cost.timing import measure_interleaved, speedup_text


class _FakeClock:
    """Each timed call costs the model's own ms, plus ``slow`` ms for the first ``n_slow`` calls."""

    def __init__(self, cost: dict[int, float], slow: float, n_slow: int) -> None:
        self.t, self.cost, self.slow, self.n_slow, self.calls, self.current = 0.0, cost, slow, n_slow, 0, None

    def __call__(self) -> float:
        return self.t / 1e3

    def run(self, key: int) -> None:
        self.calls += 1
        self.t += self.cost[key] + (self.slow if self.calls <= self.n_slow else 0.0)


def _models(clock: _FakeClock) -> dict[str, nn.Module]:
    class M(nn.Module):
        def __init__(self, key: int) -> None:
            super().__init__()
            self.key = key
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            clock.run(self.key)
            return x

    return {"dense": M(0), "compressed": M(1)}


def test_slow_first_measurements_do_not_bias_the_comparison():
    clock = _FakeClock({0: 10.0, 1: 5.0}, slow=100.0, n_slow=4)  # a busy machine at the start
    r = measure_interleaved(_models(clock), (1,), runs=9, warmup=1, threads=None, timer=clock)
    assert r["dense"]["median_ms"] == pytest.approx(10.0) and r["compressed"]["median_ms"] == pytest.approx(5.0)
    assert not r["dense"]["disturbed"] and not r["compressed"]["disturbed"]
    assert speedup_text(r["dense"], r["compressed"], mac_ratio=2.0) == "2.00x"


def test_disturbed_measurement_is_reported_as_such():
    clock = _FakeClock({0: 10.0, 1: 5.0}, slow=100.0, n_slow=10)  # busy through half the runs
    r = measure_interleaved(_models(clock), (1,), runs=8, warmup=0, threads=None, timer=clock)
    assert r["dense"]["disturbed"]
    assert speedup_text(r["dense"], r["compressed"], mac_ratio=2.0) == "disturbed"
    ok = {"median_ms": 100.0, "disturbed": False}
    assert "suspect" in speedup_text(ok, {"median_ms": 1.0, "disturbed": False}, mac_ratio=3.0)


def test_channels_last_times_nhwc_copies_and_leaves_the_models_alone():
    conv = nn.Conv2d(3, 8, 3).eval()
    r = measure_interleaved({"conv": conv}, (3, 16, 16), runs=3, warmup=1, threads=1, channels_last=True)
    assert r["conv"]["median_ms"] > 0 and r["conv"]["runs"] == 3
    assert conv.weight.is_contiguous()  # still NCHW: the NHWC copy was timed


class _CacheClock(_FakeClock):
    """A call costs ``cold`` ms more when another model ran just before it (its caches were flushed)."""

    def __init__(self, cost: dict[int, float], cold: float) -> None:
        super().__init__(cost, 0.0, 0)
        self.cold, self.last = cold, None

    def run(self, key: int) -> None:
        self.calls += 1
        self.t += self.cost[key] + (self.cold if self.last is not None and self.last != key else 0.0)
        self.last = key


@pytest.mark.parametrize("block", [2, 3, 5])
def test_warm_turns_time_each_model_as_it_runs_alone(block: int) -> None:
    clock = _CacheClock({0: 10.0, 1: 2.0}, cold=3.0)
    r = measure_interleaved(_models(clock), (1,), runs=7, warmup=1, threads=None, timer=clock, block=block)
    assert r["dense"]["median_ms"] == pytest.approx(10.0) and r["compressed"]["median_ms"] == pytest.approx(2.0)
    assert r["dense"]["runs"] == r["compressed"]["runs"] == 7
    plain = measure_interleaved(_models(clock), (1,), runs=7, warmup=1, threads=None, timer=clock)
    assert plain["compressed"]["median_ms"] == pytest.approx(5.0)  # every call right after the other model
    with pytest.raises(ValueError, match="block must be >= 1"):
        measure_interleaved(_models(clock), (1,), runs=7, threads=None, timer=clock, block=0)
