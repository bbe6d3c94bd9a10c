"""The client's call table and the agent's request dispatcher, compiled vs pure Python: what
one pipelined window of calls costs each side, sockets left out."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from orbitmesh.protocol import Kind
from orbitmesh.serializers import MsgpackSerializer, SerializerSet

pytestmark = pytest.mark.benchmark(group="calls")

WINDOW = 1000
HDR = struct.Struct("<2sBBHHIIQQQ")
BODY = b"\xc4\x40" + b"x" * 64  # msgpack of 64 bytes, as the bench's invoke sends


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_client_window(benchmark: Any, calls_impl: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    """A window of calls: each opened and sent (``request``), then all their replies settled."""
    table = calls_impl.CallTable()
    s = MsgpackSerializer()
    sent: list[list[bytes]] = []
    request = table.request

    def window() -> list[asyncio.Future[Any]]:
        sent.clear()
        futs = [
            request(sent.append, loop.create_future(), s, Kind.REQUEST, 0, 0, 30.0, 30.0, b"r", b"c", BODY).fut
            for _ in range(WINDOW)
        ]
        replies = [[HDR.pack(b"OM", 1, Kind.REPLY, 0, 0, 0, 0, HDR.unpack(f[0])[7], 0, 0), b"t", f[3]] for f in sent]
        assert table.settle(replies, 0) == WINDOW
        return futs

    futs = benchmark(window)
    # Expect every call resolved with its payload, and nothing left pending
    assert all(f.result() == b"x" * 64 for f in futs) and not table.pending


class _Conn:
    ready = True

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.sock_send = self.sent.append


class _Host:
    def __init__(self) -> None:
        self._conn = _Conn()

    def _reply(self, *args: Any) -> None:
        raise AssertionError("every result encodes")

    def _reply_error(self, exc: BaseException, *args: Any) -> None:
        raise AssertionError(f"no handler raises: {exc!r}")

    def _run_eagerly(self, *args: Any) -> None:
        raise AssertionError("no handler suspends")


def test_agent_window(benchmark: Any, serve_impl: ModuleType) -> None:
    """A window of plain requests to an async echo handler, served from one batch."""
    host = _Host()
    d = serve_impl.Dispatcher(host, SerializerSet())

    async def echo(value: Any) -> Any:
        return value

    d.add(b"echo", echo, False)
    batch = [[HDR.pack(b"OM", 1, Kind.REQUEST, 0, 0, 0, 0, i + 1, 0, 0), b"tok", b"echo", BODY] for i in range(WINDOW)]

    def window() -> int:
        host._conn.sent.clear()
        n: int = d.serve(batch, 0)
        return n

    assert benchmark(window) == WINDOW
    # Expect one reply per request, each carrying its corr and the payload back
    sent = host._conn.sent
    assert len(sent) == WINDOW and HDR.unpack(sent[-1][0])[7] == WINDOW and sent[-1][2] == BODY
    assert d.inflight == 0
