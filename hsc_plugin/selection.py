"""Recovery and choice: the compressed model is judged by what it outputs on the calibration data.

Every candidate allocation (the compressor's own, and any others it asks for — HSC reproduces its
baselines' allocations from the same statistics) is built into a copy of the model, recovered
without labels (:mod:`hsc_plugin.recovery`: BatchNorm re-estimation, bias correction — each kept
only where it lowers the error), and its output error against the uncompressed model on the
calibration inputs is measured; the lowest wins. So a compressor that offers its baselines'
allocations is never worse than them on the calibration data, by construction.

With ``holdout`` (a compressor option) the first samples are held out of every fit — the
statistics the factors come from, and the recovery — and the candidates are compared on them
alone: a candidate with more fitted parameters is then not favoured by fitting the very samples it
is judged on (:func:`hsc_plugin.pipeline.prepare` splits the data).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hsc_plugin.allocation import Allocation
from hsc_plugin.calibration import batch_key, first_samples

if TYPE_CHECKING:
    from hsc_plugin.compressors.base import Compressor
    from hsc_plugin.pipeline import Prepared

__all__ = ["Selected", "select", "selection_plan", "MIN_SELECTION_SAMPLES"]

MIN_SELECTION_SAMPLES = 16
"""Fewest calibration samples a work-capped selection stage runs on (BatchNorm statistics and the
error comparison need some): below it the refit is dropped rather than the samples."""


@dataclass
class Selected:
    """The winning candidate: its allocation, the recovered model and how every candidate did."""

    name: str
    alloc: Allocation
    model: nn.Module
    error: float | None = None  # relative output error on the calibration data (None: no data)
    recovery: dict[str, Any] | None = None
    candidates: dict[str, float] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The new modules as they are in the chosen model (recovery may have replaced them)."""
        return {n: self.model.get_submodule(n) for n in self.alloc.modules}


