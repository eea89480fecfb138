"""Calibration statistics in memory-bounded groups of layers give the same compressed model."""

from __future__ import annotations

import pytest
import torch

from hsc_plugin import Budget, compress, create_compressor
from hsc_plugin.allocation import statistics_groups
from hsc_plugin.calibration import trace_layers
from hsc_plugin.plan import PlanContext

from conftest import SmallCNN


@pytest.mark.parametrize(("method", "options"), [
    ("hsc", {}), ("hsc", {"channel_side": "output", "partition": "quadtree"}),
    ("global_svd", {"data_aware": True}), ("tucker2", {"data_aware": True}),
])
def test_one_layer_per_group_gives_the_same_model(method: str, options: dict) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(12, 3, 32, 32)
    whole = compress(model, method, calib=x, budget=Budget(3.0), progress=False, max_stats_gb=None, **options)
    streamed = compress(model, method, calib=x, budget=Budget(3.0), progress=False, max_stats_gb=1e-9, **options)
    assert [L.ranks for L in whole.report.layers] == [L.ranks for L in streamed.report.layers]
    for (k, a), (k2, b) in zip(whole.model.state_dict().items(), streamed.model.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert streamed.report.calibration_samples == 12


def test_groups_respect_the_memory_limit() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 32, 32)
    hsc = create_compressor("hsc", partition="quadtree", max_stats_gb=1e-4)  # ~105 KB per group
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    infos = trace_layers(model, names, x[:1])
    groups = statistics_groups(hsc, names, infos, PlanContext())
    sizes = {n: hsc.statistics_bytes(infos[n]) for n in names}
    limit = 1e-4 * 2**30
    assert sum(len(g) for g in groups) == len(names) and len(groups) > 1
    for g in groups:
        assert len(g) == 1 or sum(sizes[n] for n in g) <= limit
    # the estimate is what the accumulators really allocate
    for n in names:
        real = sum(t.numel() * t.element_size() for a in hsc.statistics(infos[n]) for t in a.tensors())
        assert sizes[n] == real


def test_bad_memory_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_stats_gb"):
        create_compressor("global_svd", max_stats_gb=0)
