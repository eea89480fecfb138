"""AlexNet-MRI model, training helpers and the checkpoint cache (tiny, CPU, seconds)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hsc_plugin.mri.model import alexnet_mri
from hsc_plugin.mri.train import evaluate, finetune, load_or_train, train


def _toy_data(n: int = 32, size: int = 32, seed: int = 0) -> TensorDataset:
    """Class k has a bright square in quadrant k: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, size, size, generator=g) * 0.1
    h = size // 2
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k, 2)
        x[i, 0, r * h : (r + 1) * h, c * h : (c + 1) * h] += 2.0
    return TensorDataset(x, y)


@pytest.mark.parametrize("size", [64, 128])
def test_forward_shape_and_feature_map(size: int) -> None:
    model = alexnet_mri(width=0.25, input_size=size).eval()
    x = torch.randn(2, 1, size, size)
    assert model(x).shape == (2, 4)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    assert [c.kernel_size for c in convs] == [(11, 11), (5, 5), (3, 3), (3, 3), (3, 3)]
    # conv3-5 run on an 8x8 map at both sizes (room for spatial regions)
    maps = []
    hooks = [c.register_forward_hook(lambda m, i, o: maps.append(o.shape[-2:])) for c in convs]
    model(x)
    for h in hooks:
        h.remove()
    assert [tuple(s) for s in maps[2:]] == [(8, 8)] * 3


def test_width_and_classes() -> None:
    small = alexnet_mri(width=0.25, input_size=64)
    big = alexnet_mri(width=0.5, input_size=64, num_classes=7, in_chans=3)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(big) > 2 * n(small)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # any input size runs, not only the one the stem was tuned for
    assert small(torch.randn(1, 1, 80, 80)).shape == (1, 4)
    with pytest.raises(ValueError, match="width"):
        alexnet_mri(width=0)


def test_train_learns_toy_task() -> None:
    data = _toy_data(32)
    model = alexnet_mri(width=0.25, input_size=32, dropout=0.0)
    hist = train(model, data, epochs=4, lr=3e-3, batch_size=16, seed=0, augment=False,
                 progress=False, eval_data=data)
    assert len(hist["loss"]) == 4 and len(hist["eval_acc"]) == 4
    assert hist["loss"][-1] < hist["loss"][0]
    y_true, y_pred = evaluate(model, data)
    assert y_true.dtype == np.int64 and y_pred.shape == (32,)
    assert (y_true == y_pred).mean() >= 0.75


def test_train_is_seeded() -> None:
    data = _toy_data(16)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = alexnet_mri(width=0.25, input_size=32)
        train(model, data, epochs=1, lr=1e-3, batch_size=8, seed=5, progress=False)
        outs.append(model(data.tensors[0][:4]))
    torch.testing.assert_close(outs[0], outs[1])


def test_finetune_with_teacher_updates_all_parameters() -> None:
    torch.manual_seed(0)
    teacher = alexnet_mri(width=0.25, input_size=32).eval()
    student = copy.deepcopy(teacher)
    # a compressed-style model: replace conv3 by a factor pair in an nn.Sequential
    conv = student.features[8]
    assert isinstance(conv, nn.Conv2d)
    student.features[8] = nn.Sequential(
        nn.Conv2d(conv.in_channels, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, conv.out_channels, 1),
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = _toy_data(8)
    out = finetune(student, data, epochs=1, lr=1e-3, teacher=teacher, batch_size=8,
                   progress=False)
    assert out is student and not student.training
    changed = [k for k, v in student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "features.8.0.weight" in changed and "features.8.1.weight" in changed
    assert "classifier.7.weight" in changed
    for k, v in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(v, t_before[k]), k
    with pytest.raises(ValueError, match="alpha"):
        finetune(student, data, alpha=1.5, progress=False)


def test_load_or_train_saves_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _toy_data(8)
    calls = []

    def factory() -> nn.Module:
        calls.append(1)
        return alexnet_mri(width=0.25, input_size=32)

    path = tmp_path / "ckpt" / "toy.pt"
    m1 = load_or_train(path, factory, data, epochs=1, lr=1e-3, batch_size=8, progress=False)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    train_mod = sys.modules["hsc_plugin.mri.train"]  # the package re-exports names, not `train`
    def no_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("should load the checkpoint, not train")

    monkeypatch.setattr(train_mod, "train", no_train)
    m2 = load_or_train(path, factory, data, epochs=1, lr=1e-3, batch_size=8)
    assert path.stat().st_mtime_ns == mtime and len(calls) == 2
    x = data.tensors[0][:2]
    torch.testing.assert_close(m1(x), m2(x))
    # a bare file name goes to the cache folder
    monkeypatch.undo()
    monkeypatch.setenv("HSC_CACHE_DIR", str(tmp_path / "cache"))
    load_or_train("bare.pt", factory, data, epochs=1, lr=1e-3, batch_size=8, progress=False)
    assert (tmp_path / "cache" / "bare.pt").is_file()
