"""The user's model is never modified by ``compress`` (unless ``inplace=True`` and it succeeds),
and never left half-modified by a ``compress`` call that raises."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import SmallCNN, assert_unchanged, snapshot
from torch import nn

from hsc_plugin import Budget, BudgetError, CalibrationError, RankProblem, RankSelector, compress
from hsc_plugin.modules import LowRankConv2d, LowRankLinear, Tucker2Conv2d



def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}


def factorised(model: nn.Module) -> list[str]:
    types = (LowRankConv2d, LowRankLinear, Tucker2Conv2d)
    return [n for n, m in model.named_modules() if isinstance(m, types)]


X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("data_aware", [False, True])
@pytest.mark.parametrize("method", ["global_svd", "tucker2"])
def test_input_model_unchanged_after_compress(small_cnn: nn.Module, method: str, data_aware: bool) -> None:
    snap, mode = snapshot(small_cnn), modes(small_cnn)
    with torch.no_grad():
        y = small_cnn(X)
    res = compress(small_cnn, method, calib=X, budget=Budget(3.0), data_aware=data_aware)
    assert res.model is not small_cnn and factorised(res.model)
    assert_unchanged(small_cnn, snap)
    assert modes(small_cnn) == mode
    assert not factorised(small_cnn)
    # a true copy: no tensor shared, so training the result cannot touch the input
    assert not storages(res.model) & storages(small_cnn)
    with torch.no_grad():
        for p in res.model.parameters():
            p.add_(1.0)
        for b in res.model.buffers():
            if b.is_floating_point():
                b.mul_(2.0)
        assert torch.equal(small_cnn(X), y)
    assert_unchanged(small_cnn, snap)


def test_inplace_success_modifies_and_returns_the_input(small_cnn: nn.Module) -> None:
    snap = snapshot(small_cnn)
    stem = small_cnn.stem
    res = compress(small_cnn, "global_svd", calib=X, budget=Budget(3.0), inplace=True)
    assert res.model is small_cnn
    assert factorised(small_cnn) == factorised(res.model) and factorised(small_cnn)
    assert repr(small_cnn) != snap[1]
    replaced = [L.name for L in res.report.layers if L.status == "factorised"]
    assert set(replaced) == set(factorised(small_cnn))
    if "stem" not in replaced:
        assert small_cnn.stem is stem  # layers it did not replace are the very same objects


class _Boom(RankSelector):
    """A rank selector (as a plugin might ship) that fails half-way through the pipeline."""

    name = "boom"
    needs_budget = True

    def select(self, problem: RankProblem) -> list[list[int]]:
        raise RuntimeError("selector failed")


def _grouped() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(32, 64, 3, groups=4, padding=1)).eval()


# (model factory, compress kwargs, expected exception, message pattern)
FAILURES: dict[str, tuple[Any, dict[str, Any], type[Exception], str]] = {
    "impossible-budget": (None, dict(calib=X, budget=Budget(1000.0)), BudgetError, "most this method can reach"),
    # raised at the very end, after the factorised modules were built: the budget is then missed
    "coarse-budget": (_grouped, dict(calib=torch.randn(4, 32, 10, 10), budget=Budget(2.0)), BudgetError,
                      "instead of 2x"),
    "wrong-channels": (None, dict(calib=torch.randn(4, 1, 32, 32), budget=Budget(3.0)), CalibrationError,
                       "shape"),
    # the second batch fails during the calibration pass, after the first one went through
    "batches-disagree": (None, dict(calib=[X[:4], torch.randn(4, 3, 16, 16)], budget=Budget(3.0), data_aware=True),
                         CalibrationError, "disagree"),
    "nan-calib": (None, dict(calib=torch.full((2, 3, 32, 32), float("nan")), data_aware=True), CalibrationError,
                  "NaN"),
    "unknown-option": (None, dict(calib=X, budget=Budget(3.0), foo=1), ValueError, "foo"),
    "failing-selector": (None, dict(calib=X, budget=Budget(3.0), rank=_Boom()), RuntimeError, "selector failed"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", list(FAILURES))
@pytest.mark.parametrize("method", ["global_svd", "tucker2"])
def test_input_model_unchanged_when_compress_raises(small_cnn: nn.Module, method: str, case: str,
                                                     inplace: bool) -> None:
    factory, kwargs, exc, pattern = FAILURES[case]
    model = factory() if factory else small_cnn
    snap, mode = snapshot(model), modes(model)
    with pytest.raises(exc, match=pattern):
        compress(model, method, inplace=inplace, **kwargs)
    assert_unchanged(model, snap)
    assert modes(model) == mode
    assert not factorised(model)


def test_train_mode_model_is_returned_in_train_mode_with_its_bn_stats(small_cnn: nn.Module) -> None:
    model = small_cnn.train()
    snap = snapshot(model)
    bn = model.body[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    res = compress(model, "global_svd", calib=X, budget=Budget(3.0), data_aware=True, bn_reestimation=False)
    # the calibration forward passes did not update the input's BN statistics …
    assert_unchanged(model, snap)
    assert all(modes(model).values())
    # … nor the copy's, and the copy comes back in train mode like the input
    assert all(modes(res.model).values()), [n for n, t in modes(res.model).items() if not t]
    out_bn = res.model.body[1]
    assert torch.equal(out_bn.running_mean, stats[0]) and torch.equal(out_bn.running_var, stats[1])
    assert int(out_bn.num_batches_tracked) == stats[2]
    assert res.model(X).shape == (8, 10)
    # with BN re-estimation (the default) only the copy's statistics change, and the modes still hold
    recovered = compress(model, "global_svd", calib=X, budget=Budget(3.0), data_aware=True)
    assert_unchanged(model, snap)
    assert all(modes(recovered.model).values())


def test_eval_mode_model_is_returned_in_eval_mode(small_cnn: nn.Module) -> None:
    for inplace in (False, True):
        model = SmallCNN().eval()
        res = compress(model, "tucker2", calib=X, budget=Budget(3.0), inplace=inplace)
        assert not any(modes(res.model).values()), inplace


def test_train_mode_model_stays_in_train_mode_inplace() -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    res = compress(model, "global_svd", calib=X, budget=Budget(3.0), inplace=True)
    assert res.model is model
    assert all(modes(model).values()), [n for n, t in modes(model).items() if not t]
