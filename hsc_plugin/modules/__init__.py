"""Factorised module types: what a compressed layer is made of (one file per type).

A new factorised form is one new file here: subclass :class:`FactorisedModule` (with
``nn.Sequential`` or ``nn.Module``), implement ``spec()`` (JSON structure, ``"type"`` = the class
name), and where they apply ``from_spec()``, ``rank_layers()``, ``to_dense()``, ``fold_bn()``,
``speedup_incompatible`` and ``tp_one_op``; import it below. Subclassing registers it in
:data:`TYPES`, which ``save``/``load``, ``fold_bn`` and the torch-pruning and NNI adapters consult
(a ``tp_one_op`` type also needs its channel surgery in the torch-pruning adapter's table).
"""

from hsc_plugin.modules.base import TYPES, FactorisedModule, conv_geometry
from hsc_plugin.modules.low_rank import LowRankConv2d, LowRankLinear
from hsc_plugin.modules.regional import RegionalExpansionConv2d
from hsc_plugin.modules.spatio_channel import RegionBlock, SpatioChannelConv2d
from hsc_plugin.modules.tucker2 import Tucker2Conv2d

__all__ = ["FactorisedModule", "TYPES", "LowRankConv2d", "LowRankLinear", "Tucker2Conv2d",
           "RegionBlock", "SpatioChannelConv2d", "RegionalExpansionConv2d", "conv_geometry"]
