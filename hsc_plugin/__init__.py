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
from hsc_plugin.cost_model import LatencyCostModel
from hsc_plugin.costs import ModelCost, measure_costs
from hsc_plugin.deploy import fold_bn
from hsc_plugin.finetuning import finetune
from hsc_plugin.plan import LayerPlan, RankBlock, RankProblem
from hsc_plugin.registry import hookimpl, list_plugins
from hsc_plugin.report import CompressionResult, LayerReport, Report
from hsc_plugin.serialization import load, save
from hsc_plugin.strategy import Block, BlockFactoriser, BlockFactors, ChannelClusterer, RankSelector, SpatialPartitioner

__version__ = "0.1.0"

__all__ = [
    "fold_bn",
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

