"""Label-free recovery after factorisation: steps that use only calibration inputs (no labels).

Applied to a compressed model of any compressor, after its factorised modules are built:

- :func:`correct_bias`: each factorised layer's mean output shift ``E[y − ŷ]`` (original minus
  factorised, on the same input, per output channel and per region of a regional form) is added
  to its output bias. A factorisation keeps the dominant directions but not the mean, and a mean
  shift is passed on to every later layer.
- :func:`reestimate_bn`: BatchNorm running statistics recomputed on the compressed model's own
  activations (cumulative average), since the old ones describe the dense model's.
- :func:`hsc_plugin.refit.sequential_refit`: each layer's final linear factor refitted in forward
  order on the partially compressed model's features, towards the uncompressed layer's outputs.
- :func:`recover`: these, each kept only if it lowers :func:`output_error`, the relative L2 error of
  the model's outputs against the uncompressed model's on the calibration data (by default the
  uncompressed model with its BN statistics re-estimated on the same data), so recovery never
  increases that error. Measured defaults of the compressors: sequential refit on, BN
  re-estimation on, bias correction off.

Every function restores the modules' train/eval modes and leaves the model as it was on error.
The guard compares errors measured in separate passes, so ``calib`` should give the same batches
on every iteration (a tensor, a list, a DataLoader without shuffling or random augmentation).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hsc_plugin.calibration import Accumulator, CalibrationError, check_batch, iter_batches, run_calibration
from hsc_plugin.modules.base import FactorisedModule

if TYPE_CHECKING:
    from hsc_plugin.refit import ReferenceOutputs

__all__ = ["output_error", "reestimate_bn", "correct_bias", "recover", "replaced_modules"]


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _modes(*models: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _batched(calib: Any, batch_size: int) -> Any:
    """A tensor as a tuple of ``batch_size`` batches; anything else as it is (see iter_batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calib, torch.Tensor) and calib.dim() > 0:
        return calib.split(batch_size)
    return calib


