"""torch-pruning glue (extra ``[tp]``): low-rank compression as a tp pruner, and tp on our models.

* :class:`LowRankPruner` — ``LowRankPruner(model, example_inputs, method=..., macs_ratio=3.0,
  iterative_steps=n)`` then ``pruner.step()``, the way a tp script drives ``tp.pruner.MetaPruner``.
  Like tp's pruners (and unlike :func:`hsc_plugin.compress`) it **modifies the model it was
  given**; a step that fails leaves the model as it was.
* :func:`tp_kwargs` — the keyword arguments that make tp prune a compressed model correctly:
  the rank layers in ``ignored_layers`` (tp would shrink ranks like any channel), and for every
  type that asks to be one layer (``tp_one_op``: the HSC and regional-expansion modules) a
  pruning function (:class:`SpatioChannelPruner`, channel surgery by :func:`prune_channels`) and
  a ``forward_fn`` that lets tp trace it as one layer.
* :func:`compare_macs` — our MAC count next to ``tp.utils.count_ops_and_params`` (units differ).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:
    import torch_pruning as tp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("hsc_plugin.adapters.torch_pruning needs torch-pruning: pip install 'hsc-plugin[tp]'") from exc

from hsc_plugin.api import compress
from hsc_plugin.budget import Budget
from hsc_plugin.compressors.base import set_submodule
from hsc_plugin.cost.macs import measure_costs
from hsc_plugin.modules import TYPES, FactorisedModule, RegionalExpansionConv2d, RegionBlock, SpatioChannelConv2d
from hsc_plugin.report import Report

__all__ = ["LowRankPruner", "SpatioChannelPruner", "tp_kwargs", "rank_layers", "hsc_forward_fn",
           "compare_macs", "MacCount", "prune_channels"]


# -- making a compressed model prunable by tp --------------------------------------------------------
# Types that tp must treat as one layer (``tp_one_op``) get their channel surgery here, one function
# per type name in ``_SURGERY``; the others are plain Conv2d/Linear chains that tp prunes itself.

def prune_channels(layer: nn.Module, in_keep: list[int] | None = None, out_keep: list[int] | None = None) -> None:
    """Keep only input channels ``in_keep`` and output channels ``out_keep`` of ``layer``, in place.

    For structured pruners (torch-pruning), which change the module they were given; for every
    type tp treats as one layer (an HSC module, a regional-expansion module). Ranks are unchanged
    (an HSC cluster left empty is removed with its rank). The new parts are built before any is
    swapped in, so an error leaves the module as it was.
    """
    surgery = _SURGERY.get(type(layer).__name__)
    if surgery is None:
        raise NotImplementedError(f"no channel surgery for {type(layer).__name__}; known: {sorted(_SURGERY)}")
    ins = list(range(layer.in_channels)) if in_keep is None else sorted({int(i) for i in in_keep})
    outs = list(range(layer.out_channels)) if out_keep is None else sorted({int(i) for i in out_keep})
    for keep, n, what in ((ins, layer.in_channels, "input"), (outs, layer.out_channels, "output")):
        if not keep or keep[0] < 0 or keep[-1] >= n:
            raise ValueError(f"{what} channels to keep must be a non-empty subset of range({n})")
    surgery(layer, ins, outs)
    layer.in_channels, layer.out_channels = len(ins), len(outs)


def _prune_hsc(layer: SpatioChannelConv2d, ins: list[int], outs: list[int]) -> None:
    """Every region's clusters are re-indexed; a cluster left empty goes with its rank."""
    layer.blocks = nn.ModuleList(_pruned_block(b, ins, outs) for b in layer.blocks)


