"""Event-loop helpers: uvloop where it is installed, the stdlib loop elsewhere."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new loop: ``kind`` "uvloop", "asyncio", or "auto" (uvloop if importable)."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"loop kind must be 'auto', 'uvloop' or 'asyncio', not {kind!r}")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def tune_gc_for_server(gen0: int = 50_000) -> None:
    """For a process that is a broker and little else: move what exists now out of the
    collector's sight (``gc.freeze``) and collect the young generation less often.

    A broker under load makes short-lived objects per job; with the default threshold
    (700) the collector ran ~800 times per 6k jobs and its older generations paused for
    ~30 ms (measured with ``orbitmesh bench``). Process-wide, so only the CLI's own
    processes call it; embedding programs decide for themselves.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)


def tune_gil_for_server(interval: float = 0.0001) -> None:
    """For a process that is a broker and little else: the GIL's switch interval at ``interval``
    seconds instead of CPython's 5 ms.

    A broker with a job log runs two Python threads: the control plane, busy under load, and
    the log's writer, which gives up the GIL for each commit and needs it back to answer the
    batch. CPython hands a waiting thread the GIL only when the holder is asked to drop it, after
    the switch interval: the writer waited ~2 ms per batch, and every durable job waits for about
    four of its batches. At 0.1 ms: +2 % to +12 % sync jobs/s (five alternating pairs of the
    bench's jobs workload). Process-wide, so only the CLI's own processes call it; embedding
    programs decide for themselves.
    """
    if not 0 < interval <= 1:
        raise ValueError(f"the switch interval must be in (0, 1] seconds, not {interval!r}")
    sys.setswitchinterval(interval)


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """Run ``main`` to completion on a new loop (uvloop when available) and close it."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(main)
