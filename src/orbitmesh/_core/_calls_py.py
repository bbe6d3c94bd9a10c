"""A client's calls in flight, pure-Python reference. ``_calls_c.pyx`` must behave identically.

Per call a client takes the next correlation id, records what the answer is awaited by and
pushes the call's deadline; per answer it finds that record and resolves the future. The
``CallTable`` holds all three and settles the commonest answers itself: a REPLY to a plain
request or a job, decoded with the serializer it was sent with, and a job's ACCEPTED.
Everything else (streams, queries, raw calls, errors, events) is left to the client.
"""

from __future__ import annotations

import asyncio
import heapq
import struct
from collections.abc import Callable
from time import time_ns
from typing import Any

from ..errors import ErrorCode, OrbitMeshError, SerializationError
from ..protocol import F_RAW_REPLY, HEADER_SIZE, Kind
from ..serializers import SERIALIZER_MASK, SERIALIZER_SHIFT, RawSerializer, Serializer
from ._frame_py import check_header

public_api = ["CallTable", "Pending", "decode_reply"]

_REQUEST, _REPLY, _ACCEPTED = int(Kind.REQUEST), int(Kind.REPLY), int(Kind.ACCEPTED)
_RAW_ID = RawSerializer.id
_INF = float("inf")
_NO_DEADLINE_S = 1e12  # a timeout this long (~31,700 years) or longer sends no deadline
_pack_hdr = struct.Struct("<2sBBHHIIQQQ").pack
EMPTY = b""


class Pending:
    """A call waiting for its answer: the future it resolves, the serializer it was sent with
    and its kind (a Kind value), plus what jobs (``accepted``, ``waiter``) and streams
    (``items``, ``waiter``, ``token``) add."""

    __slots__ = ("accepted", "agent", "corr", "fut", "items", "kind", "serializer", "token", "waiter")

    def __init__(self, fut: asyncio.Future[Any], serializer: Serializer, kind: int, corr: int = 0) -> None:
        self.fut = fut
        self.serializer = serializer
        self.kind = kind
        self.corr = corr
        self.accepted: asyncio.Future[int] | None = None
        self.items: Any = None  # a deque of stream items
        self.waiter: asyncio.Future[None] | None = None
        self.token = EMPTY
        self.agent = ""


def decode_reply(fut: asyncio.Future[Any], serializer: Serializer, body: Any) -> None:
    """Resolve ``fut`` with ``body`` decoded by ``serializer`` (an empty body is None, except for
    raw), or fail it with the reason the body does not decode."""
    if not body and serializer.id != _RAW_ID:
        fut.set_result(None)
        return
    try:
        value = serializer.loads(body)
    except OrbitMeshError as exc:
        fut.set_exception(exc)
        return
    except Exception as exc:  # a plugin's own error type: still the caller's error, not the loop's
        message = f"serializer {serializer.name!r} cannot decode the reply: {exc!r}"
        fut.set_exception(SerializationError(message, code=ErrorCode.BAD_PAYLOAD))
        return
    fut.set_result(value)


