"""What a model costs, in one place: MACs counted from what executes, and time measured on a device.

* :mod:`~hsc_plugin.cost.macs` — MAC and parameter counting (``measure_costs``, ``count_params``):
  exact, device-independent, what MAC and parameter budgets count;
* :mod:`~hsc_plugin.cost.timing` — wall-clock measurement (``measure_latency``, and
  ``measure_interleaved`` to compare models honestly on a busy machine);
* :mod:`~hsc_plugin.cost.latency_model` — :class:`LatencyCostModel`, the per-layer latency cost
  model latency budgets are allocated with (``runtime="onnxruntime"``: :mod:`~hsc_plugin.cost.ort`);
* :mod:`~hsc_plugin.cost.plan_timing` — the pipeline's timing stage (every form of every layer on
  the device) and the latency guard.
"""

from hsc_plugin.cost.latency_model import LatencyCostModel
from hsc_plugin.cost.macs import ModelCost, count_params, measure_costs
from hsc_plugin.cost.timing import measure_interleaved, measure_latency, speedup_text

__all__ = ["ModelCost", "measure_costs", "count_params", "measure_latency", "measure_interleaved", "speedup_text",
           "LatencyCostModel"]
