"""Frame codec: the compiled module and its pure-Python twin give the same bytes and the same errors."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitmesh import _core
from orbitmesh._core import _frame_py
from orbitmesh.errors import ErrorCode, ProtocolError
from orbitmesh.protocol import HEADER_SIZE, KIND_MAX, Flag, Header, Kind, Route, Strategy

U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1
PROPERTY = settings(max_examples=400, deadline=None)


@pytest.fixture(scope="module", params=["c", "py"], ids=["c", "py"])
def frame(request: pytest.FixtureRequest) -> ModuleType:
    return _core.load("_frame", request.param)


@pytest.fixture(scope="module")
def frame_c() -> ModuleType:
    return _core.load("_frame", "c")


def valid_header(**fields: int) -> bytes:
    return _frame_py.pack_header(**{"kind": Kind.REQUEST, **fields})


def with_byte(data: bytes, pos: int, value: int) -> bytes:
    out = bytearray(data)
    out[pos] = value
    return bytes(out)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What a call did: its result and the result's type, or the error's class, code and text."""
    try:
        result = fn(*args)
    except Exception as exc:  # any error must match between the twins
        return ("raised", type(exc), getattr(exc, "code", None), str(exc))
    return ("returned", type(result), result)


# --- the compiled module is the one under test ------------------------------------------


def test_compiled_module_is_compiled(frame_c: ModuleType) -> None:
    # Given the compiled twin as the core loads it
    # Expect an extension module, not a .py that happens to have the name
    assert frame_c.__name__ == "orbitmesh._core._frame_c"
    assert frame_c.__file__ is not None and frame_c.__file__.endswith(".so")


def test_twins_export_the_same_api(frame: ModuleType) -> None:
    # Given either twin
    # Expect the reference's public_api, every name defined
    assert frame.public_api == _frame_py.public_api
    for name in frame.public_api:
        assert hasattr(frame, name), name
    assert frame.HEADER_SIZE == HEADER_SIZE == 40
    assert frame.ROUTE_KEY_MAX == _frame_py.ROUTE_KEY_MAX


# --- round trips --------------------------------------------------------------------------


def test_header_has_the_documented_little_endian_layout(frame: ModuleType) -> None:
    # Given fields whose bytes are all distinct
    # When they are packed
    data = frame.pack_header(
        Kind.REQUEST,
        Flag.TRACKED | Flag.STREAM,
        0x0102,
        0x03040506,
        0x1112131415161718,
        0x2122232425262728,
        0x3132333435363738,
    )
    # Expect magic, version, kind, then each field least significant byte first, reserved zero
    assert data == (
        b"OM\x01\x04"
        b"\x03\x00\x02\x01"
        b"\x06\x05\x04\x03"
        b"\x00\x00\x00\x00"
        b"\x18\x17\x16\x15\x14\x13\x12\x11"
        b"\x28\x27\x26\x25\x24\x23\x22\x21"
        b"\x38\x37\x36\x35\x34\x33\x32\x31"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": 1},
        {"kind": int(KIND_MAX)},
        {"kind": Kind.REPLY, "flags": U16, "code": U16, "aux": U32, "corr": U64, "job": U64, "deadline": U64},
        {"kind": Kind.ERROR, "flags": 1, "code": 1, "aux": 1, "corr": 1, "job": 1, "deadline": 1},
        {"kind": Kind.CREDIT, "aux": 2**31, "corr": 2**63, "job": 2**32, "deadline": 2**32 - 1},
    ],
    ids=["kind-min", "kind-max", "all-max", "all-one", "bit-edges"],
)
def test_header_round_trips_at_field_boundaries(frame: ModuleType, fields: dict[str, int]) -> None:
    # Given fields at the edges of their ranges
    # When they are packed and unpacked
    data = frame.pack_header(**fields)
    header = frame.unpack_header(data)
    # Expect a valid 40-byte header that decodes to the same fields, as protocol.Header
    assert len(data) == HEADER_SIZE
    assert frame.check_header(data) == 0
    assert type(header) is Header
    expected = {"flags": 0, "code": 0, "aux": 0, "corr": 0, "job": 0, "deadline": 0, **fields}
    assert header == Header(version=1, **expected)


