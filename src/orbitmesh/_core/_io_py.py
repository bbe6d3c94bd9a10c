"""Socket I/O for the client and agent loops, pure-Python reference (pyzmq's own calls).

``_io_c.pyx`` does the same with libzmq directly, without pyzmq's per-frame Python layer.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from ..errors import ProtocolError
from ._frame_py import pack_parts, unpack_parts

public_api = [
    "BATCH_BYTES",
    "Outbox",
    "pack_messages",
    "pack_runs",
    "recv_batch",
    "send_parts",
    "send_queue",
    "unpack_messages",
]

BATCH_BYTES = 1 << 20  # a receive batch ends once it holds this many bytes
_LEN = struct.Struct("<I")
_COUNT = struct.Struct("<H")


class Outbox:
    """The control plane's messages for its data plane, queued in one turn of the loop (the
    broker sends them down as one ``OP_PACKED`` at the turn's end, ``take``).

    ``schedule`` is called when the turn's first message is queued (the broker's: its flush, on
    the next turn of the loop). While ``closed`` (no data plane), messages are dropped."""

    __slots__ = ("_op_send", "_out", "_schedule", "closed")

    def __init__(self, op_send: bytes, schedule: Callable[[], object]) -> None:
        self._op_send = op_send
        self._schedule = schedule
        self._out: list[list[Any]] = []
        self.closed = True

    def ctl(self, frames: list[Any]) -> None:
        """Queue an op for the data plane: ``[op, ...]``."""
        if self.closed:
            return
        out = self._out
        out.append(frames)
        if len(out) == 1:
            self._schedule()

    def send(self, rid: bytes, frames: list[Any]) -> None:
        """Queue a message to the peer ``rid`` (an ``OP_SEND``)."""
        self.ctl([self._op_send, rid, *frames])

    def take(self) -> list[list[Any]]:
        """What was queued since the last take, in order; the outbox is empty after."""
        out = self._out
        self._out = []
        return out


def pack_messages(messages: Sequence[Sequence[Any]]) -> bytes:
    """Several messages as the bytes of one frame: for each, its part count (u16 LE), then each
    part as its length (u32 LE) and its bytes (bytes-like parts). The broker's control plane
    sends its data plane one such frame per turn of its loop (OP_PACKED) instead of every part
    as a frame of its own. ValueError for a message with no part or more than 65,535."""
    out = bytearray()
    for parts in messages:
        if not 0 < len(parts) <= 0xFFFF:
            raise ValueError(f"a packed message has 1 to 65535 parts, not {len(parts)}")
        out += _COUNT.pack(len(parts))
        for part in parts:
            view = memoryview(part).cast("B")
            out += _LEN.pack(len(view))
            out += view
    return bytes(out)


def pack_runs(messages: list[Sequence[Any]], limit: int) -> list[bytes | Sequence[Any]]:
    """``messages`` in order, as what to send: each run of messages of at most ``limit`` bytes
    (their parts' bytes added up) as the bytes ``pack_messages`` makes of it, and each bigger
    message as it is (its parts then go as frames of their own, copied once fewer)."""
    out: list[bytes | Sequence[Any]] = []
    run: list[Sequence[Any]] = []
    for parts in messages:
        if sum(memoryview(part).nbytes for part in parts) > limit:
            if run:
                out.append(pack_messages(run))
                run = []
            out.append(parts)
        else:
            run.append(parts)
    if run:
        out.append(pack_messages(run))
    return out


def unpack_messages(packed: bytes) -> list[list[bytes]]:
    """The messages ``pack_messages`` packed into ``packed``, up to the first that does not add
    up (a part count of 0, or parts past the end)."""
    out: list[list[bytes]] = []
    at, n = 0, len(packed)
    while at + 2 <= n:
        (count,) = _COUNT.unpack_from(packed, at)
        at += 2
        if not count:
            break
        parts = []
        for _ in range(count):
            if at + 4 > n:
                return out
            (size,) = _LEN.unpack_from(packed, at)
            if at + 4 + size > n:
                return out
            parts.append(packed[at + 4 : at + 4 + size])
            at += 4 + size
        out.append(parts)
    return out


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any], packed: bool = False) -> bool:
    """Send bytes-like ``parts`` as one message without blocking, copying them; ``packed``: in
    packed framing (protocol 2, see ``_frame_py.pack_parts``), ``parts[0]`` being its header.

    Returns False (nothing sent) if the socket cannot take it now; raises
    zmq.ZMQError for anything else.
    """
    if not parts:
        raise ValueError("a message needs at least one part")
    if packed:
        parts = pack_parts(list(parts))
    try:
        sock.send_multipart(parts, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def send_queue(sock: zmq.Socket[Any], out: deque[Any], packed: bool = False) -> bool:
    """Send the messages at the front of the deque ``out`` as ``send_parts`` does, popping
    each once sent, up to the first that is not a list or tuple (left for the caller).

    Returns True if it stopped because the socket cannot take more now, else False (``out``
    is empty, or starts with such a message). Raises zmq.ZMQError as ``send_parts``.
    """
    while out:
        parts = out[0]
        if type(parts) is not list and type(parts) is not tuple:
            return False
        if not send_parts(sock, parts, packed):
            return True
        out.popleft()
    return False


def recv_batch(sock: zmq.Socket[Any], limit: int) -> list[list[bytes]]:
    """Up to ``limit`` whole messages waiting on ``sock``, each a list of bytes; [] if none. A
    message in packed framing comes back unpacked; one whose packing does not add up, as it came.

    A batch also ends once it holds ``BATCH_BYTES``: hundreds of large frames alive at once
    make glibc hand their memory back to the system and fault it in again for the next batch
    (measured: 1 MiB frames cost 4x the CPU in batches of 256 than one at a time).
    """
    out: list[list[bytes]] = []
    recv = sock.recv_multipart
    size = 0
    for _ in range(limit):
        try:
            msg = recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        size += sum(len(f) for f in msg)
        try:
            msg = unpack_parts(msg)
        except ProtocolError:
            pass  # the header check above this layer refuses it
        out.append(msg)
        if size >= BATCH_BYTES:
            break
    return out
