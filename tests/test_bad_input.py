"""Bad input gets a clear error that names the layer or option, and the user's model is left
exactly as it was (parameters, buffers, structure, train/eval mode).

One test per kind of bad input. Cases already covered elsewhere are not repeated: for global_svd
and tucker2, test_untouched.py covers impossible and coarse budgets, wrong channels, batches of
different shapes, NaN calibration inputs, unknown options and a failing plugin (also with
``inplace=True``); test_plugins.py covers "did you mean" for compressor and rank-selector names;
test_budget.py covers ``Budget`` validation. Here every case runs through HSC as well.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import SmallCNN, assert_unchanged, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hsc_plugin import Budget, BudgetError, CalibrationError, compress

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
B3 = Budget(3.0)

# Every method, data-aware where it has the choice: the calibration checks then all apply.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {"data_aware": True}),
    "hsc": ("hsc", {}),
    "hsc-output": ("hsc", {"channel_side": "output"}),
}


def modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def _fails(model: nn.Module, exc: Any, pattern: str, method: str = "hsc", inplace_too: bool = True,
           **kwargs: Any) -> str:
    """``compress`` raises ``exc`` matching ``pattern`` and ``model`` is untouched (also with inplace)."""
    name, opts = METHODS.get(method, (method, {}))
    kwargs = {"progress": False, **opts, **kwargs}
    for inplace in (False, True) if inplace_too else (False,):
        snap, mode = snapshot(model), modes(model)
        with pytest.raises(exc, match=pattern) as err:
            compress(model, name, inplace=inplace, **kwargs)
        assert_unchanged(model, snap)
        assert modes(model) == mode
    return str(err.value)


@pytest.mark.parametrize(
    ("targets", "pattern"),
    [
        (nn.BatchNorm2d, "layer type BatchNorm2d, which cannot be factorised"),
        ([nn.Conv2d, nn.Conv1d], "layer type Conv1d, which cannot be factorised"),
        (["stem", "body.1"], r"Layer 'body\.1' is a BatchNorm2d, which cannot be factorised"),
        (["body.9"], r"Layer 'body\.9' is a ReLU"),
        (["body.99"], r"Target 'body\.99' matches no layer.*Similar names"),
        ([3], "A target must be a name, a glob pattern, a module type or a callable; got 3"),
    ],
)
def test_unsupported_or_unknown_targets(targets: Any, pattern: str) -> None:
    msg = _fails(_model(), (ValueError, TypeError), pattern, calib=X, budget=B3, targets=targets)
    assert "Conv2d, Linear" in msg or "matches no layer" in msg or "got 3" in msg


@pytest.mark.parametrize(
    ("method", "options", "pattern"),
    [
        ("hcs", {}, r"Unknown compressor 'hcs'\. Did you mean 'hsc'\?"),
        ("hsc", {"partition": "quadtre"}, r"Unknown partitioner 'quadtre'\. Did you mean 'quadtree'\?"),
        ("hsc", {"clusterer": "kmean"}, r"Unknown clusterer 'kmean'\. Did you mean 'kmeans'\?"),
        ("hsc", {"rank": "budgit"}, r"Unknown rank selector 'budgit'\. Did you mean 'budget'\?"),
        ("hsc", {"channel_side": "inputs"}, r"channel_side must be 'input' or 'output', got 'inputs'"),
        ("hsc", {"n_clusterz": 3}, r"hsc.*does not take option\(s\) \['n_clusterz'\].*n_clusters"),
    ],
)
def test_unknown_names_and_options(method: str, options: dict[str, Any], pattern: str) -> None:
    msg = _fails(_model(), ValueError, pattern, method, calib=X, budget=B3, **options)
    assert "Available" in msg or "channel_side" in msg or "accepts" in msg


@pytest.mark.parametrize("method", ["hsc", "hsc-output"])
def test_impossible_budget(method: str) -> None:
    msg = _fails(_model(), BudgetError, r"Cannot reach 1000x fewer macs", method, inplace_too=False, calib=X,
                 budget=Budget(1000.0))
    assert "most this method can reach at minimum rank is" in msg


@pytest.mark.parametrize("budget", ["1x", 1.0, "0.9x", 0.5, -3])
def test_budget_ratio_not_above_one(budget: Any) -> None:
    _fails(_model(), ValueError, r"Budget ratio must be a number > 1", calib=X, budget=budget)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"rank": "fixed", "rank_ratio": 0.0}, r"rank_ratio must be in \(0, 1\], got 0\.0"),
        ({"rank": "fixed", "rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\], got 1\.5"),
        ({"rank": "energy", "energy": 1.5}, r"energy \(τ\) must be in \(0, 1\], got 1\.5"),
        ({"rank_multiple": 0}, r"rank_multiple must be >= 1, got 0"),
    ],
)
def test_rank_ratios_out_of_range(options: dict[str, Any], pattern: str) -> None:
    _fails(_model(), ValueError, pattern, "global_svd", calib=X, **options)


@pytest.mark.parametrize(
    "calib",
    [torch.empty(0, 3, 32, 32), [], DataLoader(TensorDataset(torch.empty(0, 3, 32, 32)), batch_size=4)],
    ids=["empty-tensor", "empty-list", "empty-loader"],
)
@pytest.mark.parametrize("method", ["global_svd", "hsc"])
def test_empty_calibration_data(method: str, calib: Any) -> None:
    _fails(_model(), CalibrationError, r"(?i)empty", method, calib=calib, budget=B3)


@pytest.mark.parametrize(
    ("calib", "pattern"),
    [
        (torch.randn(4, 1, 32, 32), r"failed on a calibration batch of shape \(1, 1, 32, 32\).*3 channels"),
        (torch.randn(3, 32, 32), r"failed on a calibration batch of shape \(1, 32, 32\)"),  # no batch dim
        ([X[:4], torch.randn(4, 3, 16, 16)], r"disagree in shape: \(3, 16, 16\) vs \(3, 32, 32\)"),
    ],
    ids=["channels", "no-batch-dim", "batches-disagree"],
)
@pytest.mark.parametrize("method", ["hsc", "hsc-output"])
def test_calibration_of_the_wrong_shape(method: str, calib: Any, pattern: str) -> None:
    _fails(_model(), CalibrationError, pattern, method, calib=calib, budget=B3)


@pytest.mark.parametrize(
    ("calib", "pattern"),
    [
        (torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), r"must be floating point, got dtype torch\.uint8"),
        ([X[:4], X[4:].to(torch.int32)], r"must be floating point, got dtype torch\.int32"),  # a later batch
        (["a.png", "b.png"], r"Calibration items must be tensors.*got str"),
    ],
    ids=["uint8", "int-later-batch", "strings"],
)
@pytest.mark.parametrize("method", list(METHODS))
def test_calibration_of_the_wrong_dtype(method: str, calib: Any, pattern: str) -> None:
    _fails(_model(), CalibrationError, pattern, method, calib=calib, budget=B3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", list(METHODS))
def test_nan_inf_weights(method: str, value: float) -> None:
    model = _model()
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = value
    _fails(model, ValueError, r"Parameter 'body\.3\.weight' contains NaN or Inf", method, calib=X, budget=B3)


def _overflowing() -> nn.Module:
    """Finite weights and inputs whose activations overflow float32 at the second conv."""
    model = _model()
    with torch.no_grad():
        model.body[0].weight.mul_(1e30)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_nan_inf_activations(method: str) -> None:
    # overflow: the first layer that sees Inf is named (body.0's output, so body.3's input, is Inf)
    _fails(_overflowing(), CalibrationError, r"Layer 'body\.0' saw NaN or Inf activations", method,
           calib=X * 1e10, budget=B3)
    # a NaN buffer (BN running mean) makes the next layer's input NaN
    model = _model()
    model.body[1].running_mean[0] = float("nan")
    _fails(model, CalibrationError, r"Layer 'body\.3' saw NaN or Inf activations", method, calib=X, budget=B3)
    # NaN in the calibration data itself
    bad = X.clone()
    bad[1, 0, 0, 0] = float("nan")
    _fails(_model(), CalibrationError, r"Calibration inputs contain NaN or Inf", method, calib=bad, budget=B3)


@pytest.mark.parametrize("method", ["hsc", "hsc-output", "tucker2"])
def test_training_mode_model_works_and_keeps_its_mode(method: str) -> None:
    """A model in training mode is compressed as in eval mode (BN running statistics, no dropout),
    its BN statistics are not updated, and the result comes back in training mode."""
    from hsc_plugin.mri import alexnet_mri

    torch.manual_seed(0)
    model = alexnet_mri(width=0.25, input_size=64).train()  # BatchNorm and Dropout
    x = torch.randn(6, 1, 64, 64)
    name, opts = METHODS[method]
    snap = snapshot(model)
    res = compress(model, name, calib=x, budget=B3, progress=False, **opts)
    assert_unchanged(model, snap)
    assert all(modes(model).values()) and all(modes(res.model).values())
    ref = compress(model.eval(), name, calib=x, budget=B3, progress=False, **opts)
    a, b = res.model.state_dict(), ref.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_devices(method: str) -> None:
    """Parameters on two devices (meta stands in for a GPU): refused before anything is copied."""
    model = _model()
    model.head[2] = nn.Linear(64, 64, device="meta")
    meta = dict(model.head[2].named_parameters())
    cpu = nn.ModuleDict({"stem": model.stem, "body": model.body})
    snap, structure = snapshot(cpu), repr(model)
    with pytest.raises(ValueError, match=r"several devices \['cpu', 'meta'\]; move it to one device first"):
        compress(model, METHODS[method][0], calib=X, budget=B3, progress=False, **METHODS[method][1])
    assert_unchanged(cpu, snap)
    assert repr(model) == structure
    assert all(p is meta[n] and p.device.type == "meta" for n, p in model.head[2].named_parameters())