def _install(work: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    from hsc_plugin.compressors.base import set_submodule

    model = copy.deepcopy(work)
    for n, m in modules.items():
        set_submodule(model, n, m)
    return model


class _Replay(nn.Module):
    """A reference model whose outputs on the selection batches are computed once and replayed:
    every candidate is compared with the same reference outputs at half the forward passes."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.reference = reference
        self._cache: dict[tuple[Any, ...], tuple[torch.Tensor, Any]] = {}

    def forward(self, x: torch.Tensor) -> Any:
        key = batch_key(x)
        if key not in self._cache:
            self._cache[key] = (x, self.reference(x))  # x held: its memory cannot be reused by another batch
        return self._cache[key][1]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _lossless(alloc: Allocation) -> bool:
    """Every factorised layer at full rank: nothing to recover (and the model stays exact)."""
    return all(p.discarded(r) <= 1e-12 for p, r in zip(alloc.plans, alloc.ranks))


def selection_plan(compressor: "Compressor", macs_per_sample: float, n_layers: int, n_candidates: int,
                   samples: int, *, batchnorm: bool = True) -> dict[str, Any]:
    """How the recovery-and-choice stage runs within ``compressor.selection_gmacs``.

    Its work is counted in dense forward passes of the calibration subset: per candidate one error
    measurement, two per recovery step (the step, then its error), and the sequential refit about
    half a pass per factorised layer (each layer's pass stops after it) plus its error; two more for
    the reference. (The refit's targets, the reference's layer outputs, are computed once for all
    candidates within ``max_stats_gb``: :class:`hsc_plugin.refit.ReferenceOutputs`. That halved
    the refit's real work and is not subtracted here, so the cap decides as it did before it.)
    In that order of preference, within the cap: every candidate refitted ("each");
    candidates compared after BatchNorm re-estimation / bias correction only and the winner alone
    refitted ("winner", at fewer samples if need be, never below :data:`MIN_SELECTION_SAMPLES`);
    no refit ("none", at fewer samples). MACs, not seconds, so the choice is the same on every
    machine (seeded results stay reproducible). On the MRI AlexNet the stage is ~0.6 TMAC and
    nothing changes; on resnet50 at 256 samples it would be ~165 TMAC (hours on 2 cores).
    ``batchnorm=False`` (a model without BatchNorm statistics): BN re-estimation does no passes, so
    none are counted for it.
    """
    bn = compressor.bn_reestimation and batchnorm
    steps = 2 * (int(bn) + int(compressor.bias_correction))
    per_candidate = 1 + steps
    refit = 0.5 * n_layers + 1 if compressor.sequential_refit else 0.0
    cap = compressor.selection_gmacs
    modes: list[tuple[str, float]] = [("each", 2 + n_candidates * (per_candidate + refit))]
    if refit and n_candidates > 1:
        modes.append(("winner", 2 + n_candidates * per_candidate + refit + per_candidate))
    modes.append(("none", 2 + n_candidates * per_candidate))
    out: dict[str, Any] = {}
    for i, (mode, passes) in enumerate(modes):
        fits = samples if cap is None else int(cap * 1e9 // max(1.0, macs_per_sample * passes))
        last = i == len(modes) - 1
        if fits >= samples or (fits >= MIN_SELECTION_SAMPLES and mode != "each") or last:
            n = max(1, min(samples, max(fits, MIN_SELECTION_SAMPLES if last else fits)))
            out = {"refit": mode if refit else "none", "samples": n, "asked_samples": samples,
                   "gmacs": macs_per_sample * passes * n / 1e9, "cap_gmacs": cap}
            break
    return out


def select(compressor: "Compressor", prep: "Prepared", allocations: dict[str, Allocation]) -> Selected:
    """Build, recover and measure every candidate; keep the one with the lowest output error.

    Without calibration data there is nothing to measure: the first candidate is built as it is.
    The error is measured against the uncompressed model — with its BatchNorm statistics
    re-estimated on the same calibration data when recovery re-estimates the compressed model's
    (so BN re-estimation is judged by what the compression lost, not by how far the model's
    training-time statistics are from the user's data).
    """
    from hsc_plugin.recovery import _batchnorms, output_error, recover, reestimate_bn
    from hsc_plugin.refit import ReferenceOutputs

    names = list(allocations)
    if _distributed():
        warnings.warn("under torch.distributed each process holds its own calibration shard: label-free recovery "
                      "and the choice among candidate allocations are skipped (the compressor's own allocation "
                      "is used), so every process builds the same model", stacklevel=4)
        alloc = allocations[names[0]]
        return Selected(names[0], alloc, _install(prep.work, alloc.modules))
    if prep.calib is None or (not compressor.measure_error and len(names) == 1 and not compressor.recovers()):
        alloc = allocations[names[0]]
        return Selected(names[0], alloc, _install(prep.work, alloc.modules))
    held = prep.held  # prep.fit is the calibration data without these (all of it when None)
    calib = first_samples(prep.fit, compressor.selection_samples - (held.shape[0] if held is not None else 0))
    reference: nn.Module = prep.work
    recovering = compressor.recovers() and not all(_lossless(a) for a in allocations.values())
    batchnorm = bool(_batchnorms(prep.work))
    stage: dict[str, Any] = {"refit": "each" if compressor.sequential_refit else "none"}
    if recovering:
        stage = selection_plan(compressor, float(prep.before.macs),
                               max(len(a.modules) for a in allocations.values()), len(names), calib.shape[0],
                               batchnorm=batchnorm)
        calib = calib[:stage["samples"]]
        if stage["samples"] < stage["asked_samples"] or stage["refit"] == "winner" or (
                compressor.sequential_refit and stage["refit"] == "none"):
            warnings.warn(
                f"{compressor.name}: the recovery and choice among {len(names)} candidates would take more than "
                f"selection_gmacs={compressor.selection_gmacs:g} GMACs of forward passes; they run on "
                f"{stage['samples']} of {stage['asked_samples']} samples with the sequential refit "
                + {"winner": "on the chosen candidate only", "none": "off"}.get(stage["refit"], "on every candidate")
                + " (raise selection_gmacs, or None, to spend more)", stacklevel=4)
    if recovering and compressor.bn_reestimation and batchnorm:  # without BatchNorm: the model as it is
        reference = copy.deepcopy(prep.work)
        if reestimate_bn(reference, calib, batch_size=compressor.calib_batch_size) == 0:
            reference = prep.work  # no BatchNorm the data reaches
    features, reference = reference, _Replay(reference)
    # The refit's targets (the uncompressed layers' outputs) are the same for every candidate:
    # computed in one reference pass per batch, within the statistics' memory limit.
    kept = ReferenceOutputs(features, [n for a in allocations.values() for n in a.modules],
                            None if compressor.max_stats_gb is None else compressor.max_stats_gb * 2**30)

    def recovered(model: nn.Module, alloc: Allocation, refit: bool) -> dict[str, Any]:
        originals = {n: prep.infos[n].module for n in alloc.modules}
        info = recover(reference, model, originals, calib, bn=compressor.bn_reestimation,
                       bias=compressor.bias_correction, refit=refit, refresh_reference=False,
                       batch_size=compressor.calib_batch_size, features=features, kept=kept)
        info["selection"] = stage
        return info

    def judged(model: nn.Module, error: float, info: dict[str, Any] | None) -> tuple[float, dict[str, Any] | None]:
        """The error the candidates are compared by: on the held-out samples when there are any
        (no fit has seen them; the fitting error is kept in ``info``), else ``error`` itself."""
        if held is None:
            return error, info
        on_held = output_error(reference, model, held, batch_size=compressor.calib_batch_size)
        return on_held, dict(info or {}, held_out={"samples": int(held.shape[0]), "fit_error": error, "error": on_held})

    best: Selected | None = None
    scores: dict[str, float] = {}
    for name in names:
        alloc = allocations[name]
        # When only the winner is refitted later, it must start from its modules as built, so
        # this pass recovers copies (recovery steps may change modules in place).
        model = _install(prep.work, {n: copy.deepcopy(m) for n, m in alloc.modules.items()}
                         if stage["refit"] == "winner" else alloc.modules)
        info: dict[str, Any] | None = None
        if recovering and alloc.modules and not _lossless(alloc):
            info = recovered(model, alloc, refit=stage["refit"] == "each")
            error = float(info["error_after"])
        else:
            error = output_error(reference, model, calib, batch_size=compressor.calib_batch_size)
        error, info = judged(model, error, info)
        scores[name] = error
        if best is None or error < best.error:  # type: ignore[operator]
            best = Selected(name, alloc, model, error, info)
    assert best is not None
    if stage["refit"] == "winner" and best.recovery and "steps" in best.recovery:  # the refit, for the winner only
        model = _install(prep.work, best.alloc.modules)
        info = recovered(model, best.alloc, refit=True)
        error, info = judged(model, float(info["error_after"]), info)
        if error < best.error:  # type: ignore[operator]
            best = Selected(best.name, best.alloc, model, error, info)
            scores[best.name] = best.error  # type: ignore[assignment]
    best.candidates = scores
    return best
