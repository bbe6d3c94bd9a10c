"""The compiled libzmq binding drives pyzmq's own sockets from C, without the GIL."""

from __future__ import annotations

import errno
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from orbitmesh._core import _libzmq

TIMEOUT_MS = 5000  # a broken binding fails with EAGAIN instead of hanging the suite
FRAMES = [b"header", b"", b"\x00" * 100_000, bytes(range(256))]


class Sockets:
    """Makes PAIR sockets on one pyzmq context and closes them all at teardown."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.made: list[zmq.Socket[Any]] = []

    def socket(self) -> zmq.Socket[Any]:
        s: zmq.Socket[Any] = self.ctx.socket(zmq.PAIR)
        s.rcvtimeo = s.sndtimeo = TIMEOUT_MS
        self.made.append(s)
        return s

    def pair(self, transport: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """Two connected PAIR sockets, over inproc or tcp on 127.0.0.1."""
        a, b = self.socket(), self.socket()
        if transport == "inproc":
            endpoint = f"inproc://om-libzmq-{uuid.uuid4().hex}"
            a.bind(endpoint)
        else:
            endpoint = f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}"
        b.connect(endpoint)
        return a, b

    def close(self) -> None:
        for s in self.made:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


def test_binds_the_libzmq_pyzmq_loaded() -> None:
    # Given the binding imported (it refuses to import on a mismatch)
    # Expect the version it resolved to be pyzmq's, and recent enough
    assert _libzmq.libzmq_version() == zmq.zmq_version_info()
    assert _libzmq.libzmq_version() >= (4, 1, 0)


def test_compiled_binding_is_compiled() -> None:
    # Given the binding module
    # Expect an extension module
    assert _libzmq.__file__ is not None and _libzmq.__file__.endswith(".so")


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_multipart_round_trip_through_pyzmq_sockets(sockets: Sockets, transport: str) -> None:
    # Given two connected pyzmq sockets
    a, b = sockets.pair(transport)
    # When frames are sent with zmq_msg_send on one and received with zmq_msg_recv on the other
    received = _libzmq._selftest_roundtrip(a, b, FRAMES)
    # Expect the same frames, in order, both ways
    assert received == FRAMES
    assert _libzmq._selftest_roundtrip(b, a, [b"back"]) == [b"back"]


def test_interoperates_with_pyzmq_calls(sockets: Sockets) -> None:
    # Given a pyzmq socket that already sent and received through pyzmq
    a, b = sockets.pair("inproc")
    a.send_multipart([b"py", b"zmq"])
    assert b.recv_multipart() == [b"py", b"zmq"]
    # When the binding uses the same sockets
    # Expect it to share their state: a message pyzmq sends is seen in order after
    assert _libzmq._selftest_roundtrip(a, b, [b"c"]) == [b"c"]
    b.send(b"after")
    assert a.recv() == b"after"


def test_blocking_receive_releases_the_gil(sockets: Sockets) -> None:
    # Given a receiver whose message will be sent by Python code in the main thread
    sender, sink = sockets.pair("inproc")
    receiver, peer = sockets.pair("inproc")
    outcome: list[Any] = []

    def worker() -> None:
        try:
            outcome.append(_libzmq._selftest_roundtrip(sender, receiver, [b"x"]))
        except Exception as exc:  # reported by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    # When the worker is blocked in zmq_msg_recv and the main thread then runs Python and sends
    thread.start()
    assert sink.recv() == b"x"
    time.sleep(0.2)
    peer.send_multipart([b"from", b"python"])
    thread.join(TIMEOUT_MS / 1000 + 5)
    # Expect the worker to get it (holding the GIL, it would time out with EAGAIN instead)
    assert outcome == [[b"from", b"python"]]


class Interrupted(Exception):
    pass


def test_signal_during_blocking_receive_is_handled(sockets: Sockets) -> None:
    # Given a receive that will block, and a signal handler that raises
    sender, _sink = sockets.pair("inproc")
    receiver, _silent = sockets.pair("inproc")

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1))
    try:
        # When the signal arrives during zmq_msg_recv (EINTR)
        timer.start()
        # Expect the handler's exception, promptly, instead of EAGAIN after the timeout
        with pytest.raises(Interrupted):
            _libzmq._selftest_roundtrip(sender, receiver, [b"x"])
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_libzmq_error_is_raised_as_zmq_error(sockets: Sockets) -> None:
    # Given a PAIR socket with no peer and a short send timeout
    lonely, receiver = sockets.socket(), sockets.socket()
    lonely.sndtimeo = 50
    lonely.bind(f"inproc://om-lonely-{uuid.uuid4().hex}")
    # When the binding sends on it
    # Expect pyzmq's ZMQError with libzmq's errno
    with pytest.raises(zmq.Again) as info:
        _libzmq._selftest_roundtrip(lonely, receiver, [b"x"])
    assert info.value.errno == errno.EAGAIN


def test_closed_or_foreign_socket_is_refused(sockets: Sockets) -> None:
    # Given a closed pyzmq socket and an object that is not a socket
    a, b = sockets.pair("inproc")
    a.close()
    # Expect ENOTSOCK for the closed one (as pyzmq says), TypeError for the other; nothing is touched
    with pytest.raises(zmq.ZMQError) as info:
        _libzmq._selftest_roundtrip(a, b, [b"x"])
    assert info.value.errno == errno.ENOTSOCK
    with pytest.raises(TypeError):
        _libzmq._selftest_roundtrip(object(), b, [b"x"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one frame"):
        _libzmq._selftest_roundtrip(b, b, [])