def test_header_decodes_from_any_bytes_like(frame: ModuleType) -> None:
    # Given one header as bytes, bytearray and memoryview
    data = valid_header(corr=7)
    # Expect the same decoding and the same check from each
    for view in (data, bytearray(data), memoryview(data)):
        assert frame.unpack_header(view).corr == 7
        assert frame.check_header(view) == 0


def test_token_round_trips(frame: ModuleType) -> None:
    # Given tokens at the edges of the u32 range
    for index, generation in [(0, 0), (U32, U32), (1, 2**31)]:
        # When packed and unpacked
        data = frame.pack_token(index, generation)
        # Expect 8 little-endian bytes and the same pair back
        assert data == index.to_bytes(4, "little") + generation.to_bytes(4, "little")
        assert frame.unpack_token(data) == (index, generation)


@pytest.mark.parametrize(
    ("route_type", "strategy", "key"),
    [
        (Route.NAME, Strategy.LEAST_LOADED, b"agent-1"),
        (Route.COMMAND, Strategy.ROUND_ROBIN, b""),
        (Route.LABELS, Strategy.RANDOM, b"k" * _frame_py.ROUTE_KEY_MAX),
    ],
)
def test_route_round_trips(frame: ModuleType, route_type: int, strategy: int, key: bytes) -> None:
    # Given a route (COMMAND has no key; a key may be ROUTE_KEY_MAX bytes)
    # When packed and unpacked
    data = frame.pack_route(route_type, strategy, key)
    # Expect type byte, strategy byte, key; and the same triple back
    assert data == bytes((route_type, strategy)) + key
    assert frame.unpack_route(data) == (route_type, strategy, key)


# --- every error carries its code -------------------------------------------------------

HEADER_ERRORS = [
    (b"", ErrorCode.BAD_HEADER),
    (valid_header()[:39], ErrorCode.BAD_HEADER),
    (valid_header() + b"\x00", ErrorCode.BAD_HEADER),
    (b"XM" + valid_header()[2:], ErrorCode.BAD_MAGIC),
    (b"OX" + valid_header()[2:], ErrorCode.BAD_MAGIC),
    (with_byte(valid_header(), 2, 0), ErrorCode.UNSUPPORTED_VERSION),
    (with_byte(valid_header(), 2, 2), ErrorCode.UNSUPPORTED_VERSION),
    (with_byte(valid_header(), 3, 0), ErrorCode.UNKNOWN_KIND),
    (with_byte(valid_header(), 3, int(KIND_MAX) + 1), ErrorCode.UNKNOWN_KIND),
    (with_byte(valid_header(), 3, 255), ErrorCode.UNKNOWN_KIND),
    *[(with_byte(valid_header(), pos, 1), ErrorCode.BAD_HEADER_FIELD) for pos in (12, 13, 14, 15)],
]


@pytest.mark.parametrize(
    ("data", "code"), HEADER_ERRORS, ids=[f"{c.name}-{i}" for i, (_, c) in enumerate(HEADER_ERRORS)]
)
def test_bad_header_is_a_protocol_error_with_its_code(frame: ModuleType, data: bytes, code: ErrorCode) -> None:
    # Given a header broken in one way
    # When it is checked and decoded
    # Expect check_header to name the code, and unpack_header to raise it with the matching message
    assert frame.check_header(data) == code
    with pytest.raises(ProtocolError) as info:
        frame.unpack_header(data)
    assert info.value.code == code
    assert info.value.message == frame.header_error_message(code, data)


def test_header_error_messages_say_what_is_wrong(frame: ModuleType) -> None:
    # Given each kind of header fault
    # Expect a message that names the offending value
    assert "is 3 bytes, expected 40" in frame.header_error_message(ErrorCode.BAD_HEADER, b"abc")
    assert "b'XY'" in frame.header_error_message(ErrorCode.BAD_MAGIC, b"XY" + bytes(38))
    assert "version 9" in frame.header_error_message(ErrorCode.UNSUPPORTED_VERSION, with_byte(bytes(40), 2, 9))
    assert "kind 77" in frame.header_error_message(ErrorCode.UNKNOWN_KIND, with_byte(bytes(40), 3, 77))
    assert frame.header_error_message(999, b"") == "error 999"


