"""Calibration: turn whatever the user passes into batches, and stream statistics through hooks.

Statistics are *accumulators* attached to a layer with a forward hook. They keep running sums
(second moments are additive), so memory does not grow with the amount of calibration data,
and sums from several processes or several passes simply add.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "CalibrationError",
    "iter_batches",
    "first_batch",
    "first_samples",
    "LayerInfo",
    "trace_layers",
    "Accumulator",
    "OutputMoment",
    "InputChannelMoment",
    "run_calibration",
    "check_batch",
    "progress_enabled",
]


class CalibrationError(ValueError):
    """Calibration data is missing, empty or does not fit the model."""


def progress_enabled(progress: bool | None) -> bool:
    """Progress bars are on when asked, or by default when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


def _extract(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    if isinstance(item, Mapping):
        for key in ("image", "images", "input", "inputs", "x", "pixel_values"):
            if key in item and isinstance(item[key], torch.Tensor):
                return item[key]
    raise CalibrationError(
        f"Calibration items must be tensors, (input, label) pairs or dicts with an 'image'/'input' "
        f"tensor; got {type(item).__name__}"
    )


def iter_batches(calib: Any, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Yield input batches from a tensor, an iterable of tensors / (x, y) pairs, or a DataLoader.

    A single tensor is split into batches of ``batch_size`` along dim 0.
    """
    if calib is None:
        raise CalibrationError("No calibration data given (calib=None)")
    if isinstance(calib, torch.Tensor):
        if calib.dim() == 0 or calib.shape[0] == 0:
            raise CalibrationError(f"Calibration tensor is empty (shape {tuple(calib.shape)})")
        yield from calib.split(batch_size)
        return
    if not isinstance(calib, Iterable):
        raise CalibrationError(f"calib must be a tensor, an iterable or a DataLoader, got {type(calib).__name__}")
    count = 0
    for item in calib:
        x = _extract(item)
        if x.dim() == 0 or x.shape[0] == 0:
            continue
        count += 1
        yield x
    if count == 0:
        raise CalibrationError("Calibration data is empty: it yielded no batch")


def batch_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Which batch ``x`` is, for caches of per-batch outputs: its memory, shape and strides. The
    cache must hold ``x`` while it keeps the entry, or another batch could reuse that memory."""
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


def first_samples(calib: Any, n: int) -> torch.Tensor:
    """The first ``n`` calibration samples as one tensor (what recovery and the choice of candidate
    run on, and what the report's per-layer errors are measured on after a work-capped choice)."""
    parts, have = [], 0
    for x in iter_batches(calib):
        parts.append(x[: n - have])
        have += parts[-1].shape[0]
        if have >= n:
            break
    return torch.cat(parts)


class _Skipping:
    """The calibration data without its first ``n`` samples, iterable as often as asked."""

    def __init__(self, calib: Any, n: int) -> None:
        self.calib, self.n = calib, int(n)

    def __iter__(self) -> Iterator[torch.Tensor]:
        skip = self.n
        for x in iter_batches(self.calib):
            if skip >= x.shape[0]:
                skip -= x.shape[0]
                continue
            yield x[skip:]
            skip = 0


def skip_samples(calib: Any, n: int) -> Any:
    """The calibration data without its first ``n`` samples (``calib`` itself when ``n`` is 0): what
    the fits see when the first ones are held out to choose among candidate allocations."""
    return calib if n <= 0 else _Skipping(calib, n)


def first_batch(calib: Any) -> torch.Tensor:
    """The first calibration batch (for shape tracing); does not consume a tensor."""
    return next(iter_batches(calib))


def check_batch(x: torch.Tensor, ref: torch.Tensor | None) -> None:
    """Floating point, finite, and the same per-sample shape as the first batch ``ref``."""
    if not torch.is_floating_point(x):
        raise CalibrationError(f"Calibration inputs must be floating point, got dtype {x.dtype}")
    if ref is not None and x.shape[1:] != ref.shape[1:]:
        raise CalibrationError(
            f"Calibration batches disagree in shape: {tuple(x.shape[1:])} vs {tuple(ref.shape[1:])} "
            "per sample"
        )
    if not torch.isfinite(x).all():
        raise CalibrationError("Calibration inputs contain NaN or Inf")


@dataclass
class LayerInfo:
    """What a forward pass shows about a layer: its input and output shapes (per sample)."""

    name: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int = 1
    macs: int = 0  # the dense layer's MACs per sample and parameters, as the pipeline counted them
    params: int = 0
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per layer and shared by every plan of the layer (a layer has
        up to a dozen forms; on VGG's 4096×512×7×7 classifier conv each float64 copy of the weight
        is 800 MB and each Gram eigen-decomposition seconds)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def release(self) -> None:
        """Drop what :meth:`derived` holds (plans that still use it keep their own references)."""
        self._derived.clear()

    def weight64(self) -> torch.Tensor:
        """The layer's weight in float64 (one copy per layer, see :meth:`derived`)."""
        return self.derived("weight64", lambda: self.module.weight.detach().double())

    def dense_cost(self) -> dict[str, float]:
        """The dense layer's cost in every counted metric."""
        return {"macs": float(self.macs), "params": float(self.params)}

    @property
    def in_hw(self) -> tuple[int, int]:
        return (self.in_shape[-2], self.in_shape[-1]) if len(self.in_shape) >= 3 else (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.out_shape[-2], self.out_shape[-1]) if len(self.out_shape) >= 3 else (1, 1)

    @property
    def positions(self) -> int:
        """Output positions per sample at which the layer's matrix is applied."""
        if isinstance(self.module, nn.Linear):
            n = 1
            for d in self.out_shape[:-1]:
                n *= d
            return n
        return self.out_hw[0] * self.out_hw[1]


class _StopForward(Exception):
    """Raised from a hook to end a calibration forward pass early."""


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except (CalibrationError, _StopForward):
        raise
    except Exception as exc:  # re-raised with the shape, which is what users get wrong
        raise CalibrationError(
            f"The model failed on a calibration batch of shape {tuple(x.shape)} "
            f"({type(exc).__name__}: {exc})"
        ) from exc


@torch.no_grad()
def trace_layers(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> dict[str, LayerInfo]:
    """One forward pass (first sample of ``example``) recording each named layer's shapes."""
    modules = dict(model.named_modules())
    infos: dict[str, LayerInfo] = {}
    handles = []

    def make_hook(name: str):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if name in infos:
                infos[name].calls += 1
                return
            infos[name] = LayerInfo(name, mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:]))

        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make_hook(n)))
    try:
        check_batch(example, None)
        _forward(model, example[:1])
    finally:
        for h in handles:
            h.remove()
    return infos


