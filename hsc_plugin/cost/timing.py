"""Measured latency: what a user's device actually gains, not what MACs promise."""

from __future__ import annotations

import copy
import functools
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["measure_latency", "measure_interleaved", "round_robin", "summarise", "speedup_text", "num_threads"]


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch: int = 1,
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = 2,
    device: str | torch.device | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median (and quartiles) of wall-clock forward time in milliseconds.

    ``input_shape`` is per sample (C, H, W). Runs ``warmup`` untimed passes first; on CUDA each
    run is synchronised. The model is put in eval mode for the measurement and restored after.
    ``channels_last`` (4-D inputs) times an NHWC copy of the model on an NHWC input — the layout a
    CPU deployment should use; the caller's model is left as it is.
    """
    # A module may have no parameters (an HSC block at rank 0 outputs its bias buffer).
    ref = next(model.parameters(), None)
    if ref is None:
        ref = next((b for b in model.buffers() if b.is_floating_point()), torch.zeros(()))
    dev = torch.device(device) if device is not None else ref.device
    x = torch.randn(batch, *input_shape, device=dev, dtype=ref.dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    times: list[float] = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    try:
        with num_threads(threads if dev.type == "cpu" else None):
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "runs": float(runs)}


DISTURBED_IQR = 0.25  # IQR / median above this: the machine was busy while timing


@torch.inference_mode()
def measure_interleaved(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    *,
    batch: int = 1,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = 2,
    max_iqr: float = DISTURBED_IQR,
    timer: Callable[[], float] = time.perf_counter,
    channels_last: bool = False,
    block: int = 1,
) -> dict[str, dict[str, float | bool]]:
    """Time several models round-robin (A, B, A, B, ...) after ``warmup`` rounds.

    Why: timed one after another, a load spike during one model's runs becomes a fake speed-up.
    Interleaved, a disturbance hits every model alike. Returns per model ``median_ms``, ``p25_ms``,
    ``p75_ms`` and ``disturbed`` (IQR/median above ``max_iqr``: report "disturbed", not a number).
    ``channels_last`` (4-D inputs) times NHWC copies of the models on NHWC inputs; the caller's
    models are left as they are. On CPU. ``block``: see :func:`round_robin` (> 1 times each model
    warm, as it runs deployed, instead of right after the others have flushed the caches).
    """
    xs = {}
    for name, m in models.items():
        ref = next(m.parameters(), None)
        xs[name] = torch.randn(batch, *input_shape, dtype=ref.dtype if ref is not None else torch.float32)
        if channels_last and xs[name].dim() == 4:
            xs[name] = xs[name].contiguous(memory_format=torch.channels_last)
    if channels_last:
        models = {n: copy.deepcopy(m).to(memory_format=torch.channels_last) for n, m in models.items()}
    modes = {n: m.training for n, m in models.items()}
    try:
        with num_threads(threads):
            for n, m in models.items():
                m.eval()
            return round_robin({n: functools.partial(m, xs[n]) for n, m in models.items()}, runs=runs,
                               warmup=warmup, max_iqr=max_iqr, timer=timer, block=block)
    finally:
        for n, m in models.items():
            m.train(modes[n])


def round_robin(calls: Mapping[str, Callable[[], Any]], *, runs: int, warmup: int,
                max_iqr: float = DISTURBED_IQR,
                timer: Callable[[], float] = time.perf_counter, block: int = 1) -> dict[str, dict[str, float | bool]]:
    """Call each of ``calls`` in turn (A, B, A, B, ...) ``warmup + runs`` times and :func:`summarise`
    the last ``runs`` times of each: the one timing loop of every interleaved measurement (torch
    models here, ONNX Runtime sessions in :mod:`hsc_plugin.cost.ort`).

    ``block`` > 1: each turn calls a model ``block`` times and times all but the first (A A A, B B B,
    …), until each has ``runs`` timings. The first call of a turn refills the caches the other
    models evicted, so the times are the warm, back-to-back ones of a model running alone (a 3.7-GMAC
    AlexNet at batch 1 streams 240 MB of weights per call: a compressed model timed right after it
    reads 7 % slower, ``benchmarks/results/timing_order.md``), while a disturbance still hits every
    model alike, turn by turn."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    times: dict[str, list[float]] = {n: [] for n in calls}
    timed = max(1, block - 1)
    turns = -(-runs // timed)
    for i in range(warmup + turns):
        for n, call in calls.items():
            for j in range(block):
                t0 = timer()
                call()
                dt = (timer() - t0) * 1e3
                if i >= warmup and (block == 1 or j > 0) and len(times[n]) < runs:
                    times[n].append(dt)
    return {n: summarise(t, max_iqr) for n, t in times.items()}


def summarise(times: list[float], max_iqr: float = DISTURBED_IQR) -> dict[str, float | bool]:
    """Median and quartiles of ``times`` (ms), and ``disturbed`` when IQR/median exceeds ``max_iqr``."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_ms": med, "p25_ms": q[0], "p75_ms": q[2], "runs": float(len(times)),
            "disturbed": med <= 0 or (q[2] - q[0]) / med > max_iqr}


def speedup_text(dense: dict[str, float | bool], other: dict[str, float | bool], mac_ratio: float | None = None) -> str:
    """``"2.10x"``, or ``"disturbed"`` when either timing was; flags a speed-up above the MAC ratio."""
    if dense["disturbed"] or other["disturbed"]:
        return "disturbed"
    s = float(dense["median_ms"]) / float(other["median_ms"])
    if mac_ratio is not None and s > 1.2 * mac_ratio:
        return f"{s:.2f}x (over MAC ratio {mac_ratio:.2f}x: suspect)"
    return f"{s:.2f}x"
