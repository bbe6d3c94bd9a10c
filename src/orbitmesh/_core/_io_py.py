"""Socket I/O for the client and agent loops, pure-Python reference (pyzmq's own calls).

``_io_c.pyx`` does the same with libzmq directly, without pyzmq's per-frame Python layer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from ..errors import ProtocolError
from ._frame_py import pack_parts, unpack_parts

public_api = ["BATCH_BYTES", "recv_batch", "send_parts", "send_queue"]

BATCH_BYTES = 1 << 20  # a receive batch ends once it holds this many bytes


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
