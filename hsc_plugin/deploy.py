"""Deployment transforms: fold BatchNorm into the factor that feeds it.

A BN after a conv is an affine map per output channel; folding it into the conv that produces
those channels removes one memory pass per layer at inference, with identical outputs (eval only).
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from hsc_plugin.compressors.base import set_submodule
from hsc_plugin.modules import FactorisedModule
from hsc_plugin.modules.base import fold_affine

__all__ = ["fold_bn"]


class _Tracer(fx.Tracer):
    """Every factorised module is one node: the BN that follows it is asked of the module's type."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, FactorisedModule) or super().is_leaf_module(m, qualname)


def _affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    b = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_var)
    scale = s / torch.sqrt(bn.running_var + bn.eps)
    return scale, b - bn.running_mean * scale


def _fold_into(producer: nn.Module, bn: nn.BatchNorm2d) -> bool:
    scale, shift = _affine(bn)
    if isinstance(producer, FactorisedModule):
        return producer.fold_bn(scale, shift)  # each type knows its last factor(s)
    if isinstance(producer, nn.Conv2d) and producer.out_channels == bn.num_features:
        fold_affine(producer, scale, shift)
        return True
    return False


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    mods = dict(model.named_modules())
    out = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        out.append((src.target, node.target))
    return out


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and not isinstance(m, FactorisedModule):
            kids = list(m.named_children())
            for (a, _), (b, bm) in zip(kids, kids[1:]):
                if isinstance(bm, nn.BatchNorm2d):
                    p = f"{name}." if name else ""
                    out.append((p + a, p + b))
    return out


def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a conv (dense or factorised) into its last factor.

    Folded BNs become ``nn.Identity``; their names are listed in ``model.folded_bn``. Eval mode
    only: in train mode BN uses batch statistics, which no fixed weights can reproduce.
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        raise RuntimeError("fold_bn needs eval mode (call model.eval()): BN in train mode uses batch statistics")
    target = model if inplace else copy.deepcopy(model)
    try:
        pairs = _pairs_fx(target)
    except Exception:  # untraceable control flow: fall back to Sequential order
        pairs = _pairs_sequential(target)
    folded = []
    with torch.no_grad():
        for prod, bn_name in pairs:
            bn = target.get_submodule(bn_name)
            if isinstance(bn, nn.BatchNorm2d) and _fold_into(target.get_submodule(prod), bn):
                set_submodule(target, bn_name, nn.Identity())
                folded.append(bn_name)
    target.folded_bn = folded
    return target