@torch.no_grad()
def _pruned_block(b: RegionBlock, ins: list[int], outs: list[int]) -> RegionBlock:
    """A copy of ``b`` restricted to input channels ``ins`` and output channels ``outs``.

    Per kept cluster (:meth:`RegionBlock.factors`): the factor that reads the input (``first``
    for tucker2, else the k×k ``core``) loses the pruned inputs; ``expand`` loses the pruned outputs.
    """
    ref, bias, old = b.const_bias, b.channel_bias(), b.factors()
    pos = {ch: p for p, ch in enumerate(ins if b.side == "input" else outs)}
    clusters, ranks, ranks_in, members = [], [], [], {}
    for i, cl in enumerate(b.clusters):
        at = [k for k, ch in enumerate(cl) if ch in pos]
        if at:
            members[i] = at
            clusters.append([pos[cl[k]] for k in at])
            ranks.append(b.ranks[i])
            ranks_in.append(b.ranks_in[i] if b.block == "tucker2" else 0)
    geometry = {"kernel_size": b.kernel_size, "stride": b.stride, "padding": b.padding,
                "dilation": b.dilation, "padding_mode": b.padding_mode}
    new = RegionBlock(len(ins), len(outs), geometry, b.side, clusters, ranks, b.has_bias, device=ref.device,
                      dtype=ref.dtype, block=b.block, ranks_in=ranks_in if b.block == "tucker2" else None)
    o = torch.tensor(outs, device=ref.device)
    live = [n for n, i in enumerate(b.kept) if i in members]  # new.kept follows the same order
    for n, f in zip(live, new.factors()):
        at = torch.tensor(members[b.kept[n]] if b.side == "input" else ins, device=ref.device)
        entry = "first" if b.block == "tucker2" else "core"
        f[entry].copy_(old[n][entry].index_select(1, at))
        if b.block == "tucker2":
            f["core"].copy_(old[n]["core"])
        rows = o if b.side == "input" else torch.tensor(members[b.kept[n]], device=ref.device)
        f["expand"].copy_(old[n]["expand"].index_select(0, rows))
    if b.side == "input" and len(new.expands) and new.expands[0].bias is not None:
        new.expands[0].bias.copy_(bias.index_select(0, o))
    for e, i in zip(new.expands if b.side == "output" else [], new.kept):
        if e.bias is not None:
            e.bias.copy_(bias[[outs[ch] for ch in new.clusters[i]]])
    if new.n_dropped:
        new.dropped_bias.copy_(bias[[outs[ch] for ch in new.dropped]])
    if new.total_rank == 0:
        new.const_bias.copy_(bias.index_select(0, o))
    _like(new, b)
    return new


def _like(new: nn.Module, old: nn.Module) -> None:
    """``new`` trains (or not) and is in the mode that ``old`` was."""
    trainable = any(p.requires_grad for p in old.parameters())
    for p in new.parameters():
        p.requires_grad_(trainable)
    new.train(old.training)


@torch.no_grad()
def _prune_regional(layer: RegionalExpansionConv2d, ins: list[int], outs: list[int]) -> None:
    """The factor that reads the input (``first``, or ``reduce`` for svd) loses the pruned inputs;
    every region's 1×1 loses the pruned outputs; the reduction's rank is unchanged."""
    if layer.base == "clusters":
        _prune_regional_clusters(layer, ins, outs)
        return
    ref = layer.reduce.weight
    new = RegionalExpansionConv2d.from_spec({**layer.spec(), "in_channels": len(ins), "out_channels": len(outs)},
                                            device=ref.device, dtype=ref.dtype)
    i, o = torch.tensor(ins, device=ref.device), torch.tensor(outs, device=ref.device)
    if layer.base == "tucker2":
        new.first.weight.copy_(layer.first.weight.index_select(1, i))
        new.reduce.weight.copy_(layer.reduce.weight)
    else:
        new.reduce.weight.copy_(layer.reduce.weight.index_select(1, i))
    for e_new, e in zip(new.expands, layer.expands):
        e_new.weight.copy_(e.weight.index_select(0, o))
        if e.bias is not None:
            e_new.bias.copy_(e.bias.index_select(0, o))
    _like(new, layer)
    layer.first, layer.reduce, layer.expands = new.first, new.reduce, new.expands


@torch.no_grad()
def _prune_regional_clusters(layer: RegionalExpansionConv2d, ins: list[int], outs: list[int]) -> None:
    """Input clusters are re-indexed; a cluster left empty goes with its rank and its columns of
    every region's 1×1."""
    red, cores = layer.first, layer.first.cores()
    ref = cores[0]
    pos = {ch: p for p, ch in enumerate(ins)}
    clusters, ranks, kept_cores, cols, start = [], [], [], [], 0
    for cl, r, w in zip(red.clusters, red.ranks, cores):
        at = [k for k, ch in enumerate(cl) if ch in pos]
        if at:
            clusters.append([pos[cl[k]] for k in at])
            ranks.append(r)
            kept_cores.append(w.index_select(1, torch.tensor(at, device=ref.device)))
            cols += list(range(start, start + r))
        start += r
    new = RegionalExpansionConv2d.from_spec({**layer.spec(), "in_channels": len(ins), "out_channels": len(outs),
                                             "clusters": clusters, "ranks": ranks, "rank": sum(ranks)},
                                            device=ref.device, dtype=ref.dtype)
    for dst, w in zip(new.first.cores(), kept_cores):
        dst.copy_(w)
    o, c = torch.tensor(outs, device=ref.device), torch.tensor(cols, device=ref.device)
    for e_new, e in zip(new.expands, layer.expands):
        e_new.weight.copy_(e.weight.index_select(0, o).index_select(1, c))
        if e.bias is not None:
            e_new.bias.copy_(e.bias.index_select(0, o))
    _like(new, layer)
    layer.first, layer.expands = new.first, new.expands


