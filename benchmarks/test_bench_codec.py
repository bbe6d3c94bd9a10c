"""Codec hot paths, compiled vs pure Python: frame header and route encode / decode, and a job
record's encoding for the job log."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import msgpack
import pytest

from orbitmesh.models import JobState
from orbitmesh.protocol import Kind, Route, Strategy
from orbitmesh.storage import JobRecord

pytestmark = pytest.mark.benchmark(group="codec")

CORR = 123_456_789
DEADLINE = 1_900_000_000_000
KEY = b"bench-agent"


def test_pack_header(benchmark: Any, core_impl: ModuleType) -> None:
    # Given a request's fields, When packed, Expect the 40-byte header
    hdr = benchmark(core_impl.pack_header, Kind.REQUEST, 0x0100, 0, 0, CORR, 0, DEADLINE)
    assert len(hdr) == 40


def test_unpack_header(benchmark: Any, core_impl: ModuleType) -> None:
    # Given a packed request header, When decoded, Expect its fields back
    hdr = core_impl.pack_header(Kind.REQUEST, 0x0100, 0, 0, CORR, 0, DEADLINE)
    fields = benchmark(core_impl.unpack_header, hdr)
    assert fields.kind == Kind.REQUEST and fields.corr == CORR


def test_check_header(benchmark: Any, core_impl: ModuleType) -> None:
    # Given a valid header, When checked, Expect 0 (no error code)
    hdr = core_impl.pack_header(Kind.REPLY, 0, 0, 0, CORR)
    assert benchmark(core_impl.check_header, hdr) == 0


def test_pack_route(benchmark: Any, core_impl: ModuleType) -> None:
    # Given a route by agent name, When packed, Expect type, strategy, key
    route = benchmark(core_impl.pack_route, Route.NAME, Strategy.LEAST_LOADED, KEY)
    assert route == bytes((Route.NAME, Strategy.LEAST_LOADED)) + KEY


def test_unpack_route(benchmark: Any, core_impl: ModuleType) -> None:
    # Given a packed route, When decoded, Expect (type, strategy, key)
    route = core_impl.pack_route(Route.NAME, Strategy.LEAST_LOADED, KEY)
    assert benchmark(core_impl.unpack_route, route) == (Route.NAME, Strategy.LEAST_LOADED, KEY)


def _finished_record() -> JobRecord:
    """A short job as the broker logs it when it ends: 64-byte params and result, three transitions."""
    now = 1_764_000_000.25
    return JobRecord(
        id=CORR,
        command="resize_image",
        route=b"\x01\x00worker-3",
        params=b"p" * 64,
        flags=0x100,
        state=JobState.SUCCEEDED,
        attempts=1,
        created=now,
        updated=now + 0.01,
        agent="worker-3",
        session=3,
        lease=1,
        result=b"r" * 64,
        transitions=[("PENDING", now, ""), ("DISPATCHED", now, "worker-3"), ("SUCCEEDED", now + 0.01, "worker-3")],
    )


def test_pack_record(benchmark: Any, record_impl: ModuleType) -> None:
    # Given a finished job's record, When its fields are packed, Expect msgpack's own bytes
    rec = _finished_record()
    names = [f.name for f in dataclasses.fields(rec)]
    packer = record_impl.FieldPacker(names)
    data = benchmark(packer.pack, rec.__dict__)
    assert data == msgpack.packb(tuple(getattr(rec, n) for n in names), use_bin_type=True)


def test_time_key(benchmark: Any, record_impl: ModuleType) -> None:
    # Given a time, When keyed, Expect 8 bytes with the sign bit set for a positive time
    key = benchmark(record_impl.time_key, 1_764_000_000.25)
    assert len(key) == 8 and key[0] & 0x80
