"""The agent's request dispatcher (``_core/_serve_*``): both twins, alone and against each other.

The agent itself is the host in the mesh tests (tests/mesh.py runs each twin there); here a
small host records what the dispatcher leaves to it, so every path can be checked exactly.
"""

from __future__ import annotations

import asyncio
import struct
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitmesh import _core
from orbitmesh.protocol import F_STREAM, F_TRACKED, Kind
from orbitmesh.serializers import JsonSerializer, SerializerSet

HDR = struct.Struct("<2sBBHHIIQQQ")
JSON_ID = JsonSerializer.id


def request(
    corr: int, command: bytes, body: bytes | None = b"\x91\x05", *, flags: int = 0, job: int = 0, lease: int = 0
) -> list[bytes]:
    frames = [HDR.pack(b"OM", 1, Kind.REQUEST, flags, 0, lease, 0, corr, job, 0), b"tok%d" % corr, command]
    return frames if body is None else [*frames, body]


class Conn:
    def __init__(self) -> None:
        self.ready = True
        self.sent: list[list[bytes]] = []

    def sock_send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)


class Host:
    """Records the slow paths the dispatcher hands back."""

    def __init__(self) -> None:
        self._conn: Conn | None = Conn()
        self.calls: list[tuple[Any, ...]] = []
        self._jobs_running: dict[int, list[Any]] = {}  # the agent's job bookkeeping
        self._jobs_done: OrderedDict[int, list[Any]] = OrderedDict()
        self.remember_jobs = 3

    def _reply(self, result: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Any) -> None:
        self.calls.append(("reply", type(result).__name__, token, corr, job, sflags, serializer.name))

    def _reply_error(self, exc: BaseException, token: bytes, corr: int, job: int) -> None:
        self.calls.append(("error", type(exc).__name__, str(exc), token, corr, job))

    def _run_eagerly(
        self, aw: Any, token: bytes, corr: int, job: int, sflags: int, serializer: Any, *started: Any
    ) -> None:
        self.calls.append(("later", type(aw).__name__, token, corr, job, sflags, serializer.name, started))
        if asyncio.iscoroutine(aw):
            aw.close()


class Later:
    def __await__(self) -> Any:
        return (yield None)


async def add(a: int, b: int = 1) -> int:
    return a + b


async def kw(**kw: Any) -> Any:
    return sorted(kw.items())


async def boom(*_: Any) -> None:
    raise ValueError("no")


async def waits(*_: Any) -> None:
    await asyncio.sleep(0)


async def unencodable(*_: Any) -> Any:
    return object()


def echo(*args: Any) -> Any:
    return list(args)


def other(*_: Any) -> Any:
    return Later()


def setup(impl: str) -> tuple[Any, Host]:
    host = Host()
    d = _core.load("_serve", impl).Dispatcher(host, SerializerSet())
    for name, fn in (
        ("add", add),
        ("kw", kw),
        ("boom", boom),
        ("waits", waits),
        ("bad", unencodable),
        ("later", other),
    ):
        d.add(name.encode(), fn, False)  # coroutine functions (and one returning another awaitable)
    d.add(b"echo", echo, True)
    return d, host


def serve(d: Any, batch: list[list[bytes]], start: int = 0) -> list[int]:
    """Serve ``batch`` as the agent's socket does; return the indexes left to the agent."""
    left, i = [], start
    while i < len(batch):
        i = d.serve(batch, i)
        if i < len(batch):
            left.append(i)
            i += 1
    return left


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_plain_requests_are_answered_from_the_batch(impl: str) -> None:
    d, host = setup(impl)
    assert host._conn is not None
    batch = [
        request(1, b"add"),
        request(2, b"echo", b"\x92\x01\xa1x"),
        request(3, b"kw", b"\x81\xa1k\x02"),
        request(4, b"add", None),  # no params: add() misses its argument
        request(5, b"echo", b'["j"]', flags=JSON_ID << 8),
    ]
    assert serve(d, batch) == []
    sent = host._conn.sent
    assert [HDR.unpack(f[0]) for f in sent] == [
        (b"OM", 1, Kind.REPLY, 0, 0, 0, 0, 1, 0, 0),
        (b"OM", 1, Kind.REPLY, 0, 0, 0, 0, 2, 0, 0),
        (b"OM", 1, Kind.REPLY, 0, 0, 0, 0, 3, 0, 0),
        (b"OM", 1, Kind.REPLY, JSON_ID << 8, 0, 0, 0, 5, 0, 0),
    ]
    assert [f[1:] for f in sent] == [
        [b"tok1", b"\x06"],
        [b"tok2", b"\x92\x01\xa1x"],
        [b"tok3", b"\x91\x92\xa1k\x02"],
        [b"tok5", b'["j"]'],
    ]
    assert host.calls == [("error", "TypeError", host.calls[0][2], b"tok4", 4, 0)]
    assert "missing 1 required positional argument" in host.calls[0][2]
    assert (d.inflight, d.served) == (0, 5)


def test_what_does_not_finish_at_once_goes_to_the_agent(impl: str) -> None:
    d, host = setup(impl)
    assert serve(d, [request(1, b"waits"), request(2, b"later"), request(3, b"bad"), request(4, b"boom")]) == []
    assert host.calls == [
        ("later", "coroutine", b"tok1", 1, 0, 0, "msgpack", (None,)),  # started: waiting on what it yielded
        ("later", "Later", b"tok2", 2, 0, 0, "msgpack", ()),
        ("reply", "object", b"tok3", 3, 0, 0, "msgpack"),  # says why it does not encode
        ("error", "ValueError", "no", b"tok4", 4, 0),
    ]
    assert (d.inflight, d.served) == (2, 2)  # the two handed on are still running
    assert host._conn is not None and host._conn.sent == []


