"""The core fine-tuning loop (``hsc_plugin.finetune``): the data forms it accepts give the same
run, distillation pulls the student to the teacher (and only the teacher), augmentation is a
seeded callable, bad input is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hsc_plugin
from hsc_plugin.finetuning import finetune, fit


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # no dropout, no BatchNorm: train and eval mode compute the same function
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1).float()  # learnable classes
    return x, y


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_the_top_level_finetune_is_the_core_one() -> None:
    assert hsc_plugin.finetune is finetune


def test_tensor_pair_and_tensor_dataset_give_identical_weights() -> None:
    x, y = _data()
    a = finetune(_net(), (x, y), epochs=2, lr=1e-2, batch_size=16, progress=False)
    b = finetune(_net(), TensorDataset(x, y), epochs=2, lr=1e-2, batch_size=16, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = finetune(_net(), (x, y), epochs=2, lr=1e-2, batch_size=16, progress=False, seed=1)
    assert not torch.equal(c.state_dict()["4.weight"], a.state_dict()["4.weight"])  # the seed shuffles


def test_training_fits_the_labels_from_a_dataloader() -> None:
    x, y = _data()
    model = _net()
    acc0 = float((model(x).argmax(1) == y).float().mean())
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    out = finetune(model, loader, epochs=30, lr=1e-2, optimizer="sgd", progress=False)
    assert out is model and not model.training
    assert float((model(x).argmax(1) == y).float().mean()) > max(acc0, 0.9)


def test_distillation_only_from_an_identical_teacher_changes_nothing() -> None:
    """alpha=1 with the student's own copy as teacher: zero KL gradient, so the weights stay (SGD,
    no weight decay); alpha=0 trains on the labels and moves them: the teacher term is what alpha weighs."""
    x, y = _data()
    student = _net()
    before = _state(student)
    finetune(student, (x, y), teacher=copy.deepcopy(student), alpha=1.0, optimizer="sgd", lr=1e-2,
             progress=False)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    finetune(student, (x, y), teacher=copy.deepcopy(student), alpha=0.0, optimizer="sgd", lr=1e-2,
             progress=False)
    assert not torch.allclose(student.state_dict()["4.weight"], before["4.weight"], atol=1e-4)


def test_unlabelled_inputs_distil_towards_the_teacher() -> None:
    x, _ = _data()
    teacher, student = _net(0).eval(), _net(5)

    def gap() -> float:
        with torch.no_grad():
            return float((teacher(x).softmax(1) - student(x).softmax(1)).abs().mean())

    before = gap()
    t_state = _state(teacher)
    finetune(student, x, teacher=teacher, epochs=20, lr=1e-2, batch_size=16, progress=False)
    assert gap() < 0.5 * before
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())  # frozen
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(_net(), x, progress=False)


def test_augmentation_is_a_seeded_callable() -> None:
    x, y = _data()
    calls: list[torch.Generator] = []

    def jitter(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append(gen)
        return xb + 0.1 * torch.randn(xb.shape, generator=gen)

    a = finetune(_net(), (x, y), epochs=1, batch_size=16, augment=jitter, progress=False)
    b = finetune(_net(), (x, y), epochs=1, batch_size=16, augment=jitter, progress=False)
    plain = finetune(_net(), (x, y), epochs=1, batch_size=16, progress=False)
    assert len(calls) == 6 and all(isinstance(g, torch.Generator) for g in calls)
    assert torch.equal(a.state_dict()["4.weight"], b.state_dict()["4.weight"])  # repeatable
    assert not torch.equal(a.state_dict()["4.weight"], plain.state_dict()["4.weight"])  # and used


def test_fit_reports_each_epoch_and_frozen_parameters_stay() -> None:
    x, y = _data()
    model = _net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    seen = []
    stats = fit(model, (x, y), lambda logits, yb, _: nn.functional.cross_entropy(logits, yb), epochs=3, lr=1e-2,
                batch_size=16, on_epoch=lambda i, s: seen.append(i), progress=False)
    assert seen == [0, 1, 2] and len(stats) == 3
    assert stats[-1].loss < stats[0].loss and stats[-1].accuracy is not None and stats[-1].lr < 1e-2
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize(("data", "kwargs", "error", "match"), [
    ([1, 2, 3], {}, TypeError, "training data must be"),
    ((torch.zeros(0, 1, 8, 8), torch.zeros(0)), {}, ValueError, "empty"),
    ((torch.zeros(4, 1, 8, 8), torch.zeros(3)), {}, ValueError, "4 inputs but 3 labels"),
    (None, {"alpha": 1.5}, ValueError, "alpha"),
    (None, {"lr": 0.0}, ValueError, "lr must be > 0"),
    (None, {"optimizer": "lion"}, ValueError, "unknown optimizer"),
])
def test_bad_input_is_a_clear_error(data, kwargs, error, match) -> None:
    model = _net()
    before = _state(model)
    with pytest.raises(error, match=match):
        finetune(model, _data() if data is None else data, progress=False, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
