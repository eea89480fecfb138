"""Fine-tuning a compressed model: cross-entropy on labelled data, optionally distilled from the
uncompressed model (the *teacher*).

Why in the core: after factorisation a short training run recovers most of the lost accuracy,
and distillation needs nothing but the original model's outputs. Nothing here knows a data set:
what is specific to one (augmentation) comes in as a callable, ``augment(x, generator)``, given
the loop's seeded generator so that augmented runs repeat exactly.

:func:`finetune` is the user-facing call (``hsc_plugin.finetune``); :func:`fit` is the loop under
it, for callers that bring their own loss and schedule (the MRI experiment trains its classifier
from scratch with it). ``hsc_plugin.adapters.nni.finetune`` is a different thing: it drives an NNI
evaluator's own training function and only fixes which optimizer groups the new factors join.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

__all__ = ["finetune", "fit", "cosine_schedule", "EpochStats", "TrainData", "Augment", "Loss", "Schedule"]

TrainData = Union[tuple[Tensor, Tensor], Tensor, Dataset, DataLoader]
"""``(x, y)`` tensors, a TensorDataset, any map-style ``(x, y)`` dataset, or a DataLoader of
``(x, y)`` batches (its own batching and order). A bare tensor ``x`` has no labels: distillation only."""
Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``augment(x_batch, generator) -> x_batch`` on the training device; draw randomness from ``generator``."""
Loss = Callable[[Tensor, Union[Tensor, None], Tensor], Tensor]
"""``loss(logits, y, x) -> scalar``; ``y`` is None for unlabelled data; ``x`` is the (augmented) input."""
Schedule = Callable[[int, int], Callable[[int], float]]
"""``schedule(steps_per_epoch, total_steps)`` -> learning-rate factor of each step (``LambdaLR``)."""


@dataclass(frozen=True)
class EpochStats:
    """One epoch of :func:`fit`: mean loss, training accuracy (None without labels), the learning
    rate at its end and its wall time (training only)."""

    loss: float
    accuracy: float | None
    lr: float
    seconds: float


def cosine_schedule(steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Cosine decay to zero over ``total_steps``, no warm-up (fine-tuning starts from good weights)."""
    return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))


def finetune(
    model: nn.Module,
    data: TrainData,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float = 3e-4,
    alpha: float = 0.5,
    temperature: float = 4.0,
    batch_size: int = 64,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    augment: Augment | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Train every parameter of ``model`` in place; optionally distil from ``teacher``.

    Loss = ``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(teacher_T || student_T)`` at
    temperature ``T`` (Hinton et al. 2015); plain cross-entropy without a teacher, the KL term
    alone for unlabelled data. The teacher is put in eval mode and never updated. ``optimizer``:
    ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.9); cosine decay per step. ``device``: default
    CUDA when available. Progress bars only on a terminal (``progress=False``: never).

    Returns:
        ``model`` itself, on ``device``, in eval mode.
    """
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    unlabelled = isinstance(data, Tensor) or (isinstance(data, TensorDataset) and len(data.tensors) == 1)
    if unlabelled and teacher is None:
        raise ValueError("unlabelled data (a bare tensor) needs a teacher to distil from")
    dev = _resolve_device(device)
    if teacher is not None:
        teacher.to(dev).eval()

    def loss(logits: Tensor, y: Tensor | None, x: Tensor) -> Tensor:
        if y is None and teacher is None:
            raise ValueError("unlabelled data (a bare tensor) needs a teacher to distil from")
        ce = F.cross_entropy(logits, y) if y is not None else None
        if teacher is None or (alpha == 0 and ce is not None):
            return ce  # type: ignore[return-value]
        with torch.no_grad():
            t_logits = teacher(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(t_logits / temperature, dim=1),
                      reduction="batchmean", log_target=True)
        if ce is None:
            return temperature**2 * kd
        return (1.0 - alpha) * ce + alpha * temperature**2 * kd

    fit(model, data, loss, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
        weight_decay=weight_decay, schedule=cosine_schedule, augment=augment, seed=seed, device=dev,
        progress=progress, desc="finetune", train_all=True)
    return model.eval()


def fit(
    model: nn.Module,
    data: TrainData,
    loss: Loss,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: Schedule = cosine_schedule,
    augment: Augment | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    desc: str = "train",
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    train_all: bool = False,
) -> list[EpochStats]:
    """The training loop: ``model``'s trainable parameters (every parameter with ``train_all``,
    frozen ones unfrozen), in place, for ``epochs`` shuffled passes.

    ``seed`` seeds torch's global RNG (dropout) and the generator that shuffles and augments.
    ``on_epoch(i, stats)`` runs after each epoch (e.g. an evaluation; its time is not counted).
    The model is left in train mode.
    """
    _check_positive(epochs=epochs, batch_size=batch_size, lr=lr)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw' or 'sgd'")
    dev = _resolve_device(device)
    source = _Source(data, batch_size)
    model.to(dev)
    if train_all:
        for p in model.parameters():
            p.requires_grad_(True)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(params, optimizer, lr, weight_decay)
    steps = len(source)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, epochs * steps))
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        mean_loss, acc = _epoch(model, source, opt, sched, loss, gen=gen, dev=dev, augment=augment,
                                desc=f"{desc} {epoch + 1}/{epochs}", progress=progress)
        stats = EpochStats(mean_loss, acc, opt.param_groups[0]["lr"], time.perf_counter() - start)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history


