"""The client's call table (``_core/_calls_*``): both twins, alone and against each other."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitmesh import _core
from orbitmesh.errors import ErrorCode, SerializationError
from orbitmesh.protocol import F_RAW_REPLY, F_TRACKED, Kind
from orbitmesh.serializers import JsonSerializer, MsgpackSerializer, RawSerializer

HDR = struct.Struct("<2sBBHHIIQQQ")
_REQ = Kind.REQUEST
MSGPACK, JSON, RAW = MsgpackSerializer(), JsonSerializer(), RawSerializer()


def reply(
    corr: int, body: bytes = b"\xa2ok", *, sid: int = 0, flags: int = 0, kind: int = Kind.REPLY, job: int = 0
) -> list[bytes]:
    return [HDR.pack(b"OM", 1, kind, (sid << 8) | flags, 0, 0, 0, corr, job, 0), b"token", body]


class Broken:
    """A serializer plugin whose loads raises its own error type."""

    id = 9
    name = "broken"

    def dumps(self, obj: Any) -> bytes:
        return b"x"

    def loads(self, data: bytes) -> Any:
        raise KeyError("nope")


def settle(table: Any, batch: list[list[bytes]]) -> list[list[bytes]]:
    """Settle ``batch`` as the client's socket does; return the messages left to the client."""
    left, i = [], 0
    while i < len(batch):
        i = table.settle(batch, i)
        if i < len(batch):
            left.append(batch[i])
            i += 1
    return left


@pytest.fixture(params=["c", "py"])
def calls(request: pytest.FixtureRequest) -> Any:
    return _core.load("_calls", request.param)


def test_corrs_rise_and_each_call_has_its_entry(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        ps = [t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 5.0) for _ in range(3)]
        assert [p.corr for p in ps] == [1, 2, 3] and t.corr == 3
        assert t.pending == {1: ps[0], 2: ps[1], 3: ps[2]}
        assert ps[0].kind == Kind.REQUEST and ps[0].serializer is MSGPACK and ps[0].token == b"" and ps[0].agent == ""
        assert ps[0].accepted is None and ps[0].items is None and ps[0].waiter is None
        # A call without a deadline holds none
        t.open(loop.create_future(), MSGPACK, Kind.REQUEST)
        assert t.deadlines == 3
        assert [p.corr for p in t.take_all()] == [1, 2, 3, 4]
        assert t.pending == {} and t.deadlines == 0 and t.next_deadline() == float("inf")
        assert t.open(loop.create_future(), MSGPACK, Kind.REQUEST).corr == 5  # corrs never go back
        # A NaN deadline would never come due, and hold back every one behind it
        with pytest.raises(ValueError, match="NaN"):
            t.open(loop.create_future(), MSGPACK, Kind.REQUEST, float("nan"))
        assert t.corr == 5 and t.deadlines == 0
    finally:
        loop.close()


def test_deadlines_come_due_in_order_and_only_for_calls_still_pending(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        for at in (3.0, 1.0, 2.0, 1.0, 5.0):
            t.open(loop.create_future(), MSGPACK, Kind.REQUEST, at)
        assert t.next_deadline() == 1.0
        del t.pending[4]  # ended meanwhile
        assert t.due(0.5) == []
        assert t.due(2.0) == [2, 3]  # (deadline, corr) order; corr 4 ended
        assert t.pending.keys() == {1, 2, 3, 5}  # due() leaves ending them to the caller
        assert t.next_deadline() == 3.0
        assert t.due(10.0) == [1, 5]
        assert t.deadlines == 0
        # Calls that share a deadline come due in the order they were made
        ats = [float(i % 3) for i in range(40)]
        made = [t.open(loop.create_future(), MSGPACK, Kind.REQUEST, at).corr for at in ats]
        assert t.due(10.0) == [corr for _, corr in sorted(zip(ats, made, strict=True))]
    finally:
        loop.close()


def test_the_deadlines_of_ended_calls_are_dropped_in_bulk(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        slow = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 1.0)
        for i in range(5000):
            p = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 100.0 + i)
            del t.pending[p.corr]  # answered at once
        # Bounded by the calls in flight (1) times two, plus the slack of 1,024
        assert t.deadlines <= 2 * 1 + 1024 + 1
        assert t.due(1.0) == [slow.corr]
    finally:
        loop.close()


