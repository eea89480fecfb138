"""Sequential refit: each factorised layer's final linear factor refitted on the partially
compressed model's own features, towards the uncompressed model's outputs (error compensation).

A factorised layer is fitted on the inputs the *uncompressed* layer sees; once earlier layers are
factorised, its real inputs differ, and the errors add up along the network. Here the layers are
taken in the order the model runs them; for layer ``l`` the calibration inputs run through the
model whose earlier layers are already refitted, the features ``z`` entering ``l``'s final linear
factor (the last 1×1 conv / Linear: ``FactorisedModule.final_linears``) are collected, and the
target ``y`` is the uncompressed layer's output on the uncompressed model's own input (the
reference model, same sample). The final factor and its bias are refitted by ridge least squares
on moments accumulated batch by batch (float64, ``(K+1)²`` and ``C_out·(K+1)`` per factor, never the
features themselves), shrunk towards the current factor::

    A = (S_yz + λ·A₀)(S_zz + λI)⁻¹,   z augmented with a constant 1 (the bias column)

so a direction the data does not excite keeps its current weights, and a factor that already fits
exactly (full rank, nothing before it) is left as it is. Regional forms refit each region's factor
on its own output box (HSC's module on the output side: each region × cluster factor on its own
box and channels). A factor without a bias gets one (the type's ``add_output_bias``). This is
DESIGN.md §5's sequential calibration restricted to the last factor: one pass of the calibration
subset per layer (each pass stopped after the layer).

Non-factorised BatchNorm layers first take the reference's running statistics, so that the
partially compressed model is the reference with its earlier layers replaced (the refit then
reproduces the reference layer by layer).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hsc_plugin.calibration import CalibrationError, batch_key
from hsc_plugin.modules.base import FactorisedModule
from hsc_plugin.recovery import _batchnorms, _bn_state, _inputs, _load_bn_state, _modes, _run, _set

__all__ = ["sequential_refit", "ReferenceOutputs", "DAMPING"]

DAMPING = 1e-2
"""Ridge λ as a fraction of the mean diagonal of the features' second moment (as GPTQ damps)."""


class _Stop(Exception):
    """Ends a forward pass once the layer being refitted has run."""


