"""How a region form puts its regions' outputs back into one map.

``torch.cat`` along the tiling's tree copies every output pixel once per level of the tree (twice
for a 2×2 grid: the rows, then the map). In eager inference a large map is instead written into
one preallocated tensor, one copy per pixel; a small one is concatenated, because there the
operator calls cost more than the copy they save (writing takes one call per region plus the
allocation, the tree one call per node). At the paper's scale HSC's AlexNet at 6× fewer MACs ran
up to 6 % faster with its maps written (channels_last, batch 1: 2.65× → 2.81× the dense model's
speed), and no slower anywhere; on the 128-px MRI AlexNet at batch 1 (4×4 to 32×32 maps) writing
every map was 1–6 % slower, so there the maps, all under :data:`PASTE_MIN_ELEMENTS`, are
concatenated as before (``benchmarks/results/region_assembly.md``, ``region_assembly_mri.md``).
Autograd, tracing, scripting, compilation and torch.fx keep the concatenation, whose graph has no
in-place op, so export, fine-tuning and torch-pruning see what they saw before. Both ways give the
same values bit for bit.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["assemble", "PASTE_MIN_ELEMENTS"]

PASTE_MIN_ELEMENTS = 1 << 17
"""Output elements (all samples and channels) from which a map is written rather than concatenated:
512 KB of float32, a copy that takes several operator calls' time on a CPU."""


def assemble(parts: List[torch.Tensor], boxes: List[Tuple[int, int, int, int]],
             program: List[Tuple[int, List[int]]]) -> torch.Tensor:
    """The map whose region ``i`` (output rows ``o0:o1``, columns ``q0:q1`` in ``boxes[i]``) is
    ``parts[i]``. ``program`` is the tiling's concatenation tree (:meth:`Tiling.program`)."""
    if not torch.jit.is_scripting():
        if _pasting(parts, boxes):
            return _paste(parts, boxes)
    slots = list(parts)
    for axis, members in program:
        slots.append(torch.cat([slots[m] for m in members], axis))
    return slots[-1]


@torch.jit.unused
def _pasting(parts: List[torch.Tensor], boxes: List[Tuple[int, int, int, int]]) -> bool:
    """A large map in eager inference with concrete sizes: no autograd graph, trace, compilation or
    fx proxy to keep free of in-place writes."""
    return (not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and all(type(v) is int for box in boxes for v in box)
            and sum(p.numel() for p in parts) >= PASTE_MIN_ELEMENTS)


@torch.jit.unused
def _paste(parts: List[torch.Tensor], boxes: List[Tuple[int, int, int, int]]) -> torch.Tensor:
    first = max(parts, key=lambda t: t.numel())  # the layout of a region with pixels
    h = max(box[1] for box in boxes)
    w = max(box[3] for box in boxes)
    channels_last = first.dim() == 4 and not first.is_contiguous() and first.is_contiguous(
        memory_format=torch.channels_last)
    out = torch.empty((first.shape[0], first.shape[1], h, w), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for y, (o0, o1, q0, q1) in zip(parts, boxes):
        out[:, :, o0:o1, q0:q1] = y
    return out
