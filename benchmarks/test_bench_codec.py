"""Frame codec hot path: header and route encode / decode, compiled vs pure Python."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from orbitmesh.protocol import Kind, Route, Strategy

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
