"""Cyclic garbage collection for the processes that handle every message.

CPython's cyclic collector runs its youngest generation after every 700 container
allocations (tuples, dicts, lists, objects) and now and then walks the whole heap.
The intake path allocates a dozen containers per message, almost none in a cycle, all
freed by reference counting: at 10,000 messages a second the collector ran ~170 times a
second and cost about 5 % of the intake's instructions (gateway.lab.intakebench handoff
under callgrind, docs/performance.md). After start-up, what the process has built (its
modules, config, profiles) is moved out of the collector's sight (gc.freeze) and the
youngest generation is collected every GEN0_THRESHOLD allocations. Cycles are still
collected; they live a few milliseconds longer.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000
OLDER_THRESHOLD = 10  # collections of the younger generation between older ones


def settle_heap(gen0_threshold: int = GEN0_THRESHOLD) -> None:
    """Call once start-up is done: collect, freeze what survived, and collect the
    youngest generation every `gen0_threshold` allocations (0: keep CPython's)."""
    gc.collect()
    gc.freeze()
    if gen0_threshold:
        gc.set_threshold(gen0_threshold, OLDER_THRESHOLD, OLDER_THRESHOLD)