class CallTable:
    """The calls a client has in flight: ``pending`` (corr -> Pending), the last ``corr``
    issued, and a heap of deadlines in loop time."""

    def __init__(self) -> None:
        self.pending: dict[int, Pending] = {}
        self.corr = 0
        self._heap: list[tuple[float, int]] = []

    @property
    def deadlines(self) -> int:
        """Deadlines held, including those of calls that ended since (dropped in bulk)."""
        return len(self._heap)

    def open(self, fut: asyncio.Future[Any], serializer: Serializer, kind: int, at: float = _INF) -> Pending:
        """Record a new call under the next corr (``p.corr``; corrs only rise, the broker
        refuses replays), with its deadline ``at`` (loop time; inf: none; NaN: ValueError)."""
        if at != at:
            raise ValueError("a call's deadline must be a number (is its timeout NaN?)")
        self.corr = corr = self.corr + 1
        p = Pending(fut, serializer, kind, corr)
        pending = self.pending
        pending[corr] = p
        if at != _INF:
            heap = self._heap
            if len(heap) > 2 * len(pending) + 1024:
                # Deadlines stay until they pass, long after most calls ended: at 100k calls/s
                # and a 30 s timeout that was 3M entries before the first one expired.
                heap = self._compact()
            heapq.heappush(heap, (at, corr))
        return p

    def request(
        self,
        send: Callable[[list[Any]], None],
        fut: asyncio.Future[Any],
        serializer: Serializer,
        kind: int,
        flags: int,
        aux: int,
        at: float,
        timeout: float,
        route: bytes,
        command: bytes,
        body: bytes,
        options: bytes | None = None,
    ) -> Pending:
        """Open a call (as ``open``) and send it: ``send([header, route, command, body(,
        options)])``, the header naming the serializer besides ``flags`` and carrying the wall
        clock deadline ``timeout`` s from now (none for an infinite one). If ``send`` raises, the
        call was never made."""
        p = self.open(fut, serializer, kind, at)
        # 0: no deadline (an infinite timeout, or one past any clock)
        deadline = 0 if timeout >= _NO_DEADLINE_S else max(0, time_ns() // 1_000_000 + int(timeout * 1000))
        hdr = _pack_hdr(b"OM", 1, kind, (serializer.id << 8) | flags, 0, aux, 0, p.corr, 0, deadline)
        frames = [hdr, route, command, body]
        if options:
            frames.append(options)
        try:
            send(frames)
        except BaseException:
            del self.pending[p.corr]
            raise
        return p

    def _compact(self) -> list[tuple[float, int]]:
        pending = self.pending
        self._heap = heap = [e for e in self._heap if e[1] in pending]
        heapq.heapify(heap)
        return heap

    def next_deadline(self) -> float:
        """The earliest deadline held (loop time), inf if none."""
        return self._heap[0][0] if self._heap else _INF

    def due(self, now: float) -> list[int]:
        """Take the deadlines up to ``now``: the corrs of those calls still pending, earliest
        first (they stay in ``pending``; the caller ends them)."""
        heap = self._heap
        pending = self.pending
        out = []
        while heap and heap[0][0] <= now:
            corr = heapq.heappop(heap)[1]
            if corr in pending:
                out.append(corr)
        if len(heap) > 64 and len(heap) > 4 * len(pending):
            self._compact()
        return out

    def take_all(self) -> list[Pending]:
        """Forget every call (the connection is gone) and return their entries."""
        out = list(self.pending.values())
        self.pending.clear()
        self._heap = []
        return out

    def settle(self, batch: list[list[Any]], start: int = 0) -> int:
        """Resolve the plain replies and jobs' ACCEPTED and replies in ``batch`` (received
        messages, each a list of frames) from ``start`` on, up to the first message of another
        sort; return that one's index (``len(batch)`` if none), for the client to handle before
        settling on after it."""
        pending = self.pending
        n = len(batch)
        i = start
        while i < n:
            frames = batch[i]
            hdr = frames[0]
            if (
                type(hdr) is not bytes
                or len(hdr) != HEADER_SIZE
                or (hdr[3] != _REPLY and hdr[3] != _ACCEPTED)
                or len(frames) < 2
                or check_header(hdr)
            ):
                return i
            corr = int.from_bytes(hdr[16:24], "little")
            p = pending.get(corr)
            if p is None:
                return i
            if hdr[3] == _ACCEPTED:  # a job is in the log: its call waits on for the outcome
                if p.accepted is None:
                    return i
                if not p.accepted.done():
                    p.accepted.set_result(int.from_bytes(hdr[24:32], "little"))
                i += 1
                continue
            flags = hdr[4] | (hdr[5] << 8)
            if (
                p.kind != _REQUEST
                or p.items is not None
                or flags & F_RAW_REPLY
                or (flags & SERIALIZER_MASK) >> SERIALIZER_SHIFT != p.serializer.id
            ):
                return i
            del pending[corr]
            fut = p.fut
            if not fut.done():
                waiter = p.waiter
                if waiter is not None and not waiter.done():  # a Job.result() waiting
                    waiter.set_result(None)
                decode_reply(fut, p.serializer, frames[2] if len(frames) > 2 else EMPTY)
                if p.accepted is not None and fut.done() and not fut.cancelled():
                    fut.exception()  # a job's outcome may never be asked for: not "never retrieved"
            i += 1
        return n
