# C-level frame header helpers, inlined into every module that cimports them:
#
#     from orbitmesh._core._frame_c cimport om_check_header, om_write_header, om_hdr_kind, ...
#
# Layout (little-endian, 40 bytes; see docs/protocol.md and _frame_py.py):
#   0 magic "OM" | 2 version u8 | 3 kind u8 | 4 flags u16 | 6 code u16 | 8 aux u32
#   12 reserved u32 (0) | 16 corr u64 | 24 job u64 | 32 deadline u64
# Loads and stores are spelled as byte shifts, so they are right on any host byte order;
# gcc and clang turn each one into a single move on little-endian targets.
# _frame_c.pyx checks at import that these constants match protocol.py and errors.py.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    OM_HEADER_SIZE = 40
    OM_TOKEN_SIZE = 8
    OM_VERSION = 1
    OM_KIND_MAX = 16
    OM_MAGIC0 = 0x4F  # "O"
    OM_MAGIC1 = 0x4D  # "M"
    # check_header results (orbitmesh.errors.ErrorCode values)
    OM_E_BAD_HEADER = 100
    OM_E_BAD_MAGIC = 101
    OM_E_UNSUPPORTED_VERSION = 102
    OM_E_UNKNOWN_KIND = 103
    OM_E_BAD_HEADER_FIELD = 108
    OM_E_BAD_FRAMES = 104
    # packed framing (protocol 2): see _frame_py.pack_parts
    OM_PACKED_VERSION = 2
    OM_PACK_LIMIT = 4096
    OM_INLINE_MAX = 62


# --- little-endian loads / stores -------------------------------------------------------

cdef inline uint16_t om_ld16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(<uint16_t>p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t om_ld32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24))


cdef inline uint64_t om_ld64(const unsigned char* p) noexcept nogil:
    return <uint64_t>om_ld32(p) | (<uint64_t>om_ld32(p + 4) << 32)


cdef inline void om_st16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>(v & 0xFF)
    p[1] = <unsigned char>(v >> 8)


cdef inline void om_st32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v & 0xFF)
    p[1] = <unsigned char>((v >> 8) & 0xFF)
    p[2] = <unsigned char>((v >> 16) & 0xFF)
    p[3] = <unsigned char>(v >> 24)


cdef inline void om_st64(unsigned char* p, uint64_t v) noexcept nogil:
    om_st32(p, <uint32_t>(v & 0xFFFFFFFFU))
    om_st32(p + 4, <uint32_t>(v >> 32))


# --- validation -------------------------------------------------------------------------

cdef inline int om_check_header(const unsigned char* p, size_t n) noexcept nogil:
    """0 if p[0:n] is a valid v1 header, else the ErrorCode; same order of checks as _frame_py."""
    if n != OM_HEADER_SIZE:
        return OM_E_BAD_HEADER
    if p[0] != OM_MAGIC0 or p[1] != OM_MAGIC1:
        return OM_E_BAD_MAGIC
    if p[2] != OM_VERSION:
        return OM_E_UNSUPPORTED_VERSION
    if p[3] == 0 or p[3] > OM_KIND_MAX:
        return OM_E_UNKNOWN_KIND
    if p[12] | p[13] | p[14] | p[15]:
        return OM_E_BAD_HEADER_FIELD
    return 0


cdef inline const unsigned char* om_msg_header(object msg, Py_ssize_t min_parts, Py_ssize_t max_parts, int kind):
    """The header of ``msg``, a received message (a list of bytes frames), if it has ``min_parts``
    to ``max_parts`` parts and a valid v1 header of ``kind`` (any kind: -1); else NULL. It points
    into the header frame: valid while ``msg`` holds that frame."""
    cdef Py_ssize_t n
    cdef const unsigned char* h
    if type(msg) is not list:
        return NULL
    n = len(<list>msg)
    if n < min_parts or n > max_parts:
        return NULL
    hdr = (<list>msg)[0]
    if type(hdr) is not bytes:
        return NULL
    h = <const unsigned char*>PyBytes_AS_STRING(hdr)
    if om_check_header(h, <size_t>PyBytes_GET_SIZE(hdr)) or (kind >= 0 and h[3] != kind):
        return NULL
    return h


