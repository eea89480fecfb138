"""Built-in compressors, registered through the ``hsc_plugin`` entry-point group."""

from hsc_plugin.compressors.base import Compressor
from hsc_plugin.compressors.global_svd import GlobalSVD
from hsc_plugin.compressors.tucker2 import Tucker2
from hsc_plugin.registry import hookimpl

__all__ = ["Compressor", "GlobalSVD", "Tucker2"]


@hookimpl
def hsc_compressors() -> list[type]:
    out: list[type] = [GlobalSVD, Tucker2]
    try:
        from hsc_plugin.compressors.hsc import HSC
    except ImportError:  # pragma: no cover - HSC ships with the package; keep the core importable
        return out
    return out + [HSC]
