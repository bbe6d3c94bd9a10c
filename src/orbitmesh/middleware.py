"""Middleware: ordered hooks around each call, on the client and on the agent.

A middleware is an async callable ``(call, call_next) -> result``. The first in
the list is the outermost: it sees the call first on the way in and the result
(or exception) last on the way out, like ASGI middleware. An exception a
middleware raises propagates to the caller; it is never swallowed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

NextFn = Callable[["Call"], Awaitable[Any]]
Middleware = Callable[["Call", NextFn], Awaitable[Any]]


@dataclass
class Call:
    """One call passing through a middleware chain.

    ``side`` is "client" or "agent"; ``kind`` is "invoke", "execute", "stream"
    or "raw". Middleware may change ``params`` and ``meta`` before calling next.
    """

    side: str
    kind: str
    command: str
    params: Any
    agent: str = ""
    job_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def build_chain(middleware: Sequence[Middleware], endpoint: NextFn) -> NextFn:
    """Compose ``middleware`` around ``endpoint``; the first one is outermost."""
    chain = endpoint
    for mw in reversed(middleware):
        if not callable(mw):
            raise TypeError(f"middleware must be callable, got {type(mw).__name__}")

        def link(call: Call, _mw: Middleware = mw, _next: NextFn = chain) -> Awaitable[Any]:
            return _mw(call, _next)

        chain = link
    return chain


class LoggingMiddleware:
    """Logs each call's command, outcome and duration at INFO (errors at WARNING)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("orbitmesh.calls")

    async def __call__(self, call: Call, call_next: NextFn) -> Any:
        start = time.perf_counter()
        try:
            result = await call_next(call)
        except Exception as exc:
            self.log.warning(
                "%s %s %s failed after %.3f ms: %s",
                call.side,
                call.kind,
                call.command,
                (time.perf_counter() - start) * 1e3,
                exc,
            )
            raise
        self.log.info("%s %s %s ok in %.3f ms", call.side, call.kind, call.command, (time.perf_counter() - start) * 1e3)
        return result


class MetricsMiddleware:
    """Counts calls and errors per command and sums their durations (seconds)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    async def __call__(self, call: Call, call_next: NextFn) -> Any:
        start = time.perf_counter()
        try:
            return await call_next(call)
        except Exception:
            self.errors[call.command] = self.errors.get(call.command, 0) + 1
            raise
        finally:
            self.calls[call.command] = self.calls.get(call.command, 0) + 1
            self.seconds[call.command] = self.seconds.get(call.command, 0.0) + time.perf_counter() - start


__all__ = ["Call", "LoggingMiddleware", "MetricsMiddleware", "Middleware", "NextFn", "build_chain"]
