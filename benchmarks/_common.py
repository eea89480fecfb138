"""What every benchmark script does at the end: print its markdown table and keep it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(lines: list[str], out: str | None) -> None:
    """Print the table; write it to ``out`` (the committed results file) when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def median_ms(fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup`` unmeasured
    ones (for kernel-level comparisons; whole models are timed interleaved by
    ``hsc_plugin.cost.timing``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def logit_error(reference: Any, model: Any, x: Any) -> float:
    """‖f(x) − f̂(x)‖² / ‖f(x)‖² of ``model``'s outputs against ``reference``'s over ``x``, labels not
    used: the square of :func:`hsc_plugin.recovery.output_error`."""
    from hsc_plugin.recovery import output_error

    return output_error(reference, model, x) ** 2


CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "alexnet_mri-128-w0.5-e40-s0.pt"


def checkpoint_model_and_data(data: str) -> tuple[Any, Any, Any, Any]:
    """The committed brain-MRI AlexNet (``paper_recipe()``, eval mode), its train and test splits
    of ``data`` at the recipe's size, and the 256 seeded calibration images every run uses."""
    import torch

    from hsc_plugin.mri import alexnet_mri, load_split, paper_recipe
    from hsc_plugin.mri.experiment import calibration_subset

    recipe = paper_recipe()
    train = load_split(data, "train", recipe.input_size)
    test = load_split(data, "test", recipe.input_size)
    model = alexnet_mri(width=recipe.width, input_size=recipe.input_size)
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval(), train, test, calibration_subset(train, 256, 0)
