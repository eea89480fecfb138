"""Time a module in ONNX Runtime (CPU execution provider), exported the way hsc_plugin exports.

Users deploy CPU models through ORT more often than eager PyTorch; kernels rank differently there,
so a latency budget stated for ORT must be measured in ORT.
"""

from __future__ import annotations

import functools
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hsc_plugin.cost.timing import DISTURBED_IQR, round_robin

__all__ = ["ort_available", "export_onnx", "ort_session", "ort_latency_ms", "ort_interleaved"]

_MISSING = "runtime='onnxruntime' needs onnxruntime: pip install 'hsc-plugin[export]'"


def ort_available() -> bool:
    """Whether onnxruntime imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Swallow what C++ writes to fd 1: torch's TorchScript exporter logs the whole graph there when
    it fails, whatever ``verbose`` says (its log switch is tested as a function, always true)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _export(module: nn.Module, x: torch.Tensor, dynamo: bool, dynamic_batch: bool) -> bytes:
    buf = io.BytesIO()
    kw: dict[str, Any] = {"input_names": ["x"], "output_names": ["y"], "verbose": False}
    if dynamic_batch and dynamo:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    elif dynamic_batch:
        kw["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    torch.onnx.export(module, (x,), buf, dynamo=dynamo, **kw)
    return buf.getvalue()


def export_onnx(module: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = False) -> tuple[bytes, str]:
    """The ONNX model of ``module`` (in eval mode, restored after) and the exporter that made it.

    The TorchScript-based exporter first (fast); torch's dynamo exporter where it fails (e.g. an
    HSC layer before ``adaptive_avg_pool2d`` to a size other than 1: tests/test_export.py).
    ``dynamic_batch`` leaves the batch axis free, so one session serves every batch size.
    """
    was = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                with _quiet_stdout():
                    return _export(module, example, False, dynamic_batch), "torchscript"
            except Exception:
                if dynamic_batch and example.shape[0] < 2:  # dynamo specialises a batch of 1
                    example = example.expand(2, *example.shape[1:]).contiguous()
                return _export(module, example, True, dynamic_batch), "dynamo"
    finally:
        module.train(was)


def ort_session(onnx_model: bytes, threads: int | None = None, *, spinning: bool = True) -> Any:
    """An ``InferenceSession`` on the CPU execution provider with ``threads`` intra-op threads
    (default: torch's). ``spinning=False`` stops idle workers busy-waiting for the next run, which
    would steal the cores from another session timed in turn with this one."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_MISSING) from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


def ort_latency_ms(module: nn.Module, input_shape: tuple[int, ...], batch: int = 1, runs: int = 10,
                   warmup: int = 3, threads: int | None = None) -> float:
    """Median milliseconds of one ORT run of ``module`` on a ``(batch, *input_shape)`` input."""
    if not ort_available():
        raise ImportError(_MISSING)
    x = torch.randn(batch, *input_shape)
    sess = ort_session(export_onnx(module, x)[0], threads)
    feed = {"x": x.numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def ort_interleaved(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    *,
    batches: tuple[int, ...] = (1,),
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = 2,
    max_iqr: float = DISTURBED_IQR,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[int, dict[str, dict[str, Any]]]:
    """:func:`~hsc_plugin.cost.timing.measure_interleaved` in ONNX Runtime: each model exported
    once (batch axis free) into one CPU session with ``threads`` intra-op threads, then, per batch
    size, the sessions run round-robin (A, B, A, B, ...) after ``warmup`` rounds, so a load spike
    hits every model alike. Returns ``{batch: {name: {median_ms, p25_ms, p75_ms, runs, disturbed,
    exporter}}}``. Idle workers do not spin: on a machine with few cores one session's spinning
    threads would slow the next session's run."""
    if not ort_available():
        raise ImportError(_MISSING)
    example = torch.randn(2, *input_shape)
    sessions, exporters = {}, {}
    for name, m in models.items():
        onnx_model, exporters[name] = export_onnx(m, example, dynamic_batch=True)
        sessions[name] = ort_session(onnx_model, threads, spinning=False)
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for batch in batches:
        feed = {"x": torch.randn(batch, *input_shape).numpy()}
        calls = {n: functools.partial(s.run, None, feed) for n, s in sessions.items()}
        res = round_robin(calls, runs=runs, warmup=warmup, max_iqr=max_iqr, timer=timer)
        out[batch] = {n: {**t, "exporter": exporters[n]} for n, t in res.items()}
    return out