_SURGERY: dict[str, Callable[[Any, list[int], list[int]], None]] = {
    "SpatioChannelConv2d": _prune_hsc,
    "RegionalExpansionConv2d": _prune_regional,
}


class SpatioChannelPruner(tp.pruner.function.BasePruningFunc):
    """tp pruning function for every factorised type that tp treats as one layer (``tp_one_op``:
    :class:`~hsc_plugin.modules.SpatioChannelConv2d`, :class:`~hsc_plugin.modules.RegionalExpansionConv2d`).

    Removes input or output channels by :func:`prune_channels` (HSC clusters are index lists, so
    they are re-indexed); ranks are not touched. Input and output pruning are separate functions,
    so tp sees no dependency between the module's inputs and outputs (like a conv).
    """

    TARGET_MODULES = tuple(TYPES[name] for name in _SURGERY)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        prune_channels(layer, out_keep=[i for i in range(layer.out_channels) if i not in drop])
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        prune_channels(layer, in_keep=[i for i in range(layer.in_channels) if i not in drop])
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def _one_op_types() -> list[type]:
    return [t for t in TYPES.values() if t.tp_one_op]


class _OneOp(torch.autograd.Function):
    """Identity on ``y`` whose autograd node links straight to ``x``: tp's tracer (which walks
    ``grad_fn``) then sees a one-op module as one layer instead of its internal slices and concats,
    which it would otherwise read as channel index maps between the module's input and output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def hsc_forward_fn(forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> Callable[[nn.Module, Any], Any]:
    """A tp ``forward_fn`` under which every ``tp_one_op`` module (HSC, regional) traces as one layer.

    Wraps ``forward_fn`` (default: ``model(example_inputs)``, tp's own default). Only tp's graph
    tracing calls it; the model's real forward is unchanged.
    """

    def run(model: nn.Module, example_inputs: Any) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            # y must require grad: on the model's input (a stem) x does not, and an output without
            # grad_fn is invisible to tp, which then never prunes the stem's output channels
            return _OneOp.apply(args[0], out.detach().requires_grad_())

        # prepend: tp's own recording hook, registered before this runs, must see our output
        handles = [m.register_forward_hook(hook, prepend=True) for m in model.modules()
                   if getattr(type(m), "tp_one_op", False)]
        try:
            if forward_fn is not None:
                return forward_fn(model, example_inputs)
            if isinstance(example_inputs, dict):
                return model(**example_inputs)
            if isinstance(example_inputs, (tuple, list)):
                return model(*example_inputs)
            return model(example_inputs)
        finally:
            for h in handles:
                h.remove()

    return run


def rank_layers(model: nn.Module) -> list[nn.Module]:
    """The convs/linears whose output channels are ranks of a factorised layer.

    The first factor of ``LowRankConv2d``/``LowRankLinear`` and the first two of ``Tucker2Conv2d``
    (both of its ranks), as each type says (``rank_layers()``). Modules that tp prunes as one layer
    (HSC, regional expansion) keep their ranks anyway: tp never sees their inner convs.
    """
    return [layer for m in model.modules() if isinstance(m, FactorisedModule) for layer in m.rank_layers()]


def tp_kwargs(model: nn.Module, *, prune_ranks: bool = False,
              forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for any tp pruner (``tp.pruner.MetaPruner(model, x, **tp_kwargs(model))``).

    ``ignored_layers``: the rank layers (:func:`rank_layers`), unless ``prune_ranks=True``; add
    your own (e.g. the classifier) to the list. ``customized_pruners`` and ``root_module_types``
    make every ``tp_one_op`` type a prunable layer; ``forward_fn`` (wrapping yours, if any) makes
    tp trace it as one layer. Without these tp shrinks ranks as channels and mis-groups them.
    """
    return {
        "ignored_layers": [] if prune_ranks else rank_layers(model),
        "customized_pruners": {t: SpatioChannelPruner() for t in _one_op_types()},
        "root_module_types": [nn.Conv2d, nn.Linear, nn.LSTM, *_one_op_types()],
        "forward_fn": hsc_forward_fn(forward_fn),
    }


# -- MAC counts ---------------------------------------------------------------------------------------

@dataclass
class MacCount:
    """One model counted both ways, all per sample.

    ``ours``: :func:`hsc_plugin.measure_costs` — conv/linear multiply-accumulates only
    (``FlopCounterMode`` reports 2 × MACs for the whole batch; we halve and divide by the batch).
    ``tp_total``: ``tp.utils.count_ops_and_params`` — MACs plus bias adds, BN, activations and
    pooling. ``tp_conv_linear``: tp's per-layer counts of ``nn.Conv2d``/``nn.Linear`` minus their
    bias adds (tp adds one per conv output element, but only ``out_features`` per *batch* for a
    Linear), which is what ``ours`` counts: the two agree exactly when every matrix product runs
    in an ``nn.Conv2d``/``nn.Linear`` (functional convs/matmuls are counted by ours only).
    """

    ours: int
    tp_total: int
    tp_conv_linear: int
    params: int
    tp_params: int

    @property
    def agree(self) -> bool:
        return self.ours == self.tp_conv_linear


def compare_macs(model: nn.Module, example_input: torch.Tensor) -> MacCount:
    """Count ``model`` on ``example_input`` with our counter and with tp's (see :class:`MacCount`)."""
    batch = int(example_input.shape[0])
    ours = measure_costs(model, example_input)
    bias_adds: dict[nn.Module, int] = {}

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        if m.bias is not None:  # tp adds bias adds (FlopCounterMode does not): per output element
            n = out.numel() if isinstance(m, nn.Conv2d) else out.shape[-1]  # for Linear, once per batch
            bias_adds[m] = bias_adds.get(m, 0) + n

    layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]  # tp's exact-type rule
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    total, params, layer_macs, _ = tp.utils.count_ops_and_params(model, example_input, layer_wise=True)
    conv_linear = sum(int(layer_macs.get(m) or 0) - bias_adds.get(m, 0) for m in layers)
    return MacCount(ours=int(ours.macs), tp_total=int(round(total)), tp_conv_linear=conv_linear // batch,
                    params=int(ours.params), tp_params=int(params))


