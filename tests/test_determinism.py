"""The same seed gives bit-identical compressed weights and identical reports, for every method
and strategy that draws random numbers — also in another process with another hash seed (so no
result depends on set or dict iteration order of strings)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hsc_plugin import Budget, compress

TESTS = Path(__file__).resolve().parent

# (method, options): every compressor, data-free and data-aware, every HSC clusterer and
# partitioner family (kmeans and spectral draw random numbers from ``seed``).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "global_svd": ("global_svd", {}),
    "global_svd-data": ("global_svd", {"data_aware": True}),
    "tucker2": ("tucker2", {}),
    "tucker2-data": ("tucker2", {"data_aware": True}),
    "hsc": ("hsc", {"min_region": 4}),  # as conftest sets it: the subprocess below does not see it
    "hsc-output": ("hsc", {"channel_side": "output", "min_region": 4}),
    "hsc-kmeans": ("hsc", {"clusterer": "kmeans", "seed": 3, "min_region": 4}),
    "hsc-spectral-quadtree": ("hsc", {"clusterer": "spectral", "partition": "quadtree", "seed": 5,
                              "min_region": 4}),
    "hsc-balanced": ("hsc", {"balanced": True, "partition": "none"}),
}


def _model() -> nn.Module:
    # built here (not from conftest) so that the subprocess below builds the very same model
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _calib() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _run(case: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    method, opts = CASES[case]
    res = compress(_model(), method, calib=_calib(), budget=Budget(3.0), progress=False, **opts)
    return res.model.state_dict(), without_wall_times(res.report.to_dict())


def without_wall_times(obj: Any) -> Any:
    """The report less its wall-clock durations ("seconds", here and in the recovery steps): the only
    fields that may differ between identical runs."""
    if isinstance(obj, dict):
        return {k: without_wall_times(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_wall_times(v) for v in obj]
    return obj


def fingerprint(case: str) -> str:
    """SHA-256 of the compressed weights' bytes and of the report (canonical JSON)."""
    state, report = _run(case)
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().cpu().numpy().tobytes())
    h.update(json.dumps(report, sort_keys=True, default=str).encode())
    return h.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_bit_identical(case: str) -> None:
    (a, ra), (b, rb) = _run(case), _run(case)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert ra == rb
    assert any(L["status"] == "factorised" for L in ra["layers"])


def test_same_in_another_process_with_another_hash_seed() -> None:
    cases = ["tucker2-data", "hsc", "hsc-spectral-quadtree"]  # the ones with clustering and sets
    here = {c: fingerprint(c) for c in cases}
    code = ("import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "from test_determinism import fingerprint; print(json.dumps({c: fingerprint(c) for c in sys.argv[2:]}))")
    seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(TESTS), *cases], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there == here
