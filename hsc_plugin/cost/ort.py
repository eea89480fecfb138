"""Time a module in ONNX Runtime (CPU execution provider), exported the way hsc_plugin exports.

Users deploy CPU models through ORT more often than eager PyTorch; kernels rank differently there,
so a latency budget stated for ORT must be measured in ORT.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
from torch import nn


def ort_latency_ms(module: nn.Module, input_shape: tuple[int, ...], batch: int = 1, runs: int = 10,
                   warmup: int = 3, threads: int | None = None) -> float:
    """Median milliseconds of one ORT run of ``module`` on a ``(batch, *input_shape)`` input."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("runtime='onnxruntime' needs onnxruntime: pip install 'hsc-plugin[export]'") from e
    x = torch.randn(batch, *input_shape)
    buf = io.BytesIO()
    was = module.training
    module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
            except Exception:  # e.g. adaptive pooling to a size that does not divide the input
                buf = io.BytesIO()
                torch.onnx.export(module, (x,), buf, dynamo=True, input_names=["x"], output_names=["y"])
    finally:
        module.train(was)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))
