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

Packed framing (protocol 2): a header frame whose version byte is 2 carries the parts after it
inline: byte 12 says how many (the rest of 12-15 is 0), and each follows the header as a u32
length and its bytes. ``pack_parts`` / ``unpack_parts`` convert between a message (header, parts)
and its packed frames; unpacking gives back the protocol-1 message exactly.
"""

from __future__ import annotations

import struct

from ..errors import ErrorCode, ProtocolError
from ..protocol import HEADER_SIZE, KIND_MAX, MAGIC, MAX_FRAMES, PACK_LIMIT, PACKED_VERSION, TOKEN_SIZE, VERSION, Header

_HDR = struct.Struct("<2sBBHHIIQQQ")
_TOKEN = struct.Struct("<II")
_LEN = struct.Struct("<I")
INLINE_MAX = MAX_FRAMES - 2  # parts a packed header frame may carry: all but the routing id and itself
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
ROUTE_KEY_MAX = 1024

public_api = [
    "HEADER_SIZE",
    "INLINE_MAX",
    "ROUTE_KEY_MAX",
    "check_header",
    "header_error_message",
    "pack_header",
    "pack_parts",
    "pack_route",
    "pack_token",
    "packed_error_message",
    "unpack_header",
    "unpack_parts",
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


# --- packed framing (protocol 2) -----------------------------------------------------------


def is_packed(data: bytes) -> bool:
    """``data`` is a packed header frame: ``"OM"``, version byte 2 (it may still not add up)."""
    return len(data) >= 3 and data[0] == 0x4F and data[1] == 0x4D and data[2] == PACKED_VERSION


def packable(header: bytes) -> bool:
    """``header`` may head a packed message: 40 bytes, ``"OM"``, version 1, bytes 12-15 zero (so
    that unpacking gives it back exactly)."""
    return len(header) == HEADER_SIZE and header[:3] == b"OM\x01" and header[12:16] == b"\0\0\0\0"


def pack_parts(parts: list[bytes]) -> list[bytes]:
    """The packed frames of message ``parts`` (a 40-byte header, then its parts): the header frame
    with as many leading parts inline as keep it within ``PACK_LIMIT`` bytes (at most
    ``INLINE_MAX``), then the others as they are. ValueError unless ``packable(parts[0])``."""
    if not parts or not packable(bytes(parts[0][: HEADER_SIZE + 1])):
        raise ValueError(f'a message to pack starts with a {HEADER_SIZE}-byte "OM" version-1 header')
    size = HEADER_SIZE
    k = 0
    n = len(parts)
    while k + 1 < n and k < INLINE_MAX:
        part = parts[k + 1]
        grown = size + 4 + (len(part) if type(part) is bytes else memoryview(part).nbytes)
        if grown > PACK_LIMIT:
            break
        size = grown
        k += 1
    head = bytearray(parts[0])
    head[2] = PACKED_VERSION
    head[12] = k
    for part in parts[1 : k + 1]:
        view = memoryview(part).cast("B")
        head += _LEN.pack(len(view))
        head += view
    return [bytes(head), *parts[k + 1 :]]


def packed_error_message(code: int, data: bytes) -> str:
    """The message that goes with an ``unpack_parts`` error code for this header frame."""
    if code == ErrorCode.BAD_HEADER:
        return f"packed header frame is {len(data)} bytes, at least {HEADER_SIZE} expected"
    if code == ErrorCode.BAD_HEADER_FIELD:
        return "reserved header field (bytes 13-15) must be zero"
    if data[12] > INLINE_MAX:
        return f"packed header frame holds {data[12]} parts, at most {INLINE_MAX}"
    return f"packed header frame: its {data[12]} parts do not fill its {len(data)} bytes"


def _unpack_error(data: bytes) -> int:
    """0 if header frame ``data`` (version byte 2) is well packed, else the ``ErrorCode``."""
    n = len(data)
    if n < HEADER_SIZE:
        return ErrorCode.BAD_HEADER
    if data[13] | data[14] | data[15]:
        return ErrorCode.BAD_HEADER_FIELD
    k = data[12]
    if k > INLINE_MAX:
        return ErrorCode.BAD_FRAMES
    at = HEADER_SIZE
    for _ in range(k):
        if at + 4 > n:
            return ErrorCode.BAD_FRAMES
        at += 4 + _LEN.unpack_from(data, at)[0]
    return 0 if at == n else ErrorCode.BAD_FRAMES


def unpack_parts(frames: list[bytes]) -> list[bytes]:
    """The message packed ``frames`` carry: its header (version 1, byte 12 zero) and parts.
    Frames whose first is not a packed header frame (``"OM"``, version byte 2) come back as they
    are; a packed one whose parts do not add up raises ``ProtocolError`` (BAD_HEADER,
    BAD_HEADER_FIELD or BAD_FRAMES)."""
    if not frames:
        return frames
    data = frames[0]
    if not is_packed(data):
        return frames
    data = bytes(data)
    code = _unpack_error(data)
    if code:
        raise ProtocolError(packed_error_message(code, data), code=code)
    head = bytearray(data[:HEADER_SIZE])
    head[2] = VERSION
    head[12] = 0
    out = [bytes(head)]
    at = HEADER_SIZE
    for _ in range(data[12]):
        (size,) = _LEN.unpack_from(data, at)
        out.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    out.extend(frames[1:])
    return out
