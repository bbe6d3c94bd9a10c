"""Event-loop helpers: uvloop where it is installed, the stdlib loop elsewhere."""

from __future__ import annotations

import asyncio
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


def run(main: Coroutine[Any, Any, T], *, loop: str = "auto") -> T:
    """Run ``main`` to completion on a new loop (uvloop when available) and close it."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(main)
