"""Frame codec, pure-Python reference. ``_frame_c.pyx`` must behave identically.

Header layout (little-endian, 40 bytes; see docs/protocol.md):

    0  magic    2s  b"OM"
    2  version  u8
    3  kind     u8
    4  flags    u16
    6  code     u16
    8  aux      u32
    12 reserved u32  (must be 0)
    16 corr     u64
    24 job      u64
    32 deadline u64  (unix time in ms, 0 = none)
"""

from __future__ import annotations

import struct

from ..errors import ErrorCode, ProtocolError
from ..protocol import HEADER_SIZE, KIND_MAX, MAGIC, TOKEN_SIZE, VERSION, Header

_HDR = struct.Struct("<2sBBHHIIQQQ")
_TOKEN = struct.Struct("<II")
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
ROUTE_KEY_MAX = 1024

public_api = [
    "HEADER_SIZE",
    "ROUTE_KEY_MAX",
    "check_header",
    "header_error_message",
    "pack_header",
    "pack_route",
    "pack_token",
    "unpack_header",
    "unpack_route",
    "unpack_token",
]


def header_error_message(code: int, data: bytes) -> str:
    """The message that goes with a ``check_header`` code for these bytes."""
    if code == ErrorCode.BAD_HEADER:
        return f"header frame is {len(data)} bytes, expected {HEADER_SIZE}"
    if code == ErrorCode.BAD_MAGIC:
        return f"bad magic {bytes(data[:2])!r}, expected {MAGIC!r}"
    if code == ErrorCode.UNSUPPORTED_VERSION:
        return f"unsupported protocol version {data[2]}, this peer speaks {VERSION}"
    if code == ErrorCode.UNKNOWN_KIND:
        return f"unknown message kind {data[3]}"
    if code == ErrorCode.BAD_HEADER_FIELD:
        return "reserved header field (bytes 12-15) must be zero"
    return f"error {code}"


def check_header(data: bytes) -> int:
    """Return 0 if ``data`` is a valid v1 header, else the ``ErrorCode`` that says why."""
    if len(data) != HEADER_SIZE:
        return ErrorCode.BAD_HEADER
    if data[0] != 0x4F or data[1] != 0x4D:
        return ErrorCode.BAD_MAGIC
    if data[2] != VERSION:
        return ErrorCode.UNSUPPORTED_VERSION
    kind = data[3]
    if kind == 0 or kind > KIND_MAX:
        return ErrorCode.UNKNOWN_KIND
    if data[12] | data[13] | data[14] | data[15]:
        return ErrorCode.BAD_HEADER_FIELD
    return 0


def unpack_header(data: bytes) -> Header:
    """Decode a header frame; raises ``ProtocolError`` with a stable code if it is invalid."""
    data = bytes(data)
    code = check_header(data)
    if code:
        raise ProtocolError(header_error_message(code, data), code=code)
    _, version, kind, flags, ecode, aux, _, corr, job, deadline = _HDR.unpack(data)
    return Header(version, kind, flags, ecode, aux, corr, job, deadline)


def _field(name: str, value: int, top: int) -> int:
    if not 0 <= value <= top:
        raise ProtocolError(f"header field {name}={value} out of range 0..{top}", code=ErrorCode.BAD_HEADER_FIELD)
    return value


def pack_header(
    kind: int,
    flags: int = 0,
    code: int = 0,
    aux: int = 0,
    corr: int = 0,
    job: int = 0,
    deadline: int = 0,
) -> bytes:
    """Encode a v1 header; raises ``ProtocolError`` (BAD_HEADER_FIELD) for out-of-range fields."""
    kind = int(kind)
    if not 1 <= kind <= KIND_MAX:
        raise ProtocolError(f"unknown message kind {kind}", code=ErrorCode.UNKNOWN_KIND)
    return _HDR.pack(
        MAGIC,
        VERSION,
        kind,
        _field("flags", int(flags), _U16_MAX),
        _field("code", int(code), _U16_MAX),
        _field("aux", int(aux), _U32_MAX),
        0,
        _field("corr", int(corr), _U64_MAX),
        _field("job", int(job), _U64_MAX),
        _field("deadline", int(deadline), _U64_MAX),
    )


def pack_token(index: int, generation: int) -> bytes:
    """Encode an in-flight token (the route frame between broker and agent)."""
    return _TOKEN.pack(_field("index", int(index), _U32_MAX), _field("generation", int(generation), _U32_MAX))


def unpack_token(data: bytes) -> tuple[int, int]:
    """Decode an in-flight token; raises ``ProtocolError`` (BAD_ROUTE) if it is not 8 bytes."""
    if len(data) != TOKEN_SIZE:
        raise ProtocolError(f"token is {len(data)} bytes, expected {TOKEN_SIZE}", code=ErrorCode.BAD_ROUTE)
    index, generation = _TOKEN.unpack(data)
    return index, generation


def pack_route(route_type: int, strategy: int = 0, key: bytes = b"") -> bytes:
    """Encode a client route frame: type byte, strategy byte, key bytes."""
    if not 1 <= route_type <= 5:
        raise ProtocolError(f"unknown route type {route_type}", code=ErrorCode.BAD_ROUTE)
    if not 0 <= strategy <= 2:
        raise ProtocolError(f"unknown selection strategy {strategy}", code=ErrorCode.BAD_ROUTE)
    if len(key) > ROUTE_KEY_MAX:
        raise ProtocolError(f"route key is {len(key)} bytes, at most {ROUTE_KEY_MAX}", code=ErrorCode.BAD_ROUTE)
    return bytes((route_type, strategy)) + bytes(key)


def unpack_route(data: bytes) -> tuple[int, int, bytes]:
    """Decode a client route frame into (type, strategy, key); raises ``ProtocolError`` (BAD_ROUTE)."""
    data = bytes(data)
    if len(data) < 2:
        raise ProtocolError(f"route frame is {len(data)} bytes, at least 2 expected", code=ErrorCode.BAD_ROUTE)
    rtype, strategy = data[0], data[1]
    if not 1 <= rtype <= 5:
        raise ProtocolError(f"unknown route type {rtype}", code=ErrorCode.BAD_ROUTE)
    if strategy > 2:
        raise ProtocolError(f"unknown selection strategy {strategy}", code=ErrorCode.BAD_ROUTE)
    if len(data) - 2 > ROUTE_KEY_MAX:
        raise ProtocolError(f"route key is {len(data) - 2} bytes, at most {ROUTE_KEY_MAX}", code=ErrorCode.BAD_ROUTE)
    if rtype in (1, 2, 3, 5) and len(data) == 2:
        raise ProtocolError("route key is empty", code=ErrorCode.BAD_ROUTE)
    return rtype, strategy, data[2:]
