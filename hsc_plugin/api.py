"""``compress``: the one entry point that every adapter and the CLI call."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hsc_plugin.budget import Budget
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.registry import create
from hsc_plugin.report import CompressionResult
from hsc_plugin.targets import TargetSpec

__all__ = ["compress", "create_compressor"]


def create_compressor(method: str | Compressor = "hsc", **options: Any) -> Compressor:
    """A compressor by registered name (``hsc``, ``global_svd``, ``tucker2`` …) with its options.

    An option the compressor does not take is an error that lists the ones it does.
    """
    return create("compressor", method, Compressor, **options)


def compress(
    model: nn.Module,
    method: str | Compressor = "hsc",
    calib: Any = None,
    budget: Budget | str | float | None = None,
    *,
    targets: TargetSpec = None,
    exclude: TargetSpec = None,
    inplace: bool = False,
    example_input: torch.Tensor | None = None,
    **options: Any,
) -> CompressionResult:
    """Compress ``model`` by low-rank factorisation and return the model and a report.

    ``method`` is a registered compressor name or a :class:`Compressor`; ``calib`` a tensor, an
    iterable of tensors / (input, label) pairs, or a DataLoader; ``budget`` a :class:`Budget`
    (or ``"3x"`` / ``3.0``, meaning 3× fewer MACs); ``targets``/``exclude`` select layers by
    name, glob pattern, type or predicate (default: every Conv2d and Linear that can save cost).
    Other keyword options go to the compressor (e.g. ``data_aware=True``, ``rank="energy",
    energy=0.95``). The input model is not modified unless ``inplace=True``.
    """
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif isinstance(budget, (int, float)) and not isinstance(budget, bool):
        budget = Budget(float(budget))
    compressor = create_compressor(method, **options)
    return compressor.compress(model, calib, targets=targets, exclude=exclude, budget=budget,
                               inplace=inplace, example_input=example_input)
