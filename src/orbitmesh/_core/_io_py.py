"""Socket I/O for the client and agent loops, pure-Python reference (pyzmq's own calls).

``_io_c.pyx`` does the same with libzmq directly, without pyzmq's per-frame Python layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

public_api = ["recv_batch", "send_parts"]


def send_parts(sock: zmq.Socket[Any], parts: Sequence[Any]) -> bool:
    """Send bytes-like ``parts`` as one message without blocking, copying them.

    Returns False (nothing sent) if the socket cannot take it now; raises
    zmq.ZMQError for anything else.
    """
    try:
        sock.send_multipart(parts, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def recv_batch(sock: zmq.Socket[Any], limit: int) -> list[list[bytes]]:
    """Up to ``limit`` whole messages waiting on ``sock``, each a list of bytes; [] if none."""
    out: list[list[bytes]] = []
    recv = sock.recv_multipart
    for _ in range(limit):
        try:
            out.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            break
    return out