def _inputs(calib: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Checked calibration batches (floating point, finite, one per-sample shape)."""
    ref: torch.Tensor | None = None
    for x in iter_batches(_batched(calib, batch_size)):
        check_batch(x, ref)
        ref = x if ref is None else ref
        yield x


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    p = next(model.parameters(), None)
    return model(x if p is None else x.to(device=p.device, dtype=p.dtype))


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples/lists/dicts of them), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for k in sorted(out, key=str) for t in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def replaced_modules(reference: nn.Module, model: nn.Module) -> dict[str, nn.Module]:
    """``originals`` for :func:`correct_bias` / :func:`recover`: every (outermost) factorised
    module of ``model`` mapped to the module at the same name in ``reference``."""
    ref = dict(reference.named_modules())
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, FactorisedModule) and name in ref and not any(name.startswith(p + ".") for p in found):
            found[name] = ref[name]
    return found


# ----------------------------------------------------------------------------- output error


@torch.no_grad()
def output_error(reference: nn.Module, model: nn.Module, calib: Any, *, batch_size: int = 64) -> float:
    """Relative L2 error ``sqrt(Σ‖f̂(x) − f(x)‖² / Σ‖f(x)‖²)`` of ``model``'s outputs against
    ``reference``'s over the calibration batches (over every tensor of tuple/dict outputs).

    Both models run in eval mode; their modes are restored.
    """
    num = den = 0.0
    with _modes(reference, model):
        reference.eval()
        model.eval()
        for x in _inputs(calib, batch_size):
            ref, out = _leaves(_run(reference, x)), _leaves(_run(model, x))
            if [t.shape for t in ref] != [t.shape for t in out]:
                raise ValueError(f"The models' outputs differ in structure or shape: "
                                 f"{[tuple(t.shape) for t in ref]} vs {[tuple(t.shape) for t in out]}")
            for r, o in zip(ref, out):
                r64 = r.double()
                num += float((o.to(r64) - r64).pow(2).sum())
                den += float(r64.pow(2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------- BN re-estimation


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (1d/2d/3d and subclasses, e.g. timm's) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def _bn_state(bns: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None} for bn in bns]


@torch.no_grad()
def _load_bn_state(bns: list[nn.Module], states: list[dict[str, torch.Tensor]]) -> None:
    for bn, state in zip(bns, states):
        for k, v in state.items():
            getattr(bn, k).copy_(v)


@torch.no_grad()
def reestimate_bn(model: nn.Module, calib: Any, *, batch_size: int = 64) -> int:
    """Recompute every BatchNorm's running mean/variance on the calibration batches.

    Only BN layers run in train mode (cumulative average, ``momentum=None``); everything else,
    dropout included, in eval. Modes and momenta are restored; a BN the data never reaches keeps
    its statistics. Returns how many BN layers were updated (0 and no pass without BN).
    """
    bns = _batchnorms(model)
    if not bns:
        return 0
    states, momenta = _bn_state(bns), [bn.momentum for bn in bns]
    seen: set[int] = set()
    hooks = [bn.register_forward_pre_hook(lambda m, _inp: seen.add(id(m))) for bn in bns]
    try:
        with _modes(model):
            model.eval()
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            for x in _inputs(calib, batch_size):
                _run(model, x)
    except BaseException:
        _load_bn_state(bns, states)
        raise
    finally:
        for h in hooks:
            h.remove()
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    unseen = [i for i, bn in enumerate(bns) if id(bn) not in seen]
    _load_bn_state([bns[i] for i in unseen], [states[i] for i in unseen])
    return len(bns) - len(unseen)


# ----------------------------------------------------------------------------- bias correction


class _Shift(Accumulator):
    """Σ ``original(x) − module(x)`` per (output region, channel), and the positions counted."""

    def __init__(self, original: nn.Module, module: FactorisedModule) -> None:
        self.original, self.module = original, module
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        bias = getattr(self.module, "bias", None)  # run_calibration hands over the pre-bias output
        out = y if not isinstance(bias, torch.Tensor) else y + (bias.view(1, -1, 1, 1) if y.dim() == 4 else bias)
        t = (_run(self.original, x).to(out) - out).double()
        if t.dim() == 4:
            boxes = self.module.output_bias_regions(t.shape[2], t.shape[3])
            sums = torch.stack([t[:, :, a:b, c:d].sum((0, 2, 3)) for a, b, c, d in boxes])
            counts = [t.shape[0] * (b - a) * (d - c) for a, b, c, d in boxes]
        else:
            flat = t.reshape(-1, t.shape[-1])
            sums, counts = flat.sum(0, keepdim=True), [flat.shape[0]]
        counts_t = torch.tensor(counts, dtype=torch.float64, device=sums.device)
        if self.sums is None:
            self.sums, self.counts = sums, counts_t
        elif self.sums.shape != sums.shape:
            raise CalibrationError(f"{type(self.module).__name__} changed its number of bias regions "
                                   f"between batches ({self.sums.shape[0]} vs {sums.shape[0]})")
        else:
            self.sums += sums
            self.counts += counts_t

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.sums is None else [self.sums, self.counts]

    def mean(self, name: str) -> torch.Tensor:
        """Mean per (region, channel); a region no position fell in gets the layer's mean."""
        if self.sums is None or self.counts is None or float(self.counts.sum()) == 0:
            raise CalibrationError(f"Layer {name!r} was not reached by the calibration data")
        overall = self.sums.sum(0) / self.counts.sum()
        c = self.counts[:, None]
        return torch.where(c > 0, self.sums / c.clamp_min(1), overall)


def _check_originals(model: nn.Module, originals: Mapping[str, nn.Module], *,
                     biased: bool = True) -> dict[str, FactorisedModule]:
    """The factorised modules ``originals`` names; each must take an output bias when ``biased``."""
    mods = dict(model.named_modules())
    out: dict[str, FactorisedModule] = {}
    for name in originals:
        if name not in mods:
            raise ValueError(f"originals names {name!r}, which is not a module of the model")
        m = mods[name]
        if biased and (not isinstance(m, FactorisedModule) or (m._output_layer() is None and
                       type(m).add_output_bias is FactorisedModule.add_output_bias)):
            raise TypeError(f"Module {name!r} ({type(m).__name__}) is not a factorised module that "
                            "implements add_output_bias")
        out[name] = m
    return out


@torch.no_grad()
def _apply(modules: Mapping[str, FactorisedModule], deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for n, d in deltas.items():
        p = next(modules[n].parameters())
        modules[n].add_output_bias(d.to(device=p.device, dtype=p.dtype))
    return {n: d.float().cpu() for n, d in deltas.items()}


@torch.no_grad()
def correct_bias(model: nn.Module, originals: Mapping[str, nn.Module], calib: Any, *,
                 batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Add each factorised layer's mean output shift ``E[original(x) − factorised(x)]`` to its bias.

    ``originals`` maps a factorised module's name in ``model`` to the dense module it replaced
    (:func:`replaced_modules`). The shift is measured in one calibration pass on the inputs each
    layer sees in ``model``, per output channel and per region of a regional form (the module's
    ``output_bias_regions``); a layer without a bias gets one. Returns each layer's added shift,
    shaped ``(n_regions, C_out)``.
    """
    modules = _check_originals(model, originals)
    if not modules:
        return {}
    backup = {n: copy.deepcopy(m) for n, m in modules.items()}
    accs = {n: _Shift(originals[n], m) for n, m in modules.items()}
    try:
        with _modes(model, *originals.values()):
            model.eval()
            for o in originals.values():
                o.eval()
            run_calibration(model, {n: [a] for n, a in accs.items()}, _batched(calib, batch_size),
                            progress=False, desc="bias correction")
            return _apply(modules, {n: a.mean(n) for n, a in accs.items()})
    except BaseException:
        for n, m in backup.items():
            _set(model, n, m)
        raise


# ----------------------------------------------------------------------------- guarded recovery


def _guarded(step: str, error: float, apply: Callable[[], Any], undo: Callable[[], None],
             measure: Callable[[], float]) -> dict[str, Any]:
    """Run ``apply()``; keep it if the output error did not grow, else ``undo()``."""
    t0 = time.perf_counter()
    info = apply()
    seconds = time.perf_counter() - t0
    after = measure()
    applied = after <= error
    if not applied:
        undo()
    return {"step": step, "applied": applied, "error_before": error, "error_after": after,
            "seconds": seconds, "info": info}


def _refit_step(features: nn.Module, model: nn.Module, names: list[str], calib: Any, error: float,
                measure: Callable[[], float], batch_size: int,
                kept: "ReferenceOutputs | None" = None) -> dict[str, Any]:
    from hsc_plugin.refit import sequential_refit

    modules = _check_originals(model, dict.fromkeys(names), biased=False)
    backup = {n: copy.deepcopy(m) for n, m in modules.items()}
    bns = _batchnorms(model)
    states = _bn_state(bns)

    def undo() -> None:
        for n, m in backup.items():
            _set(model, n, m)
        _load_bn_state(bns, states)

    return _guarded("sequential_refit", error, lambda: sequential_refit(
        features, model, names, calib, batch_size=batch_size, kept=kept), undo, measure)


def recover(reference: nn.Module, model: nn.Module, originals: Mapping[str, nn.Module], calib: Any, *,
            bn: bool = True, bias: bool = False, refit: bool = False, refresh_reference: bool = True,
            batch_size: int = 64, features: nn.Module | None = None,
            kept: "ReferenceOutputs | None" = None) -> dict[str, Any]:
    """Sequential refit, bias correction, then BN re-estimation, on ``model`` (in place), each kept
    only where it lowers the output error on ``calib`` and undone otherwise; so recovery never raises it.

    ``refit``: :func:`hsc_plugin.refit.sequential_refit`, with the layer outputs of ``features``
    (the uncompressed model the error is measured against, when ``reference`` only replays its
    outputs; default: that model) as targets. Off here by default; the compressors turn it on
    (their ``sequential_refit`` option, measured in ``benchmarks/results/sequential_mri.md``).
    ``kept``: :class:`hsc_plugin.refit.ReferenceOutputs` of ``features``, shared by the recoveries
    of several candidates on the same ``calib`` so the refit's targets are computed once.

    The error is :func:`output_error` against ``reference``, or with ``refresh_reference`` (``bn``
    on and BN layers in ``reference``) against a copy of it whose BN statistics are re-estimated on ``calib``:
    the uncompressed model given the statistics the recovered model gets, so that BN
    re-estimation is not judged by how far the reference's training-time statistics are from the
    calibration data's. Defaults by measurement (``benchmarks/results/recovery_mri.md``).

    Returns ``{"error_before", "error_after", "seconds", "reference", "steps": [...]}``, each
    step with ``applied``, ``error_before``/``error_after``, ``seconds`` (the step itself, not the
    error measurement) and ``info`` (the refit's layers, passes and moment bytes / layers
    bias-corrected / BN layers updated).
    """
    start = time.perf_counter()
    modules = _check_originals(model, originals, biased=bias)
    target = reference
    if refresh_reference and bn and _batchnorms(reference):
        target = copy.deepcopy(reference)
        reestimate_bn(target, calib, batch_size=batch_size)

    def measure() -> float:
        return output_error(target, model, calib, batch_size=batch_size)

    error = first = measure()
    steps: list[dict[str, Any]] = []
    if refit and originals:
        steps.append(_refit_step(features if features is not None else target, model, list(originals), calib,
                                 error, measure, batch_size, kept))
        error = min(error, steps[-1]["error_after"])
    if bias and modules:
        backup = {n: copy.deepcopy(m) for n, m in modules.items()}

        def undo_bias() -> None:
            for n, m in backup.items():
                _set(model, n, m)

        steps.append(_guarded("bias_correction", error, lambda: len(correct_bias(
            model, originals, calib, batch_size=batch_size)), undo_bias, measure))
        error = min(error, steps[-1]["error_after"])
    bns = _batchnorms(model)
    if bn and bns:
        states = _bn_state(bns)
        steps.append(_guarded("bn_reestimation", error, lambda: reestimate_bn(model, calib, batch_size=batch_size),
                              lambda: _load_bn_state(bns, states), measure))
        error = min(error, steps[-1]["error_after"])
    return {"error_before": first, "error_after": error, "seconds": time.perf_counter() - start,
            "reference": "refreshed BN" if target is not reference else "as given", "steps": steps}
