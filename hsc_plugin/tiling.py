"""Where regions sit: tilings of a layer's output map and the one rule that places their edges.

A :class:`Tiling` splits a layer's output map into axis-aligned rectangles expressed on a grid of
cells (relative coordinates), so a compressed model runs at any input size. The rule, used by the
statistics, the partitioners and the modules alike: a cell edge ``i`` of a ``g``-cell axis of
length ``n`` sits at ``i * n // g`` (:func:`edge`; integer arithmetic, which tracers handle).
An output window ``[o0, o1)`` of a conv reads the input rows ``[o0·s, (o1 − 1)·s + halo)`` of the
padded input (:func:`input_window`), ``halo = d·(k − 1) + 1``. Tilings are guillotine trees (grids
and quadtrees are), so the regions' outputs are assembled with ``torch.cat`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Tuple, Union

__all__ = ["Tiling", "edge", "cell_edges", "output_box", "input_window", "halo", "explicit_padding"]


def edge(i: int, n: int, g: int) -> int:
    """Where edge ``i`` of ``g`` equal cells falls on an axis of length ``n``."""
    return i * n // g


def cell_edges(n: int, g: int) -> List[int]:
    """All ``g + 1`` edges of ``g`` cells on an axis of length ``n``."""
    return [edge(i, n, g) for i in range(g + 1)]


def output_box(region: List[int], h: int, w: int, grid: List[int]) -> Tuple[int, int, int, int]:
    """Pixel rows ``[o0, o1)`` and columns ``[q0, q1)`` of a cell-grid region on an ``h × w`` map."""
    return (edge(region[0], h, grid[0]), edge(region[1], h, grid[0]),
            edge(region[2], w, grid[1]), edge(region[3], w, grid[1]))


def input_window(o0: int, o1: int, stride: int, span: int) -> Tuple[int, int]:
    """The padded-input range a conv reads for outputs ``[o0, o1)`` (``span`` = its halo)."""
    return o0 * stride, (o1 - 1) * stride + span


def halo(kernel: Any, dilation: Any) -> List[int]:
    """Input extent of one output pixel per axis: ``d·(k − 1) + 1``."""
    return [dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1]


Tree = Union[int, tuple[str, list[Any]]]


@dataclass(frozen=True)
class Tiling:
    """Rectangles ``(r0, r1, c0, c1)`` (half-open, in cells of a ``grid``) and how they nest.

    ``tree`` is a leaf index into ``regions`` or ``("h" | "w", [children])``: children stacked
    along height or width.
    """

    grid: tuple[int, int]
    regions: tuple[tuple[int, int, int, int], ...]
    tree: Any = field(default=0)

    @staticmethod
    def full(grid: tuple[int, int] = (1, 1)) -> "Tiling":
        return Tiling(tuple(grid), ((0, grid[0], 0, grid[1]),), 0)

    @staticmethod
    def uniform(grid: tuple[int, int], rows: int, cols: int) -> "Tiling":
        """``rows × cols`` regions on a cell grid (edges by :func:`edge`)."""
        gh, gw = grid
        rows, cols = max(1, min(rows, gh)), max(1, min(cols, gw))
        re, ce = cell_edges(gh, rows), cell_edges(gw, cols)
        regions, bands = [], []
        for i in range(rows):
            cells = []
            for j in range(cols):
                cells.append(len(regions))
                regions.append((re[i], re[i + 1], ce[j], ce[j + 1]))
            bands.append(cells[0] if cols == 1 else ("w", cells))
        tree: Any = bands[0] if rows == 1 else ("h", bands)
        return Tiling((gh, gw), tuple(regions), tree)

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": [int(g) for g in self.grid], "regions": [[int(v) for v in r] for r in self.regions],
                "tree": _tree_json(self.tree)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Tiling":
        return Tiling(tuple(d["grid"]), tuple(tuple(r) for r in d["regions"]), _tree_from_json(d["tree"]))

    def program(self) -> list[tuple[int, list[int]]]:
        """The tree as a flat list of concatenations over slots 0..n-1 (the regions' outputs)."""
        steps: list[tuple[int, list[int]]] = []
        counter = [self.n_regions]

        def walk(node: Any) -> int:
            if not isinstance(node, (tuple, list)):
                return int(node)
            axis, children = node
            slots = [walk(c) for c in children]
            steps.append((2 if axis == "h" else 3, slots))
            counter[0] += 1
            return counter[0] - 1

        walk(self.tree)
        return steps


def _tree_json(node: Any) -> Any:
    if isinstance(node, (tuple, list)):
        return [str(node[0]), [_tree_json(c) for c in node[1]]]
    return int(node)


def _tree_from_json(node: Any) -> Any:
    return int(node) if not isinstance(node, list) else (node[0], [_tree_from_json(c) for c in node[1]])


def explicit_padding(conv_padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding, resolving 'same' / 'valid' as PyTorch does."""
    if conv_padding == "valid":
        return (0, 0, 0, 0)
    if conv_padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return (out[0], out[1], out[2], out[3])
    ph, pw = conv_padding
    return (ph, ph, pw, pw)


