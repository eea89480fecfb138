"""The ``hsc`` command: ``hsc compress`` and ``hsc plugins``; plugins add their own sub-commands
through the ``hsc_cli_commands`` hook (the MRI experiment adds ``demo``, ``reproduce``, ``sweep``)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["main", "build_model", "load_image_folder"]

_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def build_model(spec: str) -> nn.Module:
    """``package.module:factory`` (called with no arguments) or a timm model name (pretrained=False)."""
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"hsc: cannot import {spec!r}: {exc}") from exc
        return factory()
    try:
        import timm
    except ImportError as exc:
        raise SystemExit("hsc: model names are timm models; install the extra: pip install 'hsc-plugin[timm]'") from exc
    if not timm.is_model(spec):
        import difflib

        close = difflib.get_close_matches(spec, timm.list_models(), n=3)
        raise SystemExit(f"hsc: unknown timm model {spec!r}" + (f"; did you mean {close}?" if close else ""))
    return timm.create_model(spec, pretrained=False)


def _input_spec(model: nn.Module, input_size: str | None) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if input_size:
        shape = tuple(int(v) for v in input_size.split(","))
    elif "input_size" in cfg:
        shape = tuple(cfg["input_size"])
    else:
        raise SystemExit("hsc: cannot infer the input size; pass --input-size C,H,W")
    mean = tuple(cfg.get("mean", (0.5,) * shape[0]))
    std = tuple(cfg.get("std", (0.5,) * shape[0]))
    return shape, mean, std


def load_image_folder(folder: str | Path, shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                      limit: int = 256) -> torch.Tensor:
    """Images under ``folder`` (recursively, sorted) as a normalised (N, C, H, W) float tensor."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in _IMAGE_EXT)[:limit]
    if not files:
        raise SystemExit(f"hsc: no images found under {folder}")
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    arrays = [np.asarray(Image.open(f).convert(mode).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
              for f in files]
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if c == 1 else x.permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"hsc: options are key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _cmd_compress(args: argparse.Namespace) -> int:
    from hsc_plugin import Budget, compress
    from hsc_plugin.serialization import save

    torch.manual_seed(args.seed)
    model = build_model(args.model).eval()
    shape, mean, std = _input_spec(model, args.input_size)
    if args.calib == "random":
        print(f"WARNING: calibrating on {args.num_calib} RANDOM inputs of shape {shape}: "
              "data-aware results will not reflect real data", file=sys.stderr)
        calib = torch.randn(args.num_calib, *shape)
    elif args.calib:
        calib = load_image_folder(args.calib, shape, mean, std, limit=args.num_calib)
    else:
        calib = None
    budget = None
    given = [(m, v) for m, v in (("macs", args.macs), ("params", args.params), ("latency", args.latency)) if v]
    if len(given) > 1:
        raise SystemExit("hsc: give one of --macs, --params, --latency")
    if given:
        metric, text = given[0]
        budget = Budget.parse(text, metric=metric, scope=args.scope)  # type: ignore[arg-type]
    options = dict(_parse_option(o) for o in args.option)
    for flag, on in (("--channels-last", args.channels_last), ("--tune-pointwise", args.tune_pointwise)):
        if on and (budget is None or budget.metric != "latency"):
            raise SystemExit(f"hsc: {flag} applies to a --latency budget (it sets how the model is timed)")
    if args.channels_last and args.tune_pointwise:
        raise SystemExit("hsc: --tune-pointwise is for NCHW; channels_last runs 1x1 convs as matrix products already")
    if args.channels_last or args.tune_pointwise:
        from hsc_plugin import LatencyCostModel

        options["cost_model"] = LatencyCostModel(int(options.get("latency_batch", 1)), channels_last=args.channels_last,
                                                 tune_pointwise=args.tune_pointwise)
    result = compress(model, args.method, calib=calib, budget=budget,
                      example_input=torch.randn(1, *shape), **options)
    print(result.report.table())
    if args.report:
        result.report.save(args.report)
        print(f"report written to {args.report}")
    if args.out:
        save(result, args.out)
        print(f"compressed model written to {args.out} (load with hsc_plugin.load(path, base_model))")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from hsc_plugin.registry import list_plugins

    rows = list_plugins()
    if args.json:
        print(json.dumps([{"kind": r.kind, "name": r.name, "class": f"{r.cls.__module__}.{r.cls.__qualname__}",
                           "origin": r.origin} for r in rows], indent=2))
        return 0
    print(f"{'kind':<15} {'name':<16} {'origin':<34} class")
    for r in rows:
        print(f"{r.kind:<15} {r.name:<16} {r.origin:<34} {r.cls.__module__}.{r.cls.__qualname__}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hsc", description="Low-rank compression of CNNs (HSC, Global SVD, Tucker-2)")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a timm model or package.module:factory")
    c.add_argument("model", help="timm model name (pretrained=False) or package.module:factory")
    c.add_argument("--method", default="hsc", help="compressor name (see `hsc plugins`)")
    c.add_argument("--macs", help="MAC budget, e.g. 3x")
    c.add_argument("--params", help="parameter budget, e.g. 4x")
    c.add_argument("--latency", help="latency budget measured on this machine: 2x (faster) or 4.5ms; "
                                     "-o latency_batch=N sets the batch it is measured at")
    c.add_argument("--channels-last", action="store_true",
                   help="time the --latency budget in channels_last (NHWC), the layout a CPU deployment should use")
    c.add_argument("--tune-pointwise", action="store_true",
                   help="time the --latency budget (NCHW) with each 1x1 factor as a conv or a matmul, whichever is "
                        "faster here; saved models keep weights, not this choice (hsc_plugin.tune_pointwise)")
    c.add_argument("--scope", default="model", choices=["model", "targets"])
    c.add_argument("--calib", help="folder of calibration images, or 'random' (clearly labelled)")
    c.add_argument("--num-calib", type=int, default=64, help="calibration images to use")
    c.add_argument("--input-size", help="C,H,W (default: the timm model's)")
    c.add_argument("-o", "--option", action="append", default=[], help="compressor option key=value (repeatable)")
    c.add_argument("--out", help="directory to save the compressed model to")
    c.add_argument("--report", help="path of the JSON report")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_compress)

    pl = sub.add_parser("plugins", help="list compressors and strategies with their origin")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_cmd_plugins)

    from hsc_plugin.registry import get_plugin_manager

    get_plugin_manager().hook.hsc_cli_commands(subparsers=sub)  # plugins' commands (hsc demo, ...)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"hsc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
