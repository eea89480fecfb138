"""Example third-party plugin for hsc-plugin: the ``foreground`` spatial partitioner."""

from hsc_foreground_partitioner.partitioner import ForegroundPartitioner

__all__ = ["ForegroundPartitioner"]
__version__ = "0.1.0"
