"""Which layers to compress: names, glob patterns, module types or a predicate."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, Union

from torch import nn

__all__ = ["TargetSpec", "resolve_targets", "SUPPORTED_TYPES"]

TargetSpec = Union[None, str, type, Callable[[str, nn.Module], bool], Iterable[Any]]
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def _matches(item: Any, name: str, module: nn.Module) -> bool:
    if isinstance(item, str):
        return name == item or fnmatch.fnmatchcase(name, item)
    if isinstance(item, type):
        return isinstance(module, item)
    if callable(item):
        return bool(item(name, module))
    raise TypeError(f"A target must be a name, a glob pattern, a module type or a callable; got {item!r}")


def resolve_targets(
    model: nn.Module,
    targets: TargetSpec = None,
    exclude: TargetSpec = None,
    supported: tuple[type[nn.Module], ...] = SUPPORTED_TYPES,
) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to compress, and the explicitly targeted layers that cannot be.

    Default: every ``nn.Conv2d`` and ``nn.Linear`` (exact types: subclasses such as timm's
    ``Conv2dSame`` or ``StdConv2d`` change the forward and are skipped with a reason). A name or
    pattern that matches nothing, or a targeted layer of an unsupported type, is an error.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    explicit = targets is not None
    items: list[Any]
    if targets is None:
        items = list(supported)
    elif isinstance(targets, (str, type)) or callable(targets) and not isinstance(targets, Iterable):
        items = [targets]
    else:
        items = list(targets)
    if not items:
        raise ValueError("targets is empty: nothing to compress")
    for item in items:  # a type no supported layer can be (e.g. nn.BatchNorm2d, nn.Conv1d)
        if isinstance(item, type) and not (issubclass(item, supported) or any(issubclass(s, item) for s in supported)):
            raise ValueError(
                f"targets names the layer type {item.__name__}, which cannot be factorised "
                f"(supported: {', '.join(t.__name__ for t in supported)})"
            )
    ex_items: list[Any] = [] if exclude is None else (
        [exclude] if isinstance(exclude, (str, type)) or callable(exclude) else list(exclude))

    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for item in items:
        hit = False
        for name, module in named:
            if not _matches(item, name, module):
                continue
            hit = True
            if name in chosen or name in skipped:
                continue
            if any(_matches(e, name, module) for e in ex_items):
                continue
            if type(module) not in supported:
                if isinstance(item, str) and not any(ch in item for ch in "*?["):
                    raise ValueError(
                        f"Layer {name!r} is a {type(module).__name__}, which cannot be factorised "
                        f"(supported: {', '.join(t.__name__ for t in supported)})"
                    )
                if isinstance(module, supported):
                    skipped[name] = (
                        # Qualified: timm's Linear would otherwise read "Linear is a subclass of Linear".
                        f"{type(module).__module__}.{type(module).__qualname__} is a subclass of "
                        f"{type(module).__mro__[1].__name__} with its own forward; not factorised"
                    )
                continue
            chosen.append(name)
        if explicit and not hit and isinstance(item, str):
            close = difflib.get_close_matches(item, [n for n, _ in named], n=3, cutoff=0.6) or [
                n for n, _ in named if item.split(".")[-1] in n][:3]
            hint = f" Similar names: {close}" if close else ""
            raise ValueError(f"Target {item!r} matches no layer of the model.{hint}")
    order = {n: i for i, (n, _) in enumerate(named)}
    chosen.sort(key=order.__getitem__)
    return chosen, skipped
