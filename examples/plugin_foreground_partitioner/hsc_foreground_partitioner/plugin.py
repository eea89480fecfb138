"""The module named in the ``hsc_plugin`` entry-point group: one hook implementation."""

from __future__ import annotations

import hsc_plugin

from hsc_foreground_partitioner.partitioner import ForegroundPartitioner


@hsc_plugin.hookimpl
def hsc_partitioners() -> list[type]:
    return [ForegroundPartitioner]