# --- field readers (p points at a checked 40-byte header) -------------------------------

cdef inline uint8_t om_hdr_version(const unsigned char* p) noexcept nogil:
    return p[2]


cdef inline uint8_t om_hdr_kind(const unsigned char* p) noexcept nogil:
    return p[3]


cdef inline uint16_t om_hdr_flags(const unsigned char* p) noexcept nogil:
    return om_ld16(p + 4)


cdef inline uint16_t om_hdr_code(const unsigned char* p) noexcept nogil:
    return om_ld16(p + 6)


cdef inline uint32_t om_hdr_aux(const unsigned char* p) noexcept nogil:
    return om_ld32(p + 8)


cdef inline uint64_t om_hdr_corr(const unsigned char* p) noexcept nogil:
    return om_ld64(p + 16)


cdef inline uint64_t om_hdr_job(const unsigned char* p) noexcept nogil:
    return om_ld64(p + 24)


cdef inline uint64_t om_hdr_deadline(const unsigned char* p) noexcept nogil:
    return om_ld64(p + 32)


# --- field writers (in place, e.g. on a zmq_msg_data() buffer being forwarded) ----------

cdef inline void om_hdr_set_kind(unsigned char* p, uint8_t v) noexcept nogil:
    p[3] = v


cdef inline void om_hdr_set_flags(unsigned char* p, uint16_t v) noexcept nogil:
    om_st16(p + 4, v)


cdef inline void om_hdr_set_code(unsigned char* p, uint16_t v) noexcept nogil:
    om_st16(p + 6, v)


cdef inline void om_hdr_set_aux(unsigned char* p, uint32_t v) noexcept nogil:
    om_st32(p + 8, v)


cdef inline void om_hdr_set_corr(unsigned char* p, uint64_t v) noexcept nogil:
    om_st64(p + 16, v)


cdef inline void om_hdr_set_job(unsigned char* p, uint64_t v) noexcept nogil:
    om_st64(p + 24, v)


cdef inline void om_hdr_set_deadline(unsigned char* p, uint64_t v) noexcept nogil:
    om_st64(p + 32, v)


cdef inline void om_write_header(
    unsigned char* p,
    uint8_t kind,
    uint16_t flags,
    uint16_t code,
    uint32_t aux,
    uint64_t corr,
    uint64_t job,
    uint64_t deadline,
) noexcept nogil:
    """Write a complete v1 header (magic, version, reserved = 0) into p[0:40]; no range checks."""
    p[0] = OM_MAGIC0
    p[1] = OM_MAGIC1
    p[2] = OM_VERSION
    p[3] = kind
    om_st16(p + 4, flags)
    om_st16(p + 6, code)
    om_st32(p + 8, aux)
    om_st32(p + 12, 0)
    om_st64(p + 16, corr)
    om_st64(p + 24, job)
    om_st64(p + 32, deadline)


# --- in-flight token (broker <-> agent route frame: index u32, generation u32) ----------

cdef inline uint32_t om_token_index(const unsigned char* p) noexcept nogil:
    return om_ld32(p)


cdef inline uint32_t om_token_generation(const unsigned char* p) noexcept nogil:
    return om_ld32(p + 4)


cdef inline void om_write_token(unsigned char* p, uint32_t index, uint32_t generation) noexcept nogil:
    om_st32(p, index)
    om_st32(p + 4, generation)


# --- packed framing (protocol 2; see _frame_py.pack_parts / unpack_parts) -----------------

cdef inline bint om_is_packed(const unsigned char* p, size_t n) noexcept nogil:
    """p[0:n] is a packed header frame: "OM", version byte 2 (it may still not add up)."""
    return n >= 3 and p[0] == OM_MAGIC0 and p[1] == OM_MAGIC1 and p[2] == OM_PACKED_VERSION