# ----------------------------------------------------------------------------------- helpers


class _Source:
    """Batches of a :data:`TrainData`: tensors are shuffled by the loop's generator; a DataLoader
    keeps its own order and batch size."""

    def __init__(self, data: TrainData, batch_size: int) -> None:
        self.batch_size = batch_size
        self.loader = data if isinstance(data, DataLoader) else None
        if self.loader is None:
            self.x, self.y = _tensors(data)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return math.ceil(len(self.x) / self.batch_size)

    def batches(self, gen: torch.Generator) -> Iterator[tuple[Tensor, Tensor | None]]:
        if self.loader is not None:
            for batch in self.loader:
                if isinstance(batch, Tensor):
                    yield batch, None
                else:
                    yield batch[0], batch[1].long()
            return
        order = torch.randperm(len(self.x), generator=gen)
        for i in range(0, len(self.x), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], None if self.y is None else self.y[idx]


def _tensors(data: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` tensors of the data (``y`` None when unlabelled): free for tensors and a
    TensorDataset, else stacked once from a map-style dataset."""
    if isinstance(data, Tensor):
        x, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data[0], data[1]
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[0], data.tensors[1] if len(data.tensors) >= 2 else None
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("empty dataset")
        items = [data[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise TypeError(f"training data must be (x, y) tensors, a tensor, a Dataset or a DataLoader; "
                        f"got {type(data).__name__}")
    if len(x) == 0:
        raise ValueError("empty dataset")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    return x, None if y is None else y.long()


def _epoch(model: nn.Module, source: _Source, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler, loss_fn: Loss, *, gen: torch.Generator,
           dev: torch.device, augment: Augment | None, desc: str, progress: bool | None) -> tuple[float, float | None]:
    """One pass with a per-step schedule; returns (mean loss, training accuracy or None)."""
    model.train()
    total_loss, correct, seen, labelled = 0.0, 0, 0, True
    bar = tqdm(total=len(source), desc=desc, leave=False,
               disable=progress is False or not sys.stderr.isatty())  # a captured log: no per-step lines
    for xb, yb in source.batches(gen):
        xb = xb.to(dev, non_blocking=True)
        yb = None if yb is None else yb.to(dev, non_blocking=True)
        if augment is not None:
            xb = augment(xb, gen)
        logits = model(xb)
        loss = loss_fn(logits, yb, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total_loss += loss.item() * len(xb)
        seen += len(xb)
        if yb is None:
            labelled = False
        else:
            correct += int((logits.argmax(1) == yb).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return total_loss / seen, correct / seen if labelled else None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
