"""Cost accounting from what executes: MACs and parameters, per module and for the model.

Convention: **MACs** are multiply-accumulates per sample, as counted by
``torch.utils.flop_counter.FlopCounterMode`` on a real forward pass (it reports FLOPs = 2 × MACs
for the whole batch; we divide by 2 and by the batch size). Only matrix products and
convolutions count (no bias adds, activations, norms or pooling), which is the convention of the
low-rank literature; torch-pruning's ``count_ops_and_params`` additionally counts BN/ReLU/pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ModelCost", "measure_costs", "count_params"]


@dataclass
class ModelCost:
    """MACs per sample and parameter counts of a model, in total and per named module."""

    macs: int
    params: int
    module_macs: dict[str, int] = field(default_factory=dict)

    def of(self, metric: str) -> int:
        return self.macs if metric == "macs" else self.params


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def measure_costs(model: nn.Module, example_input: torch.Tensor) -> ModelCost:
    """Run one forward pass under ``FlopCounterMode`` and return MACs per sample by module.

    ``module_macs`` is keyed by the module's name in ``model`` (``""`` for the whole model) and
    includes everything executed below it.
    """
    batch = int(example_input.shape[0]) if example_input.dim() > 0 else 1
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    per_module: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        per_module[name] = sum(ops.values()) // (2 * batch)
    total = counter.get_total_flops() // (2 * batch)
    per_module[""] = total
    return ModelCost(macs=int(total), params=count_params(model), module_macs=per_module)