class Accumulator:
    """Running statistic of one layer, updated by a forward hook with (input, pre-bias output).

    ``needs_pass = False`` marks one already complete (derived from other statistics): the pipeline
    runs no calibration pass for it."""

    needs_pass: bool = True

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The running sums (for all-reduce across processes)."""
        raise NotImplementedError


def _channels_last_2d(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) or (N, *, C) for Linear → (rows, C)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


class ChannelMoment(Accumulator):
    """Uncentred channel second moment ``Σ t tᵀ`` over batch and positions, of the pre-bias
    output (``side="output"``, C_out × C_out) or of the input (``"input"``, C_in × C_in)."""

    side = "output"

    def __init__(self, channels: int, device: torch.device) -> None:
        self.S = torch.zeros(channels, channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        T = _channels_last_2d(y if self.side == "output" else x).double()
        self.S += T.T @ T
        self.count += T.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.count]


class OutputMoment(ChannelMoment):
    """``S = Σ y yᵀ`` of the pre-bias output (C_out × C_out)."""

    side = "output"


class InputChannelMoment(ChannelMoment):
    """Per-pixel input channel second moment ``Σ x xᵀ`` (C_in × C_in)."""

    side = "input"


def _pre_bias(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if bias is None:
        return out
    if out.dim() == 4:
        return out - bias.view(1, -1, 1, 1)
    return out - bias


def _all_reduce(accs: Iterable[Accumulator], n: int, device: torch.device) -> int:
    """Sum statistics (and the sample count) over processes when a torch.distributed group is
    initialised: each rank feeds its own shard, and every rank ends with the sums of all shards."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    for acc in accs:
        for t in acc.tensors():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    count = torch.tensor([float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count.item())


Hook = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]


