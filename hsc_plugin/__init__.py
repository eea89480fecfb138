"""hsc-plugin: make CNNs smaller and faster by low-rank factorisation.

    from hsc_plugin import compress, Budget
    result = compress(model, method="global_svd", calib=images, budget=Budget(3.0))
    result.model, result.report
"""

from __future__ import annotations

from hsc_plugin.api import compress, create_compressor
from hsc_plugin.budget import Budget, BudgetError
from hsc_plugin.calibration import CalibrationError
from hsc_plugin.compressors.base import Compressor
from hsc_plugin.cost.latency_model import LatencyCostModel
from hsc_plugin.cost.macs import ModelCost, measure_costs
from hsc_plugin.deploy import fold_bn
from hsc_plugin.finetuning import finetune
from hsc_plugin.plan import LayerPlan, RankBlock, RankProblem
from hsc_plugin.registry import hookimpl, list_plugins
from hsc_plugin.report import CompressionResult, LayerReport, Report
from hsc_plugin.serialization import load, save
from hsc_plugin.tuning import tune_pointwise
from hsc_plugin.strategy import Block, BlockFactoriser, BlockFactors, ChannelClusterer, RankSelector, SpatialPartitioner

__version__ = "0.1.0"

# Module names before the cost accounting moved to ``hsc_plugin.cost`` (and the form choice was
# renamed), so scripts written against them keep importing.
import sys as _sys

from hsc_plugin import form_choice as _form_choice
from hsc_plugin.cost import latency_model as _latency_model, macs as _macs, ort as _ort, \
    plan_timing as _plan_timing, timing as _timing

for _old, _new in {"costs": _macs, "latency": _timing, "cost_model": _latency_model, "ort_timing": _ort,
                   "plan_timing": _plan_timing, "forms": _form_choice}.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _new)

__all__ = [
    "fold_bn",
    "tune_pointwise",
    "compress",
    "create_compressor",
    "Budget",
    "BudgetError",
    "CalibrationError",
    "Compressor",
    "CompressionResult",
    "Report",
    "LayerReport",
    "measure_costs",
    "LatencyCostModel",
    "ModelCost",
    "LayerPlan",
    "RankBlock",
    "RankProblem",
    "RankSelector",
    "SpatialPartitioner",
    "ChannelClusterer",
    "BlockFactoriser",
    "BlockFactors",
    "Block",
    "hookimpl",
    "list_plugins",
    "finetune",
    "save",
    "load",
]