def test_other_messages_stop_the_batch_in_order(impl: str) -> None:
    d, host = setup(impl)
    bad = request(9, b"add")
    bad[0] = bad[0][:12] + b"\x01" + bad[0][13:]
    batch = [
        request(1, b"add"),
        [HDR.pack(b"OM", 1, Kind.CANCEL, 0, 0, 0, 0, 1, 0, 0), b"tok1"],
        request(2, b"add", flags=F_TRACKED, job=7),
        request(3, b"add", job=7),
        request(4, b"add", flags=F_STREAM),
        request(5, b"nope"),
        request(6, b"add", b"\xc1"),  # params do not decode
        request(7, b"add", flags=9 << 8),  # a serializer this agent lacks
        [*request(8, b"add"), b"options"],
        bad,
        request(10, b"add"),
    ]
    assert serve(d, batch) == [1, *range(3, 10)]  # a tracked job is served: the next test
    assert host._conn is not None and [HDR.unpack(f[0])[7] for f in host._conn.sent] == [1, 2, 10]
    # Not registered: everything goes to the agent (which drops it)
    host._conn.ready = False
    assert d.serve([request(11, b"add")], 0) == 0
    host._conn = None
    assert d.serve([request(12, b"add")], 0) == 0


def test_a_tracked_jobs_first_delivery_is_served_with_the_agents_bookkeeping(impl: str) -> None:
    d, host = setup(impl)
    conn = host._conn
    assert conn is not None
    tracked = F_TRACKED | JSON_ID << 8
    batch = [
        request(1, b"echo", b"[1]", flags=tracked, job=41, lease=7),
        request(2, b"add", flags=F_TRACKED, job=42, lease=1),
        request(3, b"waits", flags=F_TRACKED, job=43, lease=2),  # suspends: the agent ends it
        request(4, b"boom", flags=F_TRACKED, job=44, lease=3),  # raises: the agent answers
        request(5, b"add", flags=F_TRACKED, job=0),  # tracked without a job id: the agent's
    ]
    assert serve(d, batch) == [4]
    # Expect each answer as the agent's _answer makes it: the job, its lease, its serializer
    assert [HDR.unpack(f[0]) for f in conn.sent] == [
        (b"OM", 1, Kind.REPLY, JSON_ID << 8, 0, 7, 0, 1, 41, 0),
        (b"OM", 1, Kind.REPLY, 0, 0, 1, 0, 2, 42, 0),
    ]
    assert [f[1:] for f in conn.sent] == [[b"tok1", b"[1]"], [b"tok2", b"\x06"]]
    assert host.calls == [
        ("later", "coroutine", b"tok3", 3, 43, 0, "msgpack", (None,)),
        ("error", "ValueError", "no", b"tok4", 4, 44),
    ]
    # Expect the answered jobs remembered and the others held as running, for a redelivery
    assert host._jobs_done == {41: conn.sent[0], 42: conn.sent[1]}
    assert host._jobs_running == {43: [b"tok3", 3, 2], 44: [b"tok4", 4, 3]}
    # A redelivery of any of them is the agent's (it answers again, or points the run at it)
    again = [request(6 + i, b"add", flags=F_TRACKED, job=job, lease=9) for i, job in enumerate((41, 43))]
    assert serve(d, again) == [0, 1]
    # Expect at most remember_jobs answers kept, the oldest dropped first
    serve(d, [request(10 + i, b"add", flags=F_TRACKED, job=50 + i) for i in range(2)])
    assert list(host._jobs_done) == [42, 50, 51]
    assert (d.inflight, d.served) == (1, 5)


def test_idle_resolves_when_the_last_request_ends(impl: str) -> None:
    loop = asyncio.new_event_loop()
    try:
        d, _ = setup(impl)
        d.begin()
        d.begin()
        d.idle = loop.create_future()
        d.end()
        assert not d.idle.done()
        d.end()
        assert d.idle.done() and (d.inflight, d.served) == (0, 2)
    finally:
        loop.close()


@pytest.mark.parametrize(
    "params, expected",
    [
        (None, ((), {})),
        ({"a": 1}, ((), {"a": 1})),
        ({1: "a"}, (({1: "a"},), {})),
        ({"a": 1, 2: 3}, (({"a": 1, 2: 3},), {})),
        ([1, 2], ((1, 2), {})),
        ((1,), ((1,), {})),
        ("s", (("s",), {})),
        (b"b", ((b"b",), {})),
    ],
)
def test_call_args(impl: str, params: Any, expected: Any) -> None:
    assert _core.load("_serve", impl).call_args(params) == expected


_msg = st.tuples(
    st.sampled_from([b"add", b"echo", b"kw", b"boom", b"waits", b"bad", b"later", b"nope"]),
    st.sampled_from([None, b"", b"\x05", b"\x92\x01\x02", b"\x81\xa1a\x01", b"\xc1", b"[1]"]),
    st.sampled_from([0, JSON_ID << 8, 9 << 8, F_TRACKED, F_STREAM]),
    st.sampled_from([0, 0, 0, 3]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_msg, max_size=12), st.integers(0, 3))
def test_the_twins_agree_on_any_batch(msgs: list[tuple[Any, ...]], start: int) -> None:
    seen = {}
    for impl in ("c", "py"):
        d, host = setup(impl)
        batch = [request(i + 1, cmd, body, flags=flags, job=job) for i, (cmd, body, flags, job) in enumerate(msgs)]
        assert host._conn is not None
        seen[impl] = (serve(d, batch, start), host._conn.sent, host.calls, d.inflight, d.served)
    assert seen["c"] == seen["py"]
