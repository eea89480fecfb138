"""Save and load compressed models without pickled code.

A compressed model is its base architecture plus replaced layers. We store the replacements'
structure as JSON (each factorised module's ``spec()``) and all weights as a ``state_dict``
(``torch.save``, read back with ``weights_only=True``). Loading rebuilds the replacements on a
fresh base model (e.g. ``timm.create_model(name)``) and loads the weights strictly, so any
mismatch is an error instead of a silently different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsc_plugin.compressors.base import set_submodule
from hsc_plugin.report import CompressionResult

__all__ = ["save", "load", "FORMAT"]

FORMAT = "hsc-plugin/1"


def _registry() -> dict[str, Any]:
    from hsc_plugin.modules import TYPES

    return TYPES


def _replacements(model: nn.Module) -> dict[str, dict[str, Any]]:
    types = tuple(_registry().values())
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(p + ".") for p in found):
            found[name] = module.spec()
    return found


def save(result_or_model: CompressionResult | nn.Module, path: str | Path) -> Path:
    """Write ``path`` (a directory): ``structure.json`` and ``weights.pt``."""
    model = result_or_model.model if isinstance(result_or_model, CompressionResult) else result_or_model
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    structure: dict[str, Any] = {"format": FORMAT, "replacements": _replacements(model)}
    if isinstance(result_or_model, CompressionResult):
        structure["report"] = result_or_model.report.to_dict()
    (out / "structure.json").write_text(json.dumps(structure, indent=2))
    torch.save(model.state_dict(), out / "weights.pt")
    return out


def _check_base_layer(name: str, old: nn.Module, spec: dict[str, Any]) -> None:
    """The base model's layer at ``name`` must be the layer that was factorised (type and shape)."""
    from hsc_plugin.modules import conv_geometry

    is_linear = "in_features" in spec
    want_type = nn.Linear if is_linear else nn.Conv2d
    keys = ("in_features", "out_features") if is_linear else ("in_channels", "out_channels")
    want = {k: spec[k] for k in keys}
    have = {k: getattr(old, k, None) for k in keys}
    if not is_linear and isinstance(old, nn.Conv2d):
        geometry = json.loads(json.dumps(conv_geometry(old)))  # tuples → lists, as stored
        want.update(spec.get("geometry", {}))
        have.update(geometry)
        if "groups" in spec:
            want["groups"], have["groups"] = spec["groups"], old.groups
    if not isinstance(old, want_type) or have != want:
        raise ValueError(
            f"Layer {name!r} of the base model is {type(old).__name__} {have}, but the saved model "
            f"factorised a {want_type.__name__} {want}; is base_model the architecture the compressed "
            "model was made from?"
        )


def load(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save` on ``base_model`` (modified in place).

    ``base_model`` must be the uncompressed architecture the model was made from. A mismatch is a
    ``ValueError`` that names the layer, and leaves ``base_model`` as it was.
    """
    src = Path(path)
    structure = json.loads((src / "structure.json").read_text())
    if structure.get("format") != FORMAT:
        raise ValueError(f"{src} is not a {FORMAT} checkpoint (format={structure.get('format')!r})")
    types = _registry()
    modules = dict(base_model.named_modules())
    param = next(base_model.parameters())
    for name, spec in structure["replacements"].items():
        if name not in modules:
            raise ValueError(f"The base model has no layer {name!r}; is it the architecture the "
                             "compressed model was made from?")
        if spec["type"] not in types:
            raise ValueError(f"Unknown factorised module type {spec['type']!r} for layer {name!r}")
        _check_base_layer(name, modules[name], spec)
    state = torch.load(src / "weights.pt", weights_only=True, map_location=param.device)
    originals: dict[str, nn.Module] = {}
    try:
        for name, spec in structure["replacements"].items():
            new = types[spec["type"]].from_spec(spec, device=param.device, dtype=param.dtype)
            originals[name] = modules[name]
            set_submodule(base_model, name, new)
        # Check keys and shapes first: a failing strict load_state_dict has already copied the
        # tensors that fit, which would leave base_model half-loaded.
        expected = base_model.state_dict()
        problems = [f"missing {k}" for k in expected.keys() - state.keys()]
        problems += [f"unexpected {k}" for k in state.keys() - expected.keys()]
        problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
                     for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        if problems:
            raise ValueError(f"Weights in {src} do not fit the base model: " + "; ".join(sorted(problems)[:8])
                             + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
        base_model.load_state_dict(state, strict=True)
    except Exception:
        for name, old in originals.items():
            set_submodule(base_model, name, old)
        raise
    return base_model