cdef inline bint om_packable(const unsigned char* p, size_t n) noexcept nogil:
    """p[0:n] may head a packed message: a 40-byte "OM" version-1 header with bytes 12-15 zero
    (so unpacking gives it back exactly)."""
    return (
        n == OM_HEADER_SIZE and p[0] == OM_MAGIC0 and p[1] == OM_MAGIC1 and p[2] == OM_VERSION
        and (p[12] | p[13] | p[14] | p[15]) == 0
    )


cdef inline int om_check_packed(const unsigned char* p, size_t n) noexcept nogil:
    """0 if the packed header frame p[0:n] adds up, else the ErrorCode (as _frame_py)."""
    cdef size_t at = OM_HEADER_SIZE
    cdef int i, k
    if n < OM_HEADER_SIZE:
        return OM_E_BAD_HEADER
    if p[13] | p[14] | p[15]:
        return OM_E_BAD_HEADER_FIELD
    k = p[12]
    if k > OM_INLINE_MAX:
        return OM_E_BAD_FRAMES
    for i in range(k):
        if at + 4 > n:
            return OM_E_BAD_FRAMES
        at += 4 + <size_t>om_ld32(p + at)
        if at > n:
            return OM_E_BAD_FRAMES
    return 0 if at == n else OM_E_BAD_FRAMES


cdef inline void om_normalize_packed(unsigned char* p) noexcept nogil:
    """Turn the first 40 bytes of a packed header frame into the protocol-1 header it carries."""
    p[2] = OM_VERSION
    p[12] = 0


cdef inline Py_ssize_t om_pack_count(list parts, size_t* size):
    """How many parts after the header ``parts[0]`` go inline (the greedy rule of
    ``_frame_py.pack_parts``), with the packed header frame's size in ``size``; -1 if a part that
    is not bytes comes first (the reference then decides, by its buffer size)."""
    cdef Py_ssize_t k = 0, n = len(parts)
    cdef size_t total = OM_HEADER_SIZE, ln
    while k + 1 < n and k < OM_INLINE_MAX:
        part = parts[k + 1]
        if type(part) is not bytes:
            return -1
        ln = <size_t>PyBytes_GET_SIZE(part)
        if total + 4 + ln > OM_PACK_LIMIT:
            break
        total += 4 + ln
        k += 1
    size[0] = total
    return k


cdef inline list om_unpack_list(const unsigned char* p):
    """The protocol-1 header and the inline parts of a packed header frame that adds up
    (``om_check_packed`` said 0), as bytes."""
    cdef size_t at = OM_HEADER_SIZE, ln
    cdef int i
    head = PyBytes_FromStringAndSize(<const char*>p, OM_HEADER_SIZE)
    om_normalize_packed(<unsigned char*>PyBytes_AS_STRING(head))
    cdef list out = [head]
    for i in range(p[12]):
        ln = om_ld32(p + at)
        out.append(PyBytes_FromStringAndSize(<const char*>p + at + 4, <Py_ssize_t>ln))
        at += 4 + ln
    return out


cdef inline void om_write_packed(unsigned char* p, list parts, Py_ssize_t k):
    """Write the packed header frame of ``parts`` (bytes; a 40-byte header first) with parts
    1..k inline into p, which has room for it."""
    cdef size_t at = OM_HEADER_SIZE, ln
    cdef Py_ssize_t i
    memcpy(p, PyBytes_AS_STRING(parts[0]), OM_HEADER_SIZE)
    p[2] = OM_PACKED_VERSION
    p[12] = <unsigned char>k
    for i in range(1, k + 1):
        part = parts[i]
        ln = <size_t>PyBytes_GET_SIZE(part)
        om_st32(p + at, <uint32_t>ln)
        memcpy(p + at + 4, PyBytes_AS_STRING(part), ln)
        at += 4 + ln
