"""``holdout``: the candidates HSC compares are judged on calibration samples no fit has seen.

What is checked: the held-out samples reach neither the statistics pass nor the recovery; the
error the choice is made on is the output error on exactly those samples; a compressor with nothing
to choose (one allocation) holds nothing out; bad values and too few samples are said clearly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hsc_plugin.pipeline as pipeline
import hsc_plugin.recovery as recovery
from hsc_plugin import Budget, compress
from hsc_plugin.calibration import iter_batches, skip_samples
from hsc_plugin.recovery import output_error, reestimate_bn

from _factories import tiny_cnn

X = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _count(calib) -> int:
    return sum(int(x.shape[0]) for x in iter_batches(calib))


@pytest.mark.parametrize("calib", [X[:20], [X[i:min(i + 8, 20)] for i in range(0, 20, 8)],
                                   [(X[i:min(i + 8, 20)], torch.zeros(8)) for i in range(0, 20, 8)]],
                         ids=["tensor", "batches", "pairs"])
def test_skip_samples_drops_exactly_the_first_n_across_batches(calib) -> None:
    for n in (0, 3, 8, 10, 19):
        kept = torch.cat(list(iter_batches(skip_samples(calib, n))))
        assert torch.equal(kept, X[n:20])
        assert torch.equal(torch.cat(list(iter_batches(skip_samples(calib, n)))), kept)  # iterable again


def test_the_held_out_samples_reach_no_fit_and_are_what_the_choice_is_made_on(monkeypatch) -> None:
    seen: dict[str, list[int]] = {"statistics": [], "recovery": []}
    run, recover = pipeline.run_calibration, recovery.recover

    def spy_run(model, stats, calib, **kw):
        seen["statistics"].append(_count(calib))
        return run(model, stats, calib, **kw)

    def spy_recover(reference, model, originals, calib, **kw):
        seen["recovery"].append(int(calib.shape[0]))
        return recover(reference, model, originals, calib, **kw)

    monkeypatch.setattr(pipeline, "run_calibration", spy_run)
    monkeypatch.setattr(recovery, "recover", spy_recover)
    model = tiny_cnn().eval()
    res = compress(model, "hsc", calib=X, budget=Budget(3.0), holdout=0.25, progress=False)
    held = res.report.recovery["held_out"]
    assert held["samples"] == 10  # 0.25 × the 40 selection samples
    assert seen["statistics"] and set(seen["statistics"]) == {30}
    assert seen["recovery"] and set(seen["recovery"]) == {30}
    assert len(res.report.candidates) > 1
    assert res.report.calibration_error == held["error"] == min(res.report.candidates.values())
    # The error the choice was made on: against the uncompressed model (BN statistics re-estimated on
    # the fitting samples, as the compressed model's were), on the held-out samples only.
    ref = copy.deepcopy(model)
    reestimate_bn(ref, X[10:])
    assert output_error(ref, res.model, X[:10]) == pytest.approx(held["error"], rel=1e-5)
    assert output_error(ref, res.model, X[10:]) == pytest.approx(held["fit_error"], rel=1e-5)
    assert "held-out samples" in res.report.table()


def test_nothing_is_held_out_where_there_is_nothing_to_choose() -> None:
    model = tiny_cnn().eval()
    for method, opts in (("global_svd", {"data_aware": True}), ("tucker2", {})):
        a = compress(model, method, calib=X, budget=Budget(3.0), holdout=0.25, progress=False, **opts)
        b = compress(model, method, calib=X, budget=Budget(3.0), progress=False, **opts)
        assert "held_out" not in (a.report.recovery or {})
        assert a.report.calibration_error == pytest.approx(b.report.calibration_error, rel=1e-9)
        for pa, pb in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(pa, pb)
    no_budget = compress(model, "hsc", calib=X, holdout=0.25, progress=False)  # no budget: no candidates
    assert "held_out" not in (no_budget.report.recovery or {})


def test_too_few_samples_to_hold_out_is_said_and_nothing_is_held_out() -> None:
    with pytest.warns(UserWarning, match=r"holdout=0.25 of 20 selection samples is 5, outside \[8, 19\]"):
        res = compress(tiny_cnn().eval(), "hsc", calib=X[:20], budget=Budget(3.0), holdout=0.25, progress=False)
    assert "held_out" not in (res.report.recovery or {})
    assert res.report.calibration_error == min(res.report.candidates.values())


@pytest.mark.parametrize("bad", [-0.1, 0.6, True, "0.2", None])
def test_holdout_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="holdout must be a fraction in"):
        compress(tiny_cnn().eval(), "hsc", calib=X, budget=Budget(3.0), holdout=bad, progress=False)
