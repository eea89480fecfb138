"""Plugin registry (pluggy): the hook specifications are the contract between core and plugins.

A plugin is a module (or object) with ``@hookimpl`` functions, announced in the ``hsc_plugin``
entry-point group of its distribution::

    [project.entry-points.hsc_plugin]
    my_selectors = "my_package.plugin"

The built-in compressors and strategies register exactly the same way (see pyproject.toml). Names
are looked up case-insensitively; an unknown name is an error with a "did you mean".
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

__all__ = [
    "hookimpl",
    "hookspec",
    "get_plugin_manager",
    "available",
    "lookup",
    "create",
    "list_plugins",
    "register",
    "PluginInfo",
]

PROJECT = "hsc_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("compressor", "rank_selector", "partitioner", "clusterer", "block_factoriser")
_BUILTIN_MODULES = (
    "hsc_plugin.compressors",
    "hsc_plugin.strategies.rank",
    "hsc_plugin.strategies.partition",
    "hsc_plugin.strategies.cluster",
    "hsc_plugin.strategies.block",
    "hsc_plugin.mri.cli",  # the experiment's commands (hsc_cli_commands), not a strategy kind
)


class HookSpecs:
    """Each hook returns a list of classes; each class has a unique ``name`` within its kind."""

    @hookspec
    def hsc_compressors(self) -> list[type]:
        """Compressor classes (subclasses of ``hsc_plugin.Compressor``)."""

    @hookspec
    def hsc_rank_selectors(self) -> list[type]:
        """Rank selector classes (subclasses of ``hsc_plugin.RankSelector``)."""

    @hookspec
    def hsc_partitioners(self) -> list[type]:
        """Spatial partitioner classes (subclasses of ``hsc_plugin.SpatialPartitioner``)."""

    @hookspec
    def hsc_clusterers(self) -> list[type]:
        """Channel clusterer classes (subclasses of ``hsc_plugin.ChannelClusterer``)."""

    @hookspec
    def hsc_block_factorisers(self) -> list[type]:
        """Block factoriser classes (subclasses of ``hsc_plugin.BlockFactoriser``): how HSC factorises
        one (region, cluster) block."""

    @hookspec
    def hsc_cli_commands(self, subparsers: Any) -> None:
        """Add ``hsc`` sub-commands (how ``hsc demo``/``reproduce``/``sweep`` come from the experiment).

        ``subparsers`` is the ``hsc`` parser's ``add_subparsers()`` object: call
        ``subparsers.add_parser(name, help=...)``, add arguments, and ``set_defaults(func=f)``;
        ``hsc`` calls ``f(args)`` and exits with its return value (a ``ValueError`` becomes
        ``hsc: error: ...``, exit 2). Every ``hsc`` call runs every implementation, so import
        heavy modules inside ``f``. Command plugins are not a strategy kind: ``hsc plugins``
        does not list them (``hsc --help`` does).
        """


_HOOK_OF = {
    "compressor": "hsc_compressors",
    "rank_selector": "hsc_rank_selectors",
    "partitioner": "hsc_partitioners",
    "clusterer": "hsc_clusterers",
    "block_factoriser": "hsc_block_factorisers",
}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    origin: str  # "<distribution> <version>" or "registered at runtime"


_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(HookSpecs)
        pm.load_setuptools_entrypoints(PROJECT)
        # Running from a source tree that was never pip-installed has no entry points: register
        # the built-ins directly so that the library still works (and say so in the origin).
        for mod_name in _BUILTIN_MODULES:
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError:
                continue
            if not pm.is_registered(mod):
                pm.register(mod, name=f"{mod_name} (source tree)")
        _pm = pm
    return _pm


def register(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object at runtime (tests, notebooks)."""
    get_plugin_manager().register(plugin, name=name)


def _origin(pm: pluggy.PluginManager, plugin: Any) -> str:
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return f"{dist.project_name} {dist.version}"
    return f"{pm.get_name(plugin)}"


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Everything registered, with the distribution each came from."""
    pm = get_plugin_manager()
    out: list[PluginInfo] = []
    for k in KINDS if kind is None else (kind,):
        hook = getattr(pm.hook, _HOOK_OF[k])
        for impl in hook.get_hookimpls():
            origin = _origin(pm, impl.plugin)
            for cls in impl.function() or []:
                out.append(PluginInfo(k, cls.name, cls, origin))
    return out


def available(kind: str) -> dict[str, type]:
    """Name → class for one kind (later registrations do not shadow earlier built-ins)."""
    if kind not in _HOOK_OF:
        raise ValueError(f"Unknown plugin kind {kind!r}; expected one of {KINDS}")
    found: dict[str, type] = {}
    for info in reversed(list_plugins(kind)):  # pluggy calls the last registered first
        found.setdefault(info.name.lower(), info.cls)
    return found


def lookup(kind: str, name: str) -> type:
    """The class registered as ``name``; a clear error with suggestions when there is none."""
    table = available(kind)
    key = name.lower()
    if key in table:
        return table[key]
    close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown {kind.replace('_', ' ')} {name!r}.{hint} Available: {', '.join(sorted(table)) or 'none'}"
    )


def _option_names(cls: Any) -> list[str]:
    """The keyword options a strategy or compressor class declares (its ``__init__`` parameters)."""
    import inspect

    if hasattr(cls, "option_names"):
        return list(cls.option_names())
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def create(kind: str, spec: Any, base: type, *, offered: dict[str, Any] | None = None, **options: Any) -> Any:
    """Instantiate a strategy from a name (with options) or pass an instance through.

    ``options`` must all be taken by the class (an error names the ones it accepts); ``offered``
    options are forwarded only to a class that declares them — how a compressor hands its own
    options (``min_region``, ``n_clusters``, ``seed`` …) to whichever strategy, built-in or
    third-party, asks for them by name.
    """
    if isinstance(spec, base):
        if options:
            raise ValueError(
                f"Options {sorted(options)} were given for a {kind.replace('_', ' ')} passed as an "
                "object; configure the object instead"
            )
        return spec
    if isinstance(spec, type) and issubclass(spec, base):
        cls: Callable[..., Any] = spec
    elif isinstance(spec, str):
        cls = lookup(kind, spec)
    else:
        raise TypeError(f"A {kind.replace('_', ' ')} must be a name or a {base.__name__}, got {spec!r}")
    params = _option_names(cls)
    kwargs = {k: v for k, v in (offered or {}).items() if k in params and k not in options}
    kwargs.update(options)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        bad = sorted(set(options) - set(params))
        if bad:
            raise ValueError(
                f"{kind.replace('_', ' ').capitalize()} {getattr(cls, 'name', cls)!r} does not take "
                f"option(s) {bad}; it accepts {params or 'no options'}"
            ) from exc
        raise
