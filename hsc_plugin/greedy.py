"""The one greedy engine: take, again and again, the move that removes the most error per unit of cost.

Rank selection (``strategies/rank.py``: one more component of one block), a form's error-vs-cost
path and the choice of forms (``hsc_plugin.form_choice``: one more step along a layer's envelope) are all
this loop; they differ only in what an item's next move is and when it fits.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

__all__ = ["greedy"]

K = TypeVar("K", bound=Hashable)


def greedy(
    items: Sequence[K],
    propose: Callable[[K], float | None],
    accept: Callable[[K], bool],
    *,
    linked: Callable[[K], Iterable[K]] | None = None,
    lazy: bool = False,
    by_key: bool = False,
) -> None:
    """Make moves best-first until none is left.

    ``propose(k)``: the score of item ``k``'s next move (error removed per unit of cost; ``inf`` for
    a move that saves cost), ``None`` when it has none. ``accept(k)``: make that move if it fits and
    return True, else return False (the item waits until a linked item moves).

    Scores go stale when items move. By default, after ``k`` moves every item of ``linked(k)``
    (default: ``k`` alone) is re-proposed and its older entries are skipped. With ``lazy=True`` only
    ``k`` is re-proposed; a popped item is re-scored and goes back in line if it is no longer the
    best — far fewer evaluations when items are many and scores change little. Ties go to the item
    proposed first, or with ``by_key=True`` to the smaller key.
    """
    version: dict[K, int] = {}
    heap: list[tuple[float, object, int, K, int]] = []
    counter = itertools.count()

    def push(k: K, score: float | None) -> None:
        if score is not None:
            n = next(counter)
            heapq.heappush(heap, (-score, k if by_key else n, n, k, version.get(k, 0)))

    for k in items:
        push(k, propose(k))
    while heap:
        neg, _, _, k, ver = heapq.heappop(heap)
        if ver != version.get(k, 0):
            continue  # stale: the item moved since this move was scored
        if lazy:
            score = propose(k)
            if score is None:
                continue
            if heap and -heap[0][0] > score:
                push(k, score)  # no longer the best: back in line
                continue
        if not accept(k):
            continue  # does not fit; cheaper moves elsewhere may still fit
        for j in (linked(k) if linked is not None and not lazy else (k,)):
            version[j] = version.get(j, 0) + 1
            push(j, propose(j))