# -- the low-rank pruner ------------------------------------------------------------------------------

def _ratio_schedule(ratio: float, steps: int) -> list[float]:
    """tp's linear scheduler on the fraction of cost removed, as cost ratios (last = ``ratio``)."""
    removed = 1.0 - 1.0 / ratio
    return [1.0 / (1.0 - removed * i / steps) for i in range(steps + 1)]


class LowRankPruner:
    """Low-rank compression with torch-pruning's pruner interface.

    ``LowRankPruner(model, example_inputs, method="global_svd", macs_ratio=3.0, iterative_steps=3)``
    then ``pruner.step()`` (fine-tune between steps, as with tp). Step ``i`` of ``n`` brings the
    model to the ``i``-th cost of tp's linear schedule (the fraction of MACs removed grows
    linearly), so the last step meets the budget; ratios are relative to the model as given.

    Unlike :func:`hsc_plugin.compress`, **the pruner modifies ``model``** (``pruner.model``),
    replacing layers in place, as tp users expect; a step that fails (e.g. an unreachable budget)
    raises and leaves the model as it was. Each step re-factorises from dense weights: a
    Global-SVD/Tucker-2 layer is first multiplied back out (keeping what fine-tuning taught it);
    a layer with no dense equivalent (HSC, regional expansion) restarts from the layer it replaced.

    ``budget`` (a :class:`~hsc_plugin.Budget`, ``"3x"``, or ``"params=4x"``) is the general form
    of ``macs_ratio``. ``calib``: calibration data (required by ``hsc`` and ``data_aware=True``);
    ``ignored_layers``: modules not to compress (with everything below them); ``targets``,
    other ``**options``: as in :func:`hsc_plugin.compress`.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        *,
        method: str = "global_svd",
        macs_ratio: float | None = None,
        budget: Budget | str | float | None = None,
        calib: Any = None,
        iterative_steps: int = 1,
        ignored_layers: Iterable[nn.Module] | None = None,
        targets: Any = None,
        **options: Any,
    ) -> None:
        if (macs_ratio is None) == (budget is None):
            raise ValueError("Give exactly one of macs_ratio=... (e.g. 3.0) or budget=... (e.g. Budget(3.0))")
        if isinstance(budget, str):
            budget = Budget.parse(budget)
        elif budget is None or isinstance(budget, (int, float)):
            budget = Budget(float(macs_ratio if budget is None else budget))
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a Budget, a string such as '3x' or a number, got {budget!r}")
        if budget.scope != "model":
            raise ValueError("LowRankPruner budgets are on the whole model (scope='model')")
        if int(iterative_steps) < 1:
            raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
        if isinstance(example_inputs, (tuple, list)):
            if len(example_inputs) != 1:
                raise ValueError("LowRankPruner takes models with one input tensor")
            example_inputs = example_inputs[0]
        if not isinstance(example_inputs, torch.Tensor):
            raise TypeError(f"example_inputs must be a tensor, got {type(example_inputs).__name__}")
        self.model, self.example_inputs, self.method, self.budget = model, example_inputs, method, budget
        self.calib = calib
        self.iterative_steps = int(iterative_steps)
        self.targets = targets
        self.options = options
        self.current_step = 0
        self.per_step_ratio = _ratio_schedule(budget.ratio, self.iterative_steps)
        self.report: Report | None = None
        ignored = list(ignored_layers or [])
        self.ignored_layers = ignored
        self._ignored_names = [n for n, m in model.named_modules() if any(m is i for i in ignored)]
        self._base_cost = float(self._cost(model))
        self._originals: dict[str, nn.Module] = {}  # dense layers that modules without to_dense() replaced

    def _cost(self, model: nn.Module) -> float:
        return float(measure_costs(model, self.example_inputs[:1]).of(self.budget.metric))

    def step(self, interactive: bool = False) -> Report | None:
        """Compress ``self.model`` to the next budget of the schedule, in place; returns the report.

        After the last step it warns and does nothing (as tp's pruners do).
        """
        if interactive:
            raise NotImplementedError("LowRankPruner has no interactive mode")
        if self.current_step >= self.iterative_steps:
            warnings.warn("Pruning exceeds the maximum iterative steps; no compression performed.")
            return None
        step = self.current_step + 1
        target = self._base_cost / self.per_step_ratio[step]
        work = copy.deepcopy(self.model)
        dense_now: dict[str, nn.Module] = {}  # layers multiplied back out (or restored) for this step
        keep_out = list(self._ignored_names)
        for name, m in dict(work.named_modules()).items():
            if not name or self._under(name, keep_out) or self._under(name, list(dense_now)):
                continue
            dense = m.to_dense() if isinstance(m, FactorisedModule) else None
            if dense is None and isinstance(m, FactorisedModule):
                orig = self._originals.get(name)
                if orig is None:  # not ours: leave it, and keep its inner convs out of the targets
                    keep_out.append(name)
                    continue
                if (orig.in_channels, orig.out_channels) != (m.in_channels, m.out_channels):
                    raise ValueError(f"Layer {name!r} was channel-pruned since the last step, so it cannot "
                                     "be re-factorised from its dense weights; run every LowRankPruner step "
                                     "before pruning channels")
                dense = copy.deepcopy(orig)
            if dense is not None:
                set_submodule(work, name, dense)
                dense_now[name] = dense
        now = self._cost(work)
        ratio = now / target
        if not ratio > 1.0:
            raise ValueError(f"The model already costs {now:,.0f} {self.budget.metric} <= this step's target "
                             f"{target:,.0f}; nothing to compress")
        step_budget = Budget(ratio, metric=self.budget.metric, tolerance=self.budget.tolerance)
        before = dict(work.named_modules())
        result = compress(work, self.method, calib=self.calib, budget=step_budget, targets=self.targets,
                          exclude=(lambda n, m: self._under(n, keep_out)) if keep_out else None,
                          inplace=True, example_input=self.example_inputs[:1], **self.options)
        # Success: move the changed layers into the user's model (nothing was written before).
        out = result.model
        changed = set(dense_now) | {L.name for L in result.report.layers if L.status == "factorised"}
        originals = dict(self._originals)
        for name in changed:
            new = out.get_submodule(name)
            if isinstance(new, FactorisedModule) and new.to_dense() is None:
                originals.setdefault(name, before[name])
            else:
                originals.pop(name, None)
        for name in changed:
            set_submodule(self.model, name, out.get_submodule(name))
        self._originals = originals
        self.current_step = step
        self.report = result.report
        return result.report

    @staticmethod
    def _under(name: str, prefixes: list[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def achieved_ratio(self) -> float:
        """Cost of the model as given ÷ cost now (in the budget's metric)."""
        return self._base_cost / self._cost(self.model)