def _order(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """``names`` in the order ``model`` first runs them, and how often each runs per forward."""
    mods = dict(model.named_modules())
    seen: list[str] = []
    calls = dict.fromkeys(names, 0)

    def hook(name: str):
        def pre(_m: nn.Module, _inp: Any) -> None:
            calls[name] += 1
            if name not in seen:
                seen.append(name)
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        _run(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    return seen, {n: calls[n] for n in seen}


class ReferenceOutputs:
    """The reference's outputs at the factorised layers, per calibration batch, computed in one
    full pass per batch and kept for every refit that asks again.

    A refit needs, for each layer, the uncompressed layer's output on the uncompressed model's
    input; without this each layer costs a reference pass up to that layer, for every candidate
    allocation the selection stage refits. Those outputs are the same for every candidate (only the
    compressed model's features differ), so :func:`hsc_plugin.selection.select` keeps them here:
    one reference pass per batch in all, instead of about half a pass per layer per candidate.
    Past ``max_bytes`` nothing more is kept and the refits run their own reference passes, as
    without a cache (same targets, so the same results either way). Batches are told apart by
    their memory, shape and strides (each batch is held, so its memory is not reused): the
    calibration tensor must not be changed in place while the cache is used.
    """

    def __init__(self, reference: nn.Module, names: list[str], max_bytes: float | None) -> None:
        self.reference = reference
        self.names = list(dict.fromkeys(names))
        self.max_bytes = max_bytes
        self.bytes = 0
        self.passes = 0  # full reference passes run to fill the cache
        self.enabled = True
        self._kept: dict[tuple[Any, ...], tuple[torch.Tensor, dict[str, list[torch.Tensor]]]] = {}

    @torch.no_grad()
    def outputs(self, name: str, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Layer ``name``'s outputs on batch ``x`` (one per call), or None: not a layer this cache
        covers, or the cache is full (the caller runs the reference itself)."""
        if not self.enabled or name not in self.names:
            return None
        key = batch_key(x)
        if key not in self._kept:
            got = self._pass(x)
            size = sum(t.numel() * t.element_size() for ts in got.values() for t in ts)
            if self.max_bytes is not None and self.bytes + size > self.max_bytes:
                self.enabled = False
                self._kept.clear()
                return got[name]
            self.bytes += size
            self._kept[key] = (x, got)  # x held: its memory cannot be reused by another batch
        return self._kept[key][1][name]

    def _pass(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        handles = []
        for n in self.names:
            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor, n: str = n) -> None:
                got[n].append(out.detach().clone())  # a later in-place op (ReLU) must not change it
            handles.append(self.reference.get_submodule(n).register_forward_hook(hook))
        try:
            with _modes(self.reference):
                self.reference.eval()
                _run(self.reference, x)
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        return got


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, *, C) as (positions, C), float64."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
    return t.reshape(-1, t.shape[-1]).double()


class _Moments:
    """``S_zz`` and ``S_yz`` of one final factor, ``z`` augmented with a constant 1."""

    def __init__(self) -> None:
        self.zz: torch.Tensor | None = None
        self.yz: torch.Tensor | None = None

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        Z, Y = _rows(z), _rows(y.to(z.device))
        Z = torch.cat([Z, Z.new_ones(Z.shape[0], 1)], 1)
        zz, yz = Z.T @ Z, Y.T @ Z
        if self.zz is None:
            self.zz, self.yz = zz, yz
        else:
            self.zz += zz
            self.yz += yz

    def bytes(self) -> int:
        return 0 if self.zz is None else (self.zz.numel() + self.yz.numel()) * 8  # type: ignore[union-attr]


def _check_final(name: str, lin: nn.Module) -> None:
    ok = isinstance(lin, nn.Linear) or (isinstance(lin, nn.Conv2d) and tuple(lin.kernel_size) == (1, 1)
                                        and tuple(lin.stride) == (1, 1) and lin.padding in ((0, 0), "valid")
                                        and tuple(lin.dilation) == (1, 1))
    if not ok:
        raise TypeError(f"Layer {name!r}: final_linears() must return nn.Linear or 1x1 stride-1 unpadded "
                        f"nn.Conv2d modules, got {lin!r}")


@torch.no_grad()
def _solve(lin: nn.Module, mom: _Moments, damping: float) -> bool:
    """Replace ``lin``'s weight and bias by the ridge fit (per group); False if it saw no data."""
    if mom.zz is None or float(mom.zz[-1, -1]) == 0.0:
        return False
    w = lin.weight
    groups = getattr(lin, "groups", 1)
    out_g, k_g = w.shape[0] // groups, w.shape[1]
    a0 = w.detach().reshape(w.shape[0], k_g).double()
    if lin.bias is not None:  # the intercept is fitted with the weights
        a0 = torch.cat([a0, lin.bias.detach().double()[:, None]], 1)
    new = torch.empty_like(a0)
    for g in range(groups):
        rows = slice(g * out_g, (g + 1) * out_g)
        cols = list(range(g * k_g, (g + 1) * k_g)) + ([mom.zz.shape[0] - 1] if lin.bias is not None else [])
        szz = mom.zz[cols][:, cols]
        syz = mom.yz[rows][:, cols]  # type: ignore[index]
        lam = damping * float(szz.diagonal()[:k_g].mean()) if k_g else 0.0
        lam = max(lam, 1e-12 * float(szz.diagonal().max()), 1e-300)
        eye = torch.eye(len(cols), dtype=szz.dtype, device=szz.device)
        new[rows] = torch.linalg.solve(szz + lam * eye, (syz + lam * a0[rows]).T).T  # symmetric system
    if not torch.isfinite(new).all():
        return False
    w.copy_(new[:, :k_g].reshape(w.shape).to(w))
    if lin.bias is not None:
        lin.bias.copy_(new[:, -1].to(lin.bias))
    return True


def _target(module: FactorisedModule, i: int, y: torch.Tensor) -> torch.Tensor:
    """The part of the reference output ``y`` that final factor ``i`` produces (box, channels)."""
    if y.dim() != 4:
        f = module.final_linears(1, 1)[i]
        return y if f.channels is None else y[..., f.channels]
    f = module.final_linears(y.shape[2], y.shape[3])[i]
    o0, o1, q0, q1 = f.box
    t = y[:, :, o0:o1, q0:q1]
    return t if f.channels is None else t[:, f.channels]


def _give_biases(module: FactorisedModule, finals: list[nn.Module], channels: int) -> None:
    """Every final factor gets a bias (zero), the type's own way, so the intercept is fitted too;
    a type that cannot take one is fitted without it."""
    if any(getattr(lin, "bias", None) is None for lin in finals):
        try:
            module.add_output_bias(torch.zeros(channels))
        except NotImplementedError:
            pass


@torch.no_grad()
def _refit_layer(name: str, model: nn.Module, reference: nn.Module, calls: int, calib: Any,
                 batch_size: int, damping: float, kept: ReferenceOutputs | None = None) -> tuple[int, int]:
    """One pass: moments of layer ``name``'s final factors, then their fit; (#refitted, moment bytes)."""
    module = model.get_submodule(name)
    assert isinstance(module, FactorisedModule)
    original = reference.get_submodule(name)
    finals = [f.module for f in module.final_linears(1, 1)]
    for lin in finals:
        _check_final(name, lin)
    moments = [_Moments() for _ in finals]
    targets: list[torch.Tensor] = []
    counters = [0] * len(finals)

    def ref_hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        targets.append(out.detach().clone())  # a later in-place op (ReLU) must not change it
        if len(targets) == calls:
            raise _Stop

    def final_hook(i: int):
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            if counters[i] >= len(targets):
                raise CalibrationError(f"Layer {name!r} ran more often in the model than in the reference")
            y = targets[counters[i]]
            counters[i] += 1
            moments[i].add(inp[0], _target(module, i, y))
        return hook

    ran = [0]

    def outer_hook(_m: nn.Module, _inp: Any, _out: Any) -> None:
        ran[0] += 1
        if ran[0] == calls:
            raise _Stop

    for x in _inputs(calib, batch_size):
        targets.clear()
        counters[:], ran[0] = [0] * len(finals), 0
        cached = kept.outputs(name, x) if kept is not None else None
        if cached is not None:
            targets.extend(cached[:calls])
        else:
            handles = [original.register_forward_hook(ref_hook)]
            try:
                _run(reference, x)
            except _Stop:
                pass
            finally:
                handles.pop().remove()
        if len(targets) != calls:
            raise CalibrationError(f"Layer {name!r} ran {len(targets)} times in the reference, {calls} expected")
        handles = [lin.register_forward_hook(final_hook(i)) for i, lin in enumerate(finals)]
        handles.append(module.register_forward_hook(outer_hook))
        try:
            _run(model, x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    held = sum(m.bytes() for m in moments)
    width = targets[0].shape[1] if targets[0].dim() == 4 else targets[0].shape[-1]  # the layer's outputs
    _give_biases(module, finals, width)
    return sum(_solve(lin, m, damping) for lin, m in zip(finals, moments)), held


def _shared_batchnorms(model: nn.Module, reference: nn.Module, names: list[str]) -> list[tuple[nn.Module, nn.Module]]:
    """BatchNorms of ``model`` outside the factorised layers, with the reference's at the same name."""
    ref = dict(reference.named_modules())
    inside = tuple(n + "." for n in names)
    out = []
    for n, bn in model.named_modules():
        twin = ref.get(n)
        if (_batchnorms(bn) == [bn] and not n.startswith(inside) and twin is not None and _batchnorms(twin) == [twin]
                and twin.running_mean.shape == bn.running_mean.shape):
            out.append((bn, twin))
    return out


@torch.no_grad()
def sequential_refit(reference: nn.Module, model: nn.Module, names: list[str] | Mapping[str, Any], calib: Any, *,
                     batch_size: int = 64, damping: float = DAMPING,
                     kept: ReferenceOutputs | None = None) -> dict[str, Any]:
    """Refit the final linear factor of each factorised layer in ``names`` (in place), in forward
    order, on the partially compressed model's features with the reference's layer outputs as
    targets (see the module docstring). ``reference`` is the uncompressed model (same module names).

    Layers whose type has no ``final_linears`` are skipped but still run. BatchNorm layers outside
    the factorised modules take the reference's statistics. On error the model is left as it was.
    ``kept``: the reference's layer outputs, shared between refits on the same ``calib``
    (:class:`ReferenceOutputs` of ``reference``). Returns ``{"layers", "factors", "skipped", "passes",
    "moment_bytes"}`` (``moment_bytes``: the most moment memory held at once).
    """
    mods = dict(model.named_modules())
    names = [n for n in names]
    for n in names:
        if not isinstance(mods.get(n), FactorisedModule):
            raise ValueError(f"{n!r} is not a factorised module of the model")
    refittable = [n for n in names if mods[n].final_linears(1, 1)]  # type: ignore[union-attr]
    info = {"layers": 0, "factors": 0, "skipped": sorted(set(names) - set(refittable)), "passes": 0,
            "moment_bytes": 0}
    if not refittable:
        return info
    backup = {n: copy.deepcopy(mods[n]) for n in refittable}
    bns = _shared_batchnorms(model, reference, names)
    states = _bn_state([bn for bn, _ in bns])
    try:
        with _modes(model, reference):
            model.eval()
            reference.eval()
            for bn, twin in bns:  # the partially compressed model is the reference elsewhere
                _load_bn_state([bn], _bn_state([twin]))
            first = next(iter(_inputs(calib, batch_size)))
            order, calls = _order(model, refittable, first)
            for n in order:
                done, held = _refit_layer(n, model, reference, calls[n], calib, batch_size, damping, kept)
                info["layers"] += int(done > 0)
                info["factors"] += done
                info["passes"] += 1
                info["moment_bytes"] = max(info["moment_bytes"], held)
            info["skipped"] += sorted(set(refittable) - set(order))  # never reached by the data
    except BaseException:
        for n, m in backup.items():
            _set(model, n, m)
        _load_bn_state([bn for bn, _ in bns], states)
        raise
    return info
