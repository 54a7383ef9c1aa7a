"""The cyclic garbage collector's settings for a run (-j 0 loop, -j N workers)."""

from __future__ import annotations

import gc

#: The cyclic collector's young-generation threshold in the -j 0 loop (CPython's is 700). Its
#: count is allocations minus deallocations, but a young collection walks every object born
#: since the last one and still alive: transactions held for 32 s replace older ones (the count
#: stays low) while the young list grows, and the 700-threshold collections walked it ~300 times
#: on the 10k-call workload: 0.3-0.6 s of a 2.8 s run, finding nothing (the per-message path
#: makes no reference cycles: gc.DEBUG_SAVEALL after a run holds only startup objects). With
#: 50,000, one collection a run (~0.015 s); cyclic garbage, if any, still triggers it.
GC_YOUNG = 50_000


def collect_rarely(forked: bool = False) -> tuple[int, int, int]:
    """The collector of a run (GC_YOUNG); the thresholds to restore are returned. ``forked``: a
    worker forked from the front first freezes what it inherited (modules, rules: ~60k objects,
    walked by each collection otherwise; a 50k-call worker's gc time 1.3-1.6 s at 700, 1.0-1.1 s
    frozen, ~0.05 s both)."""
    if forked:
        gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, *old[1:])
    return old
