"""Compatibility alias: the HSC layer lives in :mod:`hsc_plugin.modules.spatio_channel`."""

from hsc_plugin.modules.spatio_channel import RegionBlock, SpatioChannelConv2d  # noqa: F401
from hsc_plugin.tiling import Tiling, explicit_padding  # noqa: F401
