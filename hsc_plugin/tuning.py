"""Measured execution of 1×1 convs for NCHW inference on CPU (a deployment transform).

Factorised models are chains of thin 1×1 convs, and PyTorch's CPU conv kernel for NCHW inputs is,
for some of their shapes, many times slower than the same product as a plain matrix multiply
(``benchmarks/results/pointwise_layout.md``: an expanding 20 → 192 channel 1×1 on a 63×63 map at
batch 8 took 13.4 ms as an NCHW conv and 1.95 ms as a matmul, at 2 threads). Which one wins depends
on the shape, the batch, the thread count and the CPU, so :func:`tune_pointwise` times both on the
user's device, for each 1×1 conv at the shape the example input gives it, and keeps the faster.

A tuned layer is a :class:`PointwiseConv2d`: an ``nn.Conv2d`` with the same parameters and
``state_dict`` whose inference forward on NCHW CPU inputs is the matmul. Training, grad
mode, tracing, scripting and compilation see the conv, so torch-pruning, export and fine-tuning
behave as on the untuned model. Channels_last inputs keep the conv (there it is already a matrix
multiply, and the fastest form, ``docs/speed.md``).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from hsc_plugin.compressors.base import set_submodule
from hsc_plugin.cost.timing import round_robin

__all__ = ["tune_pointwise", "PointwiseConv2d"]

_EXECUTIONS = ("auto", "matmul", "conv")


class PointwiseConv2d(nn.Conv2d):
    """A 1×1 conv (stride 1, no padding, one group) that runs as ``W @ x`` on NCHW CPU
    inputs at inference, where that was measured faster than the conv kernel; otherwise the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._eager(x)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or not _nchw(x)):
            return self._conv_forward(x, self.weight, self.bias)
        return _matmul(self, x)


def _nchw(x: torch.Tensor) -> bool:
    """A 4-d CPU tensor laid out NCHW (contiguous, or a crop of such a map: rows innermost)."""
    return x.dim() == 4 and x.device.type == "cpu" and x.stride(3) == 1 and x.stride(1) >= x.stride(2)


def _matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The 1×1 conv of an NCHW ``x`` as one batched matrix product (no layout change; a crop is
    copied into one block first, as the conv kernel would)."""
    n, c, h, w = x.shape
    y = torch.matmul(conv.weight.view(conv.out_channels, c), x.reshape(n, c, h * w))
    if conv.bias is not None:
        y += conv.bias.view(-1, 1)
    return y.view(n, conv.out_channels, h, w)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid") and m.padding_mode == "zeros")


def _pointwise(conv: nn.Conv2d) -> PointwiseConv2d:
    """The same layer as a :class:`PointwiseConv2d`, sharing its parameters."""
    new = PointwiseConv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None,
                          device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    return new.train(conv.training)


def _input_shapes(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...],
                  names: list[str]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each named layer's first input: (shape, laid out NCHW), from one inference pass."""
    seen: dict[str, tuple[tuple[int, ...], bool]] = {}
    hooks = []
    for name in names:
        def pre(_m: nn.Module, inp: tuple[Any, ...], name: str = name) -> None:
            x = inp[0]
            if name not in seen and isinstance(x, torch.Tensor):
                seen[name] = (tuple(x.shape), _nchw(x))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def tune_pointwise(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], *,
                   execution: str = "auto", runs: int = 10, margin: float = 0.1, inplace: bool = False,
                   within: type | tuple[type, ...] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> nn.Module:
    """Give every 1×1 conv (dense or a factor; stride 1, no padding, one group) the faster of the
    conv kernel and a matmul for inference on ``example``'s batch size, layout and device.

    ``execution="auto"`` times both executions of each layer on a random input of the shape
    ``example`` gives it, interleaved (``runs`` pairs after 2 warm-up pairs; medians), and switches
    a layer to the matmul only where it is faster by more than ``margin`` (a fraction of the conv's
    time), since a switch that gains nothing only adds a second code path. ``"matmul"`` switches
    every eligible layer without timing, ``"conv"`` none. Layers that see a channels_last or
    non-CPU input keep the conv. ``within``: only the 1×1 convs inside modules of these types
    (e.g. ``FactorisedModule``: the factors, leaving the model's own dense layers as they are).

    Returns the tuned model (a copy unless ``inplace``); ``model.tuned_pointwise`` lists, per
    eligible layer: ``name``, ``shape``, ``conv_ms`` and ``matmul_ms`` (``None`` when not timed)
    and the ``execution`` kept. Outputs equal the untuned model's to float rounding, and the
    ``state_dict`` is unchanged, so weights load either way; tune again on each deployment device.
    """
    if execution not in _EXECUTIONS:
        raise ValueError(f"execution must be one of {_EXECUTIONS}, got {execution!r}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if not isinstance(example, (torch.Tensor, tuple)):
        raise TypeError(f"example must be a tensor (or a tuple of the model's inputs), got {type(example).__name__}")
    if model.training:
        raise RuntimeError("tune_pointwise times inference: call model.eval() first")
    target = model if inplace else copy.deepcopy(model)
    scopes = None if within is None else [n for n, m in target.named_modules() if isinstance(m, within)]
    names = [n for n, m in target.named_modules() if _eligible(m)
             and (scopes is None or any(p == "" or n.startswith(p + ".") for p in scopes))]
    shapes = _input_shapes(target, example, names)
    records: list[dict[str, Any]] = []
    swaps: list[tuple[str, nn.Conv2d]] = []
    with torch.inference_mode():
        for name in names:
            conv: nn.Conv2d = target.get_submodule(name)  # type: ignore[assignment]
            if name not in shapes:  # not run by this example
                continue
            shape, nchw = shapes[name]
            rec: dict[str, Any] = {"name": name, "shape": shape, "conv_ms": None, "matmul_ms": None,
                                   "execution": "conv"}
            records.append(rec)
            if not nchw or execution == "conv":
                continue
            if execution == "auto":
                x = torch.randn(shape, dtype=conv.weight.dtype)
                t = round_robin({"conv": lambda: conv(x), "matmul": lambda: _matmul(conv, x)},
                                runs=runs, warmup=2, timer=clock)
                rec["conv_ms"], rec["matmul_ms"] = t["conv"]["median_ms"], t["matmul"]["median_ms"]
                if not rec["matmul_ms"] < (1.0 - margin) * rec["conv_ms"]:
                    continue
            rec["execution"] = "matmul"
            swaps.append((name, conv))
    for name, conv in swaps:  # after all timing: a failure above leaves the model as it was
        set_submodule(target, name, _pointwise(conv))
    target.tuned_pointwise = records
    return target
