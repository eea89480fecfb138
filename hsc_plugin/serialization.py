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
    from hsc_plugin.modules import FACTORISED_TYPES

    types = dict(FACTORISED_TYPES)
    try:
        from hsc_plugin.spatial import SPATIAL_TYPES  # HSC modules, when present
    except ImportError:
        SPATIAL_TYPES = {}
    types.update(SPATIAL_TYPES)
    return types


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


def load(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild a compressed model saved by :func:`save` on ``base_model`` (modified in place).

    ``base_model`` must be the uncompressed architecture the model was made from.
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
        cls = types.get(spec["type"])
        if cls is None:
            raise ValueError(f"Unknown factorised module type {spec['type']!r} for layer {name!r}")
        set_submodule(base_model, name, cls.from_spec(spec, device=param.device, dtype=param.dtype))
    state = torch.load(src / "weights.pt", weights_only=True, map_location=param.device)
    try:
        base_model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"Weights in {src} do not fit the base model: {exc}") from exc
    return base_model