PACK_ERRORS = [
    ({"kind": 0}, ErrorCode.UNKNOWN_KIND),
    ({"kind": int(KIND_MAX) + 1}, ErrorCode.UNKNOWN_KIND),
    ({"kind": -1}, ErrorCode.UNKNOWN_KIND),
    ({"flags": -1}, ErrorCode.BAD_HEADER_FIELD),
    ({"flags": U16 + 1}, ErrorCode.BAD_HEADER_FIELD),
    ({"code": U16 + 1}, ErrorCode.BAD_HEADER_FIELD),
    ({"aux": -1}, ErrorCode.BAD_HEADER_FIELD),
    ({"aux": U32 + 1}, ErrorCode.BAD_HEADER_FIELD),
    ({"corr": U64 + 1}, ErrorCode.BAD_HEADER_FIELD),
    ({"job": -1}, ErrorCode.BAD_HEADER_FIELD),
    ({"deadline": 2**100}, ErrorCode.BAD_HEADER_FIELD),
]


@pytest.mark.parametrize(("fields", "code"), PACK_ERRORS, ids=[str(f) for f, _ in PACK_ERRORS])
def test_out_of_range_header_field_is_refused(frame: ModuleType, fields: dict[str, int], code: ErrorCode) -> None:
    # Given one field outside its range
    # When a header is packed
    # Expect ProtocolError with the code, naming the value
    with pytest.raises(ProtocolError) as info:
        frame.pack_header(**{"kind": Kind.HELLO, **fields})
    assert info.value.code == code
    assert str(next(iter(fields.values()))) in info.value.message


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ((0,), "unknown route type 0"),
        ((6,), "unknown route type 6"),
        ((1, -1, b"k"), "unknown selection strategy -1"),
        ((1, 3, b"k"), "unknown selection strategy 3"),
        ((1, 0, b"k" * 1025), "route key is 1025 bytes, at most 1024"),
    ],
)
def test_bad_route_is_refused_when_packed(frame: ModuleType, args: tuple[Any, ...], text: str) -> None:
    # Given a route type, strategy or key out of range
    # When it is packed
    # Expect ProtocolError(BAD_ROUTE) saying which
    with pytest.raises(ProtocolError) as info:
        frame.pack_route(*args)
    assert info.value.code == ErrorCode.BAD_ROUTE
    assert info.value.message == text


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "route frame is 0 bytes, at least 2 expected"),
        (b"\x01", "route frame is 1 bytes, at least 2 expected"),
        (b"\x00\x00k", "unknown route type 0"),
        (b"\x06\x00k", "unknown route type 6"),
        (b"\x01\x03k", "unknown selection strategy 3"),
        (b"\x01\x00" + b"k" * 1025, "route key is 1025 bytes, at most 1024"),
        (b"\x01\x00", "route key is empty"),
        (b"\x02\x01", "route key is empty"),
        (b"\x03\x02", "route key is empty"),
        (b"\x05\x00", "route key is empty"),
    ],
)
def test_bad_route_frame_is_refused_when_unpacked(frame: ModuleType, data: bytes, text: str) -> None:
    # Given a malformed route frame
    # When it is decoded
    # Expect ProtocolError(BAD_ROUTE) saying why
    with pytest.raises(ProtocolError) as info:
        frame.unpack_route(data)
    assert info.value.code == ErrorCode.BAD_ROUTE
    assert info.value.message == text


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\x00" * 9])
def test_token_of_wrong_size_is_refused(frame: ModuleType, data: bytes) -> None:
    # Given a token frame that is not 8 bytes
    # When it is decoded
    # Expect ProtocolError(BAD_ROUTE) with the size
    with pytest.raises(ProtocolError) as info:
        frame.unpack_token(data)
    assert info.value.code == ErrorCode.BAD_ROUTE
    assert info.value.message == f"token is {len(data)} bytes, expected 8"


