"""A stride-1 1×1 conv's output statistics follow from its input's (``y = W x`` pixel by pixel): HSC
derives them instead of accumulating C_out² Grams, and runs no second pass for such layers.
The derived statistics must equal the accumulated ones, and anything else must still be accumulated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress
from hsc_plugin.calibration import run_calibration, trace_layers
from hsc_plugin.compressors.hsc_statistics import CellStats, ClusterContributions, ProjectedCellStats, pointwise
from hsc_plugin.tiling import Tiling


def _x(n: int = 6, c: int = 5, hw: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g)
    x[:, :2, : hw // 2] += 2.0  # cells that differ
    return x


@pytest.mark.parametrize("conv, expected", [
    (nn.Conv2d(5, 7, 1), True),
    (nn.Conv2d(5, 7, 1, padding="same"), True),
    (nn.Conv2d(5, 7, 1, stride=2), False),  # the input has pixels the output never reads
    (nn.Conv2d(5, 7, 1, padding=1), False),  # padded border pixels are not in the input's cells
    (nn.Conv2d(6, 8, 1, groups=2), False),
    (nn.Conv2d(5, 7, 3, padding=1), False),
    (nn.Linear(5, 7), False),
])
def test_pointwise_is_exactly_the_convs_whose_output_is_w_x_on_the_same_map(conv: nn.Module, expected: bool) -> None:
    assert pointwise(conv) is expected


def test_projected_output_cell_moments_equal_the_accumulated_ones() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 9, 1, bias=True).eval()
    x = _x()
    info = trace_layers(conv, [""], x)[""]
    dev = torch.device("cpu")
    outs = CellStats(9, (3, 2), info.out_hw, "output", dev)
    ins = CellStats(5, (3, 2), info.out_hw, "input", dev)
    projected = ProjectedCellStats(conv, ins)
    run_calibration(conv, {"": [outs, ins, projected]}, x, progress=False)
    assert projected.needs_pass is False and projected.tensors() == []
    torch.testing.assert_close(projected.count, outs.count)
    torch.testing.assert_close(projected.S, outs.S, rtol=1e-5, atol=1e-5)  # float32 conv vs float64 W S Wᵀ
    torch.testing.assert_close(projected.region(0, 2, 1, 2), outs.region(0, 2, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out_channels", [3, 9])  # the patch Gram (|c| < C_out) and the output Gram
def test_cluster_contributions_of_a_pointwise_conv_need_no_pass_and_equal_a_pass(out_channels: int) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(5, out_channels, 1).eval()
    x = _x()
    info = trace_layers(conv, [""], x)[""]
    ins = CellStats(5, (2, 2), info.out_hw, "input", torch.device("cpu"))
    run_calibration(conv, {"": [ins]}, x, progress=False)
    tiling = Tiling.uniform((2, 2), 2, 1)
    clusters = [[[0, 3], [1, 2, 4]], [[4], [0, 1, 2, 3]]]
    derived = ClusterContributions(conv, tiling, clusters, ins)
    passed = ClusterContributions(conv, tiling, clusters)
    assert derived.needs_pass is False and passed.needs_pass is True
    run_calibration(conv, {"": [passed]}, x, progress=False)
    for a, b in zip(derived.tensors(), passed.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_a_strided_1x1_conv_still_gets_its_pass() -> None:
    conv = nn.Conv2d(5, 9, 1, stride=2)
    ins = CellStats(5, (2, 2), (6, 6), "input", torch.device("cpu"))
    assert ClusterContributions(conv, Tiling.full((2, 2)), [[[0, 1, 2, 3, 4]]], ins).needs_pass is True


def test_hsc_runs_one_calibration_pass_when_every_layer_is_pointwise() -> None:
    """Only 1×1 convs: the clusters' contributions come from the input cells, so calibration is one
    pass over the data; a 3×3 conv among them brings the second pass back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 32, 1), nn.ReLU(), nn.Conv2d(32, 48, 1), nn.ReLU(), nn.Conv2d(48, 32, 1)).eval()
    x = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    passes: list[list[str]] = []
    orig = run_calibration

    def spy(model_, accumulators, calib, **kw):  # type: ignore[no-untyped-def]
        # the layers this pass feeds (accumulators derived from the first pass are not fed)
        passes.append(sorted(n for n, accs in accumulators.items() if any(a.needs_pass for a in accs)))
        return orig(model_, accumulators, calib, **kw)

    import hsc_plugin.pipeline as pipeline

    options = {"budget": Budget(2.0), "progress": False, "grid": (2, 2), "bn_reestimation": False,
               "bias_correction": False}
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "run_calibration", spy)
    try:
        res = compress(model, "hsc", calib=x, **options)
        assert passes == [["0", "2", "4"]]
        assert res.report.achieved_ratio >= 2.0 * (1 - 1e-6)
        passes.clear()
        model[2] = nn.Conv2d(32, 48, 3, padding=1)
        compress(model.eval(), "hsc", calib=x, **options)
        assert passes == [["0", "2", "4"], ["2"]]
    finally:
        mp.undo()


def test_accumulators_that_need_no_pass_are_neither_fed_nor_summed_across_processes(monkeypatch) -> None:
    """Under torch.distributed each rank's sums are all-reduced; an accumulator complete without data
    (derived from others, which are summed) must not be, or it would count every other rank twice."""
    import torch.distributed as dist

    from hsc_plugin.calibration import Accumulator, OutputMoment

    class Derived(Accumulator):
        needs_pass = False

        def __init__(self) -> None:
            self.S = torch.ones(3, 3, dtype=torch.float64)
            self.fed = 0

        def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.fed += 1

        def tensors(self) -> list[torch.Tensor]:
            return [self.S]

    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: reduced.append(t))
    conv = nn.Conv2d(5, 4, 3).eval()
    live, derived = OutputMoment(4, torch.device("cpu")), Derived()
    n = run_calibration(nn.Sequential(conv), {"0": [live, derived]}, _x(), progress=False)
    assert n == 6 and derived.fed == 0 and float(live.count) > 0
    assert any(t is live.S for t in reduced) and not any(t is derived.S for t in reduced)
    torch.testing.assert_close(derived.S, torch.ones(3, 3, dtype=torch.float64))
