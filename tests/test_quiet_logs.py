"""Captured (non-TTY) output carries no progress-bar updates: no carriage returns, no per-batch lines."""

from __future__ import annotations

import torch
from torch import nn

from hsc_plugin import compress


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()


def test_default_progress_is_quiet_when_not_a_tty(capsys) -> None:
    x = torch.randn(16, 3, 16, 16)
    for method in ("hsc", "global_svd", "tucker2"):
        compress(_net(), method, calib=[x[:8], x[8:]], budget="2x")
    out = capsys.readouterr()
    text = out.out + out.err
    assert "\r" not in text
    assert "batch/s" not in text and "layer/s" not in text


def test_forced_progress_still_shows(capsys) -> None:
    compress(_net(), "global_svd", calib=torch.randn(8, 3, 16, 16), budget="2x", progress=True)
    assert "decompose" in capsys.readouterr().err