@pytest.mark.parametrize(("index", "generation"), [(-1, 0), (U32 + 1, 0), (0, -1), (0, U32 + 1)])
def test_out_of_range_token_is_refused(frame: ModuleType, index: int, generation: int) -> None:
    # Given a token part outside u32
    # When it is packed
    # Expect ProtocolError(BAD_HEADER_FIELD), as for any out-of-range field
    with pytest.raises(ProtocolError) as info:
        frame.pack_token(index, generation)
    assert info.value.code == ErrorCode.BAD_HEADER_FIELD


# --- the twins agree on every input -----------------------------------------------------

C = _core.load("_frame", "c")
PY = _frame_py
BYTE_EDGES = st.sampled_from([0, 1, 2, 0x4D, 0x4F, int(KIND_MAX), int(KIND_MAX) + 1, 0x7F, 0x80, 0xFF])


@st.composite
def header_like(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes changed, sometimes cut short or extended."""
    data = bytearray(
        PY.pack_header(
            draw(st.integers(1, int(KIND_MAX))),
            draw(st.integers(0, U16)),
            draw(st.integers(0, U16)),
            draw(st.integers(0, U32)),
            draw(st.integers(0, U64)),
            draw(st.integers(0, U64)),
            draw(st.integers(0, U64)),
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        data[draw(st.integers(0, HEADER_SIZE - 1))] = draw(BYTE_EDGES | st.integers(0, 255))
    size = draw(st.sampled_from([HEADER_SIZE] * 6 + [0, 2, 4, 39, 41, 64]))
    return bytes(data[:size]) + bytes(max(0, size - HEADER_SIZE))


@st.composite
def route_like(draw: st.DrawFn) -> bytes:
    """Type and strategy bytes near their limits, then a key near its limits."""
    head = bytes(draw(st.lists(st.integers(0, 7) | BYTE_EDGES, max_size=2)))
    size = draw(st.sampled_from([0, 1, 5, 1023, 1024, 1025]))
    return head + draw(st.binary(min_size=size, max_size=size))


BYTES_LIKE = st.sampled_from([bytes, bytearray, memoryview])


@PROPERTY
@given(data=st.binary(max_size=48) | header_like(), as_type=BYTES_LIKE)
def test_twins_agree_on_headers(data: bytes, as_type: type) -> None:
    # Given arbitrary bytes or a mutated header, as bytes, bytearray or memoryview
    # When each twin checks and decodes it
    # Expect the same result, or the same error class, code and message
    assert outcome(C.check_header, as_type(data)) == outcome(PY.check_header, as_type(data))
    assert outcome(C.unpack_header, as_type(data)) == outcome(PY.unpack_header, as_type(data))


@PROPERTY
@given(data=st.binary(max_size=12) | route_like(), as_type=BYTES_LIKE)
def test_twins_agree_on_route_frames(data: bytes, as_type: type) -> None:
    # Given arbitrary bytes or a near-valid route frame
    # When each twin decodes it
    # Expect the same triple or the same error
    assert outcome(C.unpack_route, as_type(data)) == outcome(PY.unpack_route, as_type(data))


@PROPERTY
@given(data=st.binary(max_size=12), as_type=BYTES_LIKE)
def test_twins_agree_on_tokens(data: bytes, as_type: type) -> None:
    # Given arbitrary bytes
    # When each twin decodes them as a token
    # Expect the same pair or the same error
    assert outcome(C.unpack_token, as_type(data)) == outcome(PY.unpack_token, as_type(data))


@PROPERTY
@given(
    kind=st.integers(1, int(KIND_MAX)),
    flags=st.integers(0, U16),
    code=st.integers(0, U16),
    aux=st.integers(0, U32),
    corr=st.integers(0, U64),
    job=st.integers(0, U64),
    deadline=st.integers(0, U64),
)
def test_twins_pack_identical_headers(
    kind: int, flags: int, code: int, aux: int, corr: int, job: int, deadline: int
) -> None:
    # Given any in-range fields
    # When each twin packs them
    data = C.pack_header(kind, flags, code, aux, corr, job, deadline)
    # Expect identical bytes, which decode back to the fields
    assert data == PY.pack_header(kind, flags, code, aux, corr, job, deadline)
    assert C.unpack_header(data) == Header(1, kind, flags, code, aux, corr, job, deadline)


WIDE_INT = st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 1, U16, U16 + 1, U32, U32 + 1, U64, U64 + 1])


@PROPERTY
@given(fields=st.lists(WIDE_INT, min_size=7, max_size=7))
def test_twins_refuse_the_same_header_fields(fields: list[int]) -> None:
    # Given integers of any size for every field
    # When each twin packs them
    # Expect the same bytes, or the same first error
    assert outcome(C.pack_header, *fields) == outcome(PY.pack_header, *fields)


@PROPERTY
@given(route_type=st.integers(-2, 8), strategy=st.integers(-2, 4), key=st.binary(max_size=4) | route_like())
def test_twins_agree_on_packing_routes(route_type: int, strategy: int, key: bytes) -> None:
    # Given a route type, strategy and key in and around their ranges
    # Expect the same frame or the same error
    assert outcome(C.pack_route, route_type, strategy, key) == outcome(PY.pack_route, route_type, strategy, key)


@PROPERTY
@given(index=WIDE_INT, generation=WIDE_INT)
def test_twins_agree_on_packing_tokens(index: int, generation: int) -> None:
    # Given integers of any size
    # Expect the same token or the same error
    assert outcome(C.pack_token, index, generation) == outcome(PY.pack_token, index, generation)


@PROPERTY
@given(code=st.sampled_from([*ErrorCode, 0, 999, -1]), data=st.binary(max_size=41))
def test_twins_agree_on_header_error_messages(code: int, data: bytes) -> None:
    # Given any code and bytes (too short to index included)
    # Expect the same message or the same error
    assert outcome(C.header_error_message, code, data) == outcome(PY.header_error_message, code, data)


ODD_ARGUMENTS: list[tuple[str, tuple[Any, ...]]] = [
    # not bytes-like at all
    ("check_header", ("OM" + "\x01" * 38,)),
    ("check_header", (list(valid_header()),)),
    ("check_header", (None,)),
    ("unpack_header", (40,)),
    ("unpack_header", (list(valid_header()),)),
    ("unpack_header", ("x" * 40,)),
    ("unpack_token", ("x" * 8,)),
    ("unpack_token", (list(range(8)),)),
    ("unpack_token", (array("H", range(8)),)),
    ("unpack_route", (2,)),
    ("header_error_message", (ErrorCode.UNKNOWN_KIND, [1, 2])),
    # int-like and non-int arguments
    ("pack_header", (Kind.REQUEST, Flag.TRACKED | Flag.STREAM, True, 1.9, "5")),
    ("pack_header", ("x",)),
    ("pack_header", (1, -1, "x")),
    ("pack_header", (1, None)),
    ("pack_token", (True, Kind.HELLO)),
    ("pack_token", (1.5, 0)),
    ("pack_token", (0, 2.0**40)),
    ("pack_token", ("1", 0)),
    ("pack_route", (Route.NAME, Strategy.RANDOM, bytearray(b"k"))),
    ("pack_route", (1, 0, "key")),
    ("pack_route", (1.5, 0, b"k")),
    ("pack_route", (None, 0, b"k")),
    ("pack_route", (1, 0, None)),
]


@pytest.mark.parametrize(("name", "args"), ODD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ODD_ARGUMENTS)])
def test_twins_agree_on_odd_argument_types(name: str, args: tuple[Any, ...]) -> None:
    # Given an argument of an unusual type
    # When each twin is called with it
    # Expect the same result or the same error (class and text)
    assert outcome(getattr(C, name), *args) == outcome(getattr(PY, name), *args)


# --- packed framing (protocol 2) --------------------------------------------------------

PARTS = st.lists(st.binary(max_size=64) | st.sampled_from([b"", b"x" * 4000, b"y" * 5000]), max_size=70)


@PROPERTY
@given(fields=st.lists(st.integers(0, U16), min_size=2, max_size=2), parts=PARTS)
def test_twins_pack_identical_frames_that_unpack_to_the_message(fields: list[int], parts: list[bytes]) -> None:
    # Given a message: a header and up to 70 parts, small and large
    message = [valid_header(flags=fields[0], corr=fields[1]), *parts]
    # When each twin packs it
    packed = C.pack_parts(message)
    # Expect the same frames; a header frame within PACK_LIMIT (or the header alone) that
    # carries the leading parts; and unpacking, by either twin, gives the message back
    assert packed == PY.pack_parts(message)
    head = packed[0]
    assert head[2] == 2 and head[12] == len(message) - len(packed)
    assert len(head) <= 4096 or head[12] == 0
    assert C.unpack_parts(packed) == PY.unpack_parts(packed) == message


@st.composite
def packed_like(draw: st.DrawFn) -> bytes:
    """A packed header frame with a few bytes changed (count, lengths, reserved), or cut."""
    parts = draw(st.lists(st.binary(max_size=8), max_size=4))
    data = bytearray(PY.pack_parts([valid_header(corr=draw(st.integers(0, U64))), *parts])[0])
    for _ in range(draw(st.integers(0, 2))):
        data[draw(st.sampled_from([12, 13, 15, 40, 41, 44, len(data) - 1])) % len(data)] = draw(BYTE_EDGES)
    return bytes(data[: draw(st.sampled_from([len(data)] * 5 + [2, 39, 41, len(data) - 1]))])


@PROPERTY
@given(data=st.binary(max_size=48) | packed_like(), more=st.lists(st.binary(max_size=4), max_size=2))
def test_twins_agree_on_unpacking(data: bytes, more: list[bytes]) -> None:
    # Given arbitrary bytes or a damaged packed header frame, then a few more frames
    # When each twin unpacks them
    # Expect the same message, or the same error class, code and message; frames whose first
    # is not a packed header frame come back as they are
    frames = [data, *more]
    assert outcome(C.unpack_parts, frames) == outcome(PY.unpack_parts, frames)
    if data[:3] != b"OM\x02":
        assert PY.unpack_parts(frames) == frames


def test_a_packed_frame_that_does_not_add_up_is_refused(frame: ModuleType) -> None:
    good = frame.pack_parts([valid_header(corr=9), b"route", b"cmd"])[0]
    for data, code, text in [
        (good[:39], ErrorCode.BAD_HEADER, "at least 40"),
        (with_byte(good, 14, 1), ErrorCode.BAD_HEADER_FIELD, "13-15"),
        (good + b"x", ErrorCode.BAD_FRAMES, "do not fill"),
        (good[:-1], ErrorCode.BAD_FRAMES, "do not fill"),
        (with_byte(good, 12, 63), ErrorCode.BAD_FRAMES, "at most 62"),
    ]:
        with pytest.raises(ProtocolError) as err:
            frame.unpack_parts([data])
        assert err.value.code == code and text in err.value.message
    with pytest.raises(ValueError):
        frame.pack_parts([b"short header"])


@PROPERTY
@given(header=st.binary(min_size=40, max_size=40) | header_like(), rest=st.lists(st.binary(max_size=8), max_size=3))
def test_only_a_protocol_1_header_is_packed(header: bytes, rest: list[bytes]) -> None:
    # Given any 40 bytes (or a mutated header) as the first part
    # When each twin packs the message
    # Expect both to refuse alike unless it is an "OM" version-1 header with byte 12 zero,
    # and a packed message to unpack to exactly what was packed
    message = [header, *rest]
    assert outcome(C.pack_parts, message) == outcome(PY.pack_parts, message)
    if PY.packable(header):
        assert PY.unpack_parts(C.pack_parts(message)) == message
    else:
        with pytest.raises(ValueError):
            C.pack_parts(message)
