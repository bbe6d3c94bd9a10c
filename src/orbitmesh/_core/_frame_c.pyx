"""Frame codec, compiled. Behaves exactly like ``_frame_py.py``, the reference and typed twin.

Bytes and bytearray are decoded here with C loads (the helpers in ``_frame_c.pxd``); exact ints
are range-checked and encoded in C. The rare other argument types (memoryview, lists, int
subclasses for a token, ...) go to the reference, so results and errors match it for every input.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cimport cython

from orbitmesh._core import _frame_py as _ref
from orbitmesh.errors import ErrorCode, ProtocolError
from orbitmesh.protocol import HEADER_SIZE, KIND_MAX, MAGIC, PACK_LIMIT, PACKED_VERSION, TOKEN_SIZE, VERSION, Header

cdef enum:
    _KEY_MAX = 1024
    _U16_MAX = 0xFFFF
    _U32_MAX = 0xFFFFFFFF

cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFFULL

ROUTE_KEY_MAX = _KEY_MAX
INLINE_MAX = OM_INLINE_MAX

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
packed_error_message = _ref.packed_error_message

# The C constants in _frame_c.pxd are compiled in; refuse to run against a protocol they don't match.
if (
    (HEADER_SIZE, TOKEN_SIZE, VERSION, int(KIND_MAX), MAGIC, ROUTE_KEY_MAX, PACKED_VERSION, PACK_LIMIT, INLINE_MAX)
    != (
        OM_HEADER_SIZE,
        OM_TOKEN_SIZE,
        OM_VERSION,
        OM_KIND_MAX,
        bytes((OM_MAGIC0, OM_MAGIC1)),
        _ref.ROUTE_KEY_MAX,
        OM_PACKED_VERSION,
        OM_PACK_LIMIT,
        _ref.INLINE_MAX,
    )
    or (
        ErrorCode.BAD_HEADER,
        ErrorCode.BAD_MAGIC,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_KIND,
        ErrorCode.BAD_HEADER_FIELD,
        ErrorCode.BAD_FRAMES,
    )
    != (OM_E_BAD_HEADER, OM_E_BAD_MAGIC, OM_E_UNSUPPORTED_VERSION, OM_E_UNKNOWN_KIND, OM_E_BAD_HEADER_FIELD, OM_E_BAD_FRAMES)
    or public_api != _ref.public_api
):
    raise ImportError("orbitmesh._core._frame_c was built for another protocol definition; rebuild it")

_CODE = {int(c): c for c in ErrorCode}
_tuple_new = tuple.__new__


@cython.boundscheck(True)
@cython.wraparound(True)
def header_error_message(code, data):
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


def check_header(data):
    """Return 0 if ``data`` is a valid v1 header, else the ``ErrorCode`` that says why."""
    cdef int rc
    if type(data) is bytes:
        rc = om_check_header(<const unsigned char*>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
    elif type(data) is bytearray:
        rc = om_check_header(<const unsigned char*>PyByteArray_AS_STRING(data), <size_t>PyByteArray_GET_SIZE(data))
    else:
        return _ref.check_header(data)
    return _CODE[rc] if rc else 0


def unpack_header(data):
    """Decode a header frame; raises ``ProtocolError`` with a stable code if it is invalid."""
    data = bytes(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef int rc = om_check_header(p, <size_t>PyBytes_GET_SIZE(data))
    if rc:
        code = _CODE[rc]
        raise ProtocolError(header_error_message(code, data), code=code)
    return _tuple_new(
        Header,
        (
            om_hdr_version(p),
            om_hdr_kind(p),
            om_hdr_flags(p),
            om_hdr_code(p),
            om_hdr_aux(p),
            om_hdr_corr(p),
            om_hdr_job(p),
            om_hdr_deadline(p),
        ),
    )


cdef int _fits(object value, uint64_t lo, uint64_t top, uint64_t* out) except -1:
    """1 (and ``out[0] = value``) if the int ``value`` lies in lo..top, else 0."""
    cdef uint64_t x
    if type(value) is int:
        try:
            x = value
        except OverflowError:  # negative, or beyond 64 bits
            return 0
        if x < lo or x > top:
            return 0
    elif lo <= value <= top:  # an int subclass: its own comparisons, as in the reference
        x = value
    else:
        return 0
    out[0] = x
    return 1


cdef uint64_t _field(str name, object value, uint64_t top) except? 0xFFFFFFFFFFFFFFFFULL:
    cdef uint64_t x
    if not _fits(value, 0, top, &x):
        raise ProtocolError(f"header field {name}={value} out of range 0..{top}", code=ErrorCode.BAD_HEADER_FIELD)
    return x


def pack_header(kind, flags=0, code=0, aux=0, corr=0, job=0, deadline=0):
    """Encode a v1 header; raises ``ProtocolError`` (BAD_HEADER_FIELD) for out-of-range fields."""
    cdef uint64_t k, f, c, a, co, j, d
    kind = int(kind)
    if not _fits(kind, 1, OM_KIND_MAX, &k):
        raise ProtocolError(f"unknown message kind {kind}", code=ErrorCode.UNKNOWN_KIND)
    # int() then check, one field at a time: the reference's order, so the same error wins
    f = _field("flags", int(flags), _U16_MAX)
    c = _field("code", int(code), _U16_MAX)
    a = _field("aux", int(aux), _U32_MAX)
    co = _field("corr", int(corr), _U64_MAX)
    j = _field("job", int(job), _U64_MAX)
    d = _field("deadline", int(deadline), _U64_MAX)
    out = PyBytes_FromStringAndSize(NULL, OM_HEADER_SIZE)
    om_write_header(<unsigned char*>PyBytes_AS_STRING(out), <uint8_t>k, <uint16_t>f, <uint16_t>c, <uint32_t>a, co, j, d)
    return out


def pack_token(index, generation):
    """Encode an in-flight token (the route frame between broker and agent)."""
    cdef uint64_t i, g
    if type(index) is not int or type(generation) is not int:
        return _ref.pack_token(index, generation)
    i = _field("index", index, _U32_MAX)
    g = _field("generation", generation, _U32_MAX)
    out = PyBytes_FromStringAndSize(NULL, OM_TOKEN_SIZE)
    om_write_token(<unsigned char*>PyBytes_AS_STRING(out), <uint32_t>i, <uint32_t>g)
    return out


def unpack_token(data):
    """Decode an in-flight token; raises ``ProtocolError`` (BAD_ROUTE) if it is not 8 bytes."""
    cdef const unsigned char* p
    cdef Py_ssize_t n
    if type(data) is bytes:
        p = <const unsigned char*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    elif type(data) is bytearray:
        p = <const unsigned char*>PyByteArray_AS_STRING(data)
        n = PyByteArray_GET_SIZE(data)
    else:
        return _ref.unpack_token(data)
    if n != OM_TOKEN_SIZE:
        raise ProtocolError(f"token is {n} bytes, expected {TOKEN_SIZE}", code=ErrorCode.BAD_ROUTE)
    return om_token_index(p), om_token_generation(p)


def pack_route(route_type, strategy=0, key=b""):
    """Encode a client route frame: type byte, strategy byte, key bytes."""
    cdef Py_ssize_t n
    cdef unsigned char* p
    if not 1 <= route_type <= 5:
        raise ProtocolError(f"unknown route type {route_type}", code=ErrorCode.BAD_ROUTE)
    if not 0 <= strategy <= 2:
        raise ProtocolError(f"unknown selection strategy {strategy}", code=ErrorCode.BAD_ROUTE)
    if len(key) > _KEY_MAX:
        raise ProtocolError(f"route key is {len(key)} bytes, at most {ROUTE_KEY_MAX}", code=ErrorCode.BAD_ROUTE)
    if type(route_type) is not int or type(strategy) is not int or type(key) is not bytes:
        return bytes((route_type, strategy)) + bytes(key)
    n = PyBytes_GET_SIZE(key)
    out = PyBytes_FromStringAndSize(NULL, n + 2)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = <unsigned char><long>route_type
    p[1] = <unsigned char><long>strategy
    memcpy(p + 2, PyBytes_AS_STRING(key), <size_t>n)
    return out


def unpack_route(data):
    """Decode a client route frame into (type, strategy, key); raises ``ProtocolError`` (BAD_ROUTE)."""
    data = bytes(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef unsigned char rtype, strategy
    if n < 2:
        raise ProtocolError(f"route frame is {n} bytes, at least 2 expected", code=ErrorCode.BAD_ROUTE)
    rtype = p[0]
    strategy = p[1]
    if rtype < 1 or rtype > 5:
        raise ProtocolError(f"unknown route type {rtype}", code=ErrorCode.BAD_ROUTE)
    if strategy > 2:
        raise ProtocolError(f"unknown selection strategy {strategy}", code=ErrorCode.BAD_ROUTE)
    if n - 2 > _KEY_MAX:
        raise ProtocolError(f"route key is {n - 2} bytes, at most {ROUTE_KEY_MAX}", code=ErrorCode.BAD_ROUTE)
    if rtype != 4 and n == 2:  # NAME, CAPABILITY, GROUP and LABELS need a key; COMMAND has none
        raise ProtocolError("route key is empty", code=ErrorCode.BAD_ROUTE)
    return rtype, strategy, PyBytes_FromStringAndSize(<const char*>p + 2, n - 2)


def pack_parts(parts):
    """The packed frames of message ``parts`` (see ``_frame_py.pack_parts``)."""
    cdef Py_ssize_t k
    cdef size_t size
    if (
        type(parts) is not list
        or not parts
        or type(parts[0]) is not bytes
        or not om_packable(<const unsigned char*>PyBytes_AS_STRING(parts[0]), <size_t>PyBytes_GET_SIZE(parts[0]))
    ):
        return _ref.pack_parts(parts)  # and its ValueError
    k = om_pack_count(parts, &size)
    if k < 0:
        return _ref.pack_parts(parts)
    head = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>size)
    om_write_packed(<unsigned char*>PyBytes_AS_STRING(head), parts, k)
    return [head, *parts[k + 1 :]]


def unpack_parts(frames):
    """The message packed ``frames`` carry (see ``_frame_py.unpack_parts``)."""
    cdef const unsigned char* p
    cdef size_t n
    cdef int rc
    if type(frames) is not list or not frames or type(frames[0]) is not bytes:
        return _ref.unpack_parts(frames)
    data = frames[0]
    p = <const unsigned char*>PyBytes_AS_STRING(data)
    n = <size_t>PyBytes_GET_SIZE(data)
    if not om_is_packed(p, n):
        return frames
    rc = om_check_packed(p, n)
    if rc:
        code = _CODE[rc]
        raise ProtocolError(packed_error_message(code, data), code=code)
    out = om_unpack_list(p)
    out.extend(frames[1:])
    return out
