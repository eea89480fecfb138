"""The recovery-and-choice stage within its work cap (``selection_gmacs``): every candidate refitted
while it fits, then the winner only, then no refit, on fewer samples — and the report says so."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SmallCNN

from hsc_plugin import Budget, compress, create_compressor
from hsc_plugin.recovery import reestimate_bn
from hsc_plugin.selection import MIN_SELECTION_SAMPLES, selection_plan


def _x(n: int = 64, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _plan(macs: float, layers: int = 54, candidates: int = 5, samples: int = 256, batchnorm: bool = True, **opts):
    return selection_plan(create_compressor("hsc", **opts), macs, layers, candidates, samples, batchnorm=batchnorm)


def test_small_models_refit_every_candidate_on_every_sample() -> None:
    p = _plan(58e6, layers=8)  # the MRI AlexNet
    assert p["refit"] == "each" and p["samples"] == 256 and p["gmacs"] <= p["cap_gmacs"]


def test_large_models_step_down_in_order() -> None:
    mid = _plan(3.7e9, layers=8)  # AlexNet at 512 px
    assert mid["refit"] == "winner" and MIN_SELECTION_SAMPLES <= mid["samples"] < 256
    big = _plan(4.1e9, layers=54)  # resnet50 at 224 px
    assert big["refit"] == "none" and MIN_SELECTION_SAMPLES <= big["samples"] < 256
    for p in (mid, big):
        assert p["gmacs"] <= p["cap_gmacs"] * 1.001
    huge = _plan(1e12)  # never below the floor of samples, even past the cap
    assert huge["refit"] == "none" and huge["samples"] == MIN_SELECTION_SAMPLES


def test_no_batchnorm_costs_no_passes() -> None:
    # AlexNet at 512 px has no BatchNorm: re-estimating it is a no-op, so its passes are not counted
    # and the stage's ten default candidates (HSC's and the baselines') still fit a refit of the winner.
    with_bn = _plan(3.7e9, layers=8, candidates=10, samples=32)
    without = _plan(3.7e9, layers=8, candidates=10, samples=32, batchnorm=False)
    assert with_bn["refit"] == "none" and without["refit"] == "winner"
    assert without["samples"] >= MIN_SELECTION_SAMPLES and without["gmacs"] <= without["cap_gmacs"]
    assert _plan(3.7e9, layers=8, candidates=10, samples=32, batchnorm=False, bn_reestimation=False) == \
        _plan(3.7e9, layers=8, candidates=10, samples=32, bn_reestimation=False)


def test_no_cap_and_no_refit() -> None:
    assert _plan(4.1e9, selection_gmacs=None) == {**_plan(4.1e9, selection_gmacs=None), "refit": "each",
                                                   "samples": 256}
    p = _plan(4.1e9, sequential_refit=False)
    assert p["refit"] == "none" and p["samples"] < 256
    assert _plan(1e6, samples=8)["samples"] == 8  # never more than there are


@pytest.mark.parametrize("bad", [0, -1.0])
def test_bad_cap(bad: float) -> None:
    with pytest.raises(ValueError, match="selection_gmacs"):
        create_compressor("hsc", selection_gmacs=bad)


def test_capped_stage_refits_the_winner_and_never_raises_the_error() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = _x()
    reestimate_bn(model, x)
    macs = compress(model, "global_svd", calib=x, budget=Budget(2.0), progress=False).report.macs_before
    # A cap that fits the winner-only refit on about half the samples, not every candidate's refit.
    probe = create_compressor("hsc")
    layers = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    cap = selection_plan(probe, macs, layers, 5, 64)
    assert cap["refit"] == "each"
    gmacs = macs * (2 + 5 * 3 + 0.5 * layers + 1 + 3) * 40 / 1e9
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False, selection_gmacs=gmacs)
    said = [str(w.message) for w in caught if "selection_gmacs" in str(w.message)]
    assert said and "chosen candidate only" in said[0]
    stage = res.report.recovery["selection"]
    assert stage["refit"] == "winner" and MIN_SELECTION_SAMPLES <= stage["samples"] < 64
    # The summary says the candidates' errors are not all after the refit, and on how many samples.
    assert (f"candidates (compared before the refit, which only the kept one had, on {stage['samples']} of 64 "
            "samples, selection_gmacs): ") in res.report.table()
    assert res.report.calibration_error <= res.report.recovery["error_before"] + 1e-12
    assert res.report.options["selection_gmacs"] == gmacs
    factorised = [L for L in res.report.layers if L.status == "factorised"]
    assert factorised and all(L.error is not None and L.error >= 0 for L in factorised)  # on the same subset
    # Uncapped, no warning about the cap and every candidate refitted.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False)
    assert not [w for w in caught if "selection_gmacs" in str(w.message)]
    assert full.report.recovery["selection"]["refit"] == "each"
    assert "; candidates: " in full.report.table() and "selection_gmacs" not in full.report.table()
    off = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False, sequential_refit=False)
    assert off.report.recovery["selection"]["refit"] == "none" and "; candidates: " in off.report.table()


def test_stage_on_a_model_without_batchnorm_counts_no_bn_passes() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    model.body[1] = torch.nn.Identity()  # its BatchNorm layers gone: re-estimation has nothing to do
    model.body[6] = torch.nn.Identity()
    x = _x()
    full = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False)
    n = len(full.report.candidates)
    assert n > 1 and full.report.recovery["selection"]["refit"] == "each"
    layers = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    # Refitting the winner on all 64 samples costs 2 + n + refit + 1 dense passes without BN's, and
    # 2n + 2 more with them; a cap halfway between fits all 64 samples only if none are counted.
    without = 2 + n + (0.5 * layers + 1) + 1
    cap = full.report.macs_before * 64 * (without + n + 1) / 1e9
    res = compress(model, "hsc", calib=x, budget=Budget(2.0), progress=False, selection_gmacs=cap)
    stage = res.report.recovery["selection"]
    assert stage["refit"] == "winner" and stage["samples"] == 64
    assert res.report.calibration_error <= res.report.recovery["error_before"] + 1e-12