def test_request_opens_a_call_and_sends_it_or_never_makes_it(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        sent: list[list[bytes]] = []
        before = time.time_ns() // 1_000_000
        p = t.request(sent.append, loop.create_future(), JSON, Kind.REQUEST, F_TRACKED, 7, 5.0, 2.5, b"r", b"c", b"b")
        after = time.time_ns() // 1_000_000
        q = t.request(
            sent.append, loop.create_future(), MSGPACK, Kind.REQUEST, 0, 0, float("inf"), 1.0, b"r", b"c", b"", b"o"
        )
        assert [p.corr, q.corr] == [1, 2] and t.pending == {1: p, 2: q} and t.deadlines == 1
        hdr = HDR.unpack(sent[0][0])
        assert hdr[:9] == (b"OM", 1, Kind.REQUEST, (JSON.id << 8) | F_TRACKED, 0, 7, 0, 1, 0)
        assert before + 2500 <= hdr[9] <= after + 2500  # the wall clock deadline, in ms
        assert sent[0][1:] == [b"r", b"c", b"b"] and sent[1][1:] == [b"r", b"c", b"", b"o"]
        assert p.serializer is JSON and p.kind == Kind.REQUEST
        # An infinite timeout sends no deadline (0), and holds none
        t.request(
            sent.append, loop.create_future(), MSGPACK, Kind.REQUEST, 0, 0, float("inf"), float("inf"), b"r", b"c", b""
        )
        assert HDR.unpack(sent[2][0])[9] == 0 and t.deadlines == 1

        def refuse(frames: list[bytes]) -> None:
            raise OSError("gone")

        with pytest.raises(OSError):
            t.request(refuse, loop.create_future(), MSGPACK, Kind.REQUEST, 0, 0, 9.0, 1.0, b"r", b"c", b"")
        assert t.pending.keys() == {1, 2, 3}  # never made
    finally:
        loop.close()


def test_settle_resolves_plain_replies_and_returns_the_rest_in_order(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        plain = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        empty = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        raw_empty = t.open(loop.create_future(), RAW, Kind.REQUEST, 9.0)
        job = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        job.accepted = loop.create_future()
        query = t.open(loop.create_future(), MSGPACK, Kind.QUERY, 9.0)
        other_ser = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        raw_reply = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        cancelled = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        cancelled.fut.cancel()
        bad_header = reply(plain.corr)
        bad_header[0] = bad_header[0][:12] + b"\x01" + bad_header[0][13:]  # reserved bytes set
        batch = [
            bad_header,
            reply(plain.corr, b"\x2a"),
            reply(empty.corr, b""),
            reply(raw_empty.corr, b"", sid=RAW.id),
            reply(job.corr),
            reply(query.corr),
            reply(other_ser.corr, b"[1]", sid=JSON.id),
            reply(raw_reply.corr, flags=F_RAW_REPLY),
            reply(cancelled.corr),
            reply(999),  # nobody waits for it
            reply(plain.corr, kind=Kind.ERROR),
            [b"short"],
        ]
        rest = settle(t, batch)
        assert rest == [batch[0], *batch[5:8], batch[9], batch[10], batch[11]]
        assert plain.fut.result() == 42 and empty.fut.result() is None and raw_empty.fut.result() == b""
        assert job.fut.result() == "ok"  # a job's outcome too (the next test)
        assert t.pending.keys() == {query.corr, other_ser.corr, raw_reply.corr}
        assert not query.fut.done()
    finally:
        loop.close()


def accepted(corr: int, job: int) -> list[bytes]:
    return [HDR.pack(b"OM", 1, Kind.ACCEPTED, 0, 0, 0, 0, corr, job, 0), b""]


def test_settle_resolves_a_jobs_accepted_and_its_outcome(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        job = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        job.accepted = loop.create_future()
        job.waiter = loop.create_future()  # a Job.result() waiting
        garbled = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        garbled.accepted = loop.create_future()
        plain = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        batch = [
            accepted(job.corr, 77),
            accepted(job.corr, 78),  # a second one changes nothing
            accepted(plain.corr, 5),  # not a job: the client's
            accepted(999, 5),  # nobody waits for it: the client's
            accepted(garbled.corr, 79),
            reply(garbled.corr, b"\xc1"),
            reply(job.corr, b"\x07"),
        ]
        assert settle(t, batch) == [batch[2], batch[3]]
        # Expect ACCEPTED to give the job id, and the outcome to wake Job.result() and end the call
        assert job.accepted.result() == 77 and job.waiter.done() and job.fut.result() == 7
        assert garbled.accepted.result() == 79
        assert not garbled.fut._log_traceback  # a job's failure is not "never retrieved": nobody may ask
        exc = garbled.fut.exception()
        assert isinstance(exc, SerializationError) and exc.code == ErrorCode.BAD_PAYLOAD
        assert t.pending.keys() == {plain.corr}
    finally:
        loop.close()


def test_a_reply_that_does_not_decode_fails_its_call_with_bad_payload(calls: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        t = calls.CallTable()
        garbled = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        plugin = t.open(loop.create_future(), Broken(), Kind.REQUEST, 9.0)
        after = t.open(loop.create_future(), MSGPACK, Kind.REQUEST, 9.0)
        rest = settle(t, [reply(garbled.corr, b"\xc1"), reply(plugin.corr, sid=Broken.id), reply(after.corr, b"\x07")])
        assert rest == []
        for p in (garbled, plugin):
            exc = p.fut.exception()
            assert isinstance(exc, SerializationError) and exc.code == ErrorCode.BAD_PAYLOAD, exc
        assert "broken" in str(plugin.fut.exception()) and "KeyError" in str(plugin.fut.exception())
        assert after.fut.result() == 7  # the rest of the batch is settled all the same
    finally:
        loop.close()


# --- the twins side by side: one random history, the same outcome --------------------------

_op = st.one_of(
    st.tuples(
        st.just("open"),
        st.sampled_from([Kind.REQUEST, Kind.QUERY, "job"]),
        st.one_of(st.none(), st.integers(0, 50)),
    ),
    st.tuples(st.just("due"), st.integers(0, 60)),
    st.tuples(st.just("end"), st.integers(1, 40)),
    st.tuples(
        st.just("settle"),
        st.lists(
            st.tuples(
                st.integers(0, 40),
                st.sampled_from([0, 1, 2]),
                st.booleans(),
                st.sampled_from([b"", b"\x01", b"\xc1"]),
                st.sampled_from([Kind.REPLY, Kind.REPLY, Kind.ACCEPTED]),
            ),
            max_size=6,
        ),
    ),
    st.tuples(st.just("take_all")),
)


def _outcome(fut: asyncio.Future[Any]) -> Any:
    if not fut.done():
        return "pending"
    exc = fut.exception()
    return ("error", type(exc).__name__, getattr(exc, "code", None)) if exc else ("ok", fut.result())


@settings(max_examples=150, deadline=None)
@given(st.lists(_op, max_size=40))
def test_the_twins_agree_on_any_history(ops: list[tuple[Any, ...]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        tables = {impl: _core.load("_calls", impl).CallTable() for impl in ("c", "py")}
        futs: dict[str, list[asyncio.Future[Any]]] = {"c": [], "py": []}
        sers = [MSGPACK, JSON, RAW]
        for op in ops:
            seen = {}
            for impl, t in tables.items():
                if op[0] == "open":
                    at = float("inf") if op[2] is None else float(op[2])
                    p = t.open(loop.create_future(), sers[len(futs[impl]) % 3], _REQ if op[1] == "job" else op[1], at)
                    futs[impl].append(p.fut)
                    if op[1] == "job":
                        p.accepted = loop.create_future()
                        futs[impl].append(p.accepted)
                    seen[impl] = p.corr
                elif op[0] == "due":
                    seen[impl] = t.due(float(op[1]))
                elif op[0] == "end":
                    seen[impl] = t.pending.pop(op[1], None) is not None
                elif op[0] == "settle":
                    batch = [
                        reply(corr, body, sid=sid, flags=F_RAW_REPLY if raw else 0, kind=kind, job=corr + 100)
                        for corr, sid, raw, body, kind in op[1]
                    ]
                    seen[impl] = [HDR.unpack(m[0])[7] for m in settle(t, batch)]
                else:
                    seen[impl] = [p.corr for p in t.take_all()]
                seen[impl] = (seen[impl], sorted(t.pending), t.corr, t.deadlines, t.next_deadline())
            assert seen["c"] == seen["py"], op
        assert [_outcome(f) for f in futs["c"]] == [_outcome(f) for f in futs["py"]]
    finally:
        loop.close()