def _stream(model: nn.Module, hooks: Mapping[str, Hook], calib: Any, *, progress: bool | None, desc: str,
            stop_early: bool = False) -> int:
    """The one calibration loop: every batch of ``calib`` through ``model`` with ``hooks[name](module,
    input, output)`` on the named layers; returns the number of samples.

    With ``stop_early`` each forward is cut short once every hooked layer has seen its batch (each is
    called once per forward): calibrating the early layers of a big model costs only the early part
    of the forward pass.
    """
    modules = dict(model.named_modules())
    pending: set[str] = set()

    def make_hook(name: str, fn: Hook):
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            fn(mod, inp[0], out)
            pending.discard(name)
            if stop_early and not pending:  # every hooked layer has its batch: skip the rest
                raise _StopForward

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n, fn)) for n, fn in hooks.items()]
    n = 0
    ref: torch.Tensor | None = None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        bar = tqdm(iter_batches(calib), desc=desc, unit="batch", disable=not progress_enabled(progress),
                   leave=False)
        for x in bar:
            check_batch(x, ref)
            ref = x if ref is None else ref
            if param is not None and x.dtype != param.dtype:
                x = x.to(param.dtype)
            pending.update(hooks)
            try:
                _forward(model, x.to(device))
            except _StopForward:
                pass
            n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return n


@torch.no_grad()
def run_calibration(
    model: nn.Module,
    accumulators: Mapping[str, Sequence[Accumulator]],
    calib: Any,
    *,
    progress: bool | None = None,
    desc: str = "calibration",
    stop_early: bool = False,
) -> int:
    """Forward all calibration batches, feeding every layer's accumulators with (input, pre-bias
    output); returns #samples (summed over processes under torch.distributed).

    The model must be in eval mode (batch norm must use its running statistics). ``stop_early``:
    see :func:`_stream`.
    """
    def feed(accs: Sequence[Accumulator]) -> Hook:
        def hook(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
            y = _pre_bias(mod, out)
            for acc in accs:
                acc.update(x, y)

        return hook

    # Accumulators already complete (``needs_pass = False``) are neither fed nor summed across
    # processes: what they hold comes from statistics that were.
    live = {name: [a for a in accs if a.needs_pass] for name, accs in accumulators.items()}
    hooks = {name: feed(accs) for name, accs in live.items() if accs}
    n = _stream(model, hooks, calib, progress=progress, desc=desc, stop_early=stop_early)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    n = _all_reduce((a for accs in live.values() for a in accs), n, device)
    for name, accs in live.items():  # model order: the first layer named is where it starts
        # A sum is non-finite iff some entry is (short of 1e308 overflow), without a mask the size
        # of the statistics.
        if any(not bool(torch.isfinite(t.sum())) for acc in accs for t in acc.tensors()):
            raise CalibrationError(
                f"Layer {name!r} saw NaN or Inf activations during calibration (its input or output "
                "overflowed, or the model computes NaN); check the calibration data's scale and the "
                "model's weights and buffers"
            )
    return n


@torch.no_grad()
def measure_errors(work: nn.Module, new_modules: dict[str, nn.Module], calib: Any, *,
                   desc: str = "error", progress: bool | None = None) -> dict[str, float]:
    """Relative pre-bias output error of each new module on the layer's own calibration inputs."""
    if not new_modules:
        return {}
    sums = {n: [0.0, 0.0] for n in new_modules}

    def compare(name: str, new: nn.Module) -> Hook:
        def hook(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
            sums[name][0] += float((new(x) - out).double().pow(2).sum())
            sums[name][1] += float(_pre_bias(mod, out).double().pow(2).sum())

        return hook

    _stream(work, {n: compare(n, m) for n, m in new_modules.items()}, calib, progress=progress, desc=desc)
    return {n: (s[0] / s[1]) ** 0.5 if s[1] > 0 else 0.0 for n, s in sums.items()}
