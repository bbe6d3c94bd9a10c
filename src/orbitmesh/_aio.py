"""A pyzmq socket driven by an asyncio loop, draining messages in batches.

zmq.asyncio wraps every recv in a future; on the client and agent hot paths we
instead watch the socket's FD and, when it is readable, pull every waiting
message with NOBLOCK and hand each to a plain callback. ZMQ_FD is
edge-triggered, so after every send (which may consume the edge) a drain is
scheduled once per loop iteration.

Sends are coalesced the same way: what one turn of the loop sends goes to libzmq
together at the start of the next, and what the handlers of a received batch send
goes together at the end of that batch. Sent one by one between other work, each
message woke libzmq's I/O thread on its own (an eventfd write here, a wake-up
and a TCP write there); together they share one. Measured on invoke (window
1000): about 1 us less CPU per round trip in each of client, broker and agent,
and 5-10 % more round trips/s.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from ._core import frame, io

_BATCH = 512
Frames = Sequence[Any]


class _NoCopy:
    """A message queued with ``copy=False`` (the others are queued as they are)."""

    __slots__ = ("frames",)

    def __init__(self, frames: Frames) -> None:
        self.frames = frames


class AsyncSocket:
    """Wrap ``sock`` (a non-asyncio pyzmq socket) for use on ``loop``.

    ``on_message(frames)`` is called for every received multipart message,
    synchronously, from the loop, in order. ``on_batch(batch, start)``, if given, handles
    what it can in one call: the messages from ``start`` up to the index it returns, of the
    first one it leaves to ``on_message``.
    ``send`` never blocks: if the socket's high-water mark is reached the message waits
    in an unbounded local queue until the socket is writable again (callers bound what
    they send).

    Messages are received in either framing (a packed one comes back unpacked); ``packed``
    says how they are sent: True once the session speaks protocol 2 (packed framing), when
    every message sent must start with its 40-byte header.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: Callable[[list[Any]], None],
        loop: asyncio.AbstractEventLoop,
        on_batch: Callable[[list[list[Any]], int], int] | None = None,
    ) -> None:
        self.sock = sock
        self._on_message = on_message
        self._on_batch = on_batch
        self._loop = loop
        self._fd = int(sock.getsockopt(zmq.FD))
        self.last_rx = loop.time()  # loop time of the last batch received (or of the socket's creation)
        self._scheduled = False
        self._draining = False
        self._outbox: deque[Frames | _NoCopy] = deque()
        self._recv_batch = io.recv_batch
        self._send_parts = io.send_parts
        self._send_queue = io.send_queue
        self._closed = False
        self.packed = False
        loop.add_reader(self._fd, self._drain)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        if self._outbox:
            self._flush()
        batch = self._recv_batch(sock, _BATCH)
        got = len(batch)
        if got:
            self.last_rx = self._loop.time()  # once per batch, not per message
            # What the batch's handlers send goes out together at its end (below), not a loop
            # turn later: one wake-up of libzmq's I/O thread, and no turn of latency.
            self._draining = True
            try:
                still_open = self._handle(batch, got)
            except BaseException:
                self._draining = False
                if self._outbox:
                    self._schedule()
                raise
            self._draining = False
            if not still_open:
                return  # closed meanwhile
        if got == _BATCH:
            # More may be waiting: yield to the loop, then continue (flushing first).
            self._schedule()
            return
        if self._outbox:
            self._flush()
            if self._outbox:
                self._schedule_flush()  # the socket is full: poll for room
                return
        if int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._schedule()  # a send may have taken the FD's edge: look again

    def _handle(self, batch: list[list[Any]], got: int) -> bool:
        """Hand each message of ``batch`` on, in order; False if the socket was closed meanwhile."""
        on_message = self._on_message
        on_batch = self._on_batch
        if on_batch is None:
            for frames in batch:
                on_message(frames)
                if self._closed:
                    return False
            return True
        i = 0
        while i < got:  # on_batch takes what it can, on_message the others
            i = on_batch(batch, i)
            if self._closed:
                return False
            if i < got:
                on_message(batch[i])
                if self._closed:
                    return False
                i += 1
        return True

    def _schedule_flush(self) -> None:
        # A full pipe drains when the peer reads; poll for it at a short interval.
        self._loop.call_later(0.001, self._drain)

    def _flush(self) -> None:
        out = self._outbox
        packed = self.packed
        sock = self.sock
        # The plain messages go in one compiled call; a _NoCopy one (or any other) stops it.
        while not self._send_queue(sock, out, packed) and out:
            frames = out[0]
            if isinstance(frames, _NoCopy):
                parts = frames.frames
                try:
                    sock.send_multipart(frame.pack_parts(list(parts)) if packed else parts, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
            elif not self._send_parts(sock, frames, packed):
                return
            out.popleft()

    def send(self, frames: Frames, copy: bool = True) -> None:
        """Queue one multipart message. It goes to libzmq with everything else queued in this
        turn of the loop, at the start of the next one (or now, with ``flush``).

        ``copy=False`` sends buffers (bytes, memoryview, numpy arrays) without
        copying them; the caller must not modify them until they are sent.
        """
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket is closed")
        self._outbox.append(frames if copy else _NoCopy(frames))
        if not self._scheduled and not self._draining:  # (a batch being handled flushes at its end)
            self._schedule()

    def flush(self) -> None:
        """Hand what is queued to libzmq now (what the socket cannot take yet stays queued)."""
        if self._outbox and not self._closed:
            self._flush()
            if self._outbox:
                self._schedule_flush()

    @property
    def pending_sends(self) -> int:
        """Messages waiting locally for the socket to become writable."""
        return len(self._outbox)

    def close(self, linger: int = 0) -> None:
        """Stop watching the socket and close it."""
        if self._closed:
            return
        if self._outbox:
            try:
                self._flush()  # what was sent before close goes out (a BYE, a last answer)
            except zmq.ZMQError:
                pass
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._outbox.clear()
        self.sock.close(linger=linger)
