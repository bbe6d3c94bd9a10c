"""A job record's encoding, compiled (see ``_record_py.py`` for the behaviour).

``FieldPacker.pack`` writes the msgpack array itself, into a buffer on the stack (the heap
only for a record larger than it), for the value types a record holds: None, bool, int,
float, bytes, str and lists or tuples of them. Any other value (a bytearray, a dict, an int
beyond 64 bits, a string that does not encode...) is packed by msgpack's own Packer from the
start, so the bytes, and the exceptions, are always msgpack's.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.list cimport PyList_Check
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_Check
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

import operator

import msgpack

public_api = ["FieldPacker", "PreparedRows", "RecordTemplate", "time_key"]

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size)
    unsigned long long PyLong_AsUnsignedLongLong(object o)
    PyObject* PyErr_Occurred()
    void PyErr_Clear()
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    PyObject** PySequence_Fast_ITEMS(object o)
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL

cdef enum:
    STACK_BYTES = 2048
    MAX_DEPTH = 8  # nesting a record's values may have (transitions: a list of tuples)

cdef Py_ssize_t MAX_LEN = 0xFFFFFFFF  # msgpack's limit for a string, bytes or array


cdef struct Buf:
    char* data
    Py_ssize_t used
    Py_ssize_t size
    bint heap


cdef int _grow(Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t size = b.size * 2
    while size < b.used + need:
        size *= 2
    cdef char* data = <char*>PyMem_Malloc(size)
    if data == NULL:
        raise MemoryError()
    memcpy(data, b.data, b.used)
    if b.heap:
        PyMem_Free(b.data)
    b.data, b.size, b.heap = data, size, True
    return 0


cdef inline int _put(Buf* b, const char* src, Py_ssize_t n) except -1:
    if b.used + n > b.size:
        _grow(b, n)
    memcpy(b.data + b.used, src, n)
    b.used += n
    return 0


cdef inline int _head(Buf* b, uint8_t code, uint64_t value, int width) except -1:
    """``code`` then ``value`` big-endian in ``width`` bytes (0, 1, 2, 4 or 8)."""
    cdef unsigned char out[9]
    cdef int i
    out[0] = code
    for i in range(width):
        out[width - i] = <unsigned char>(value >> (8 * i))
    return _put(b, <char*>out, 1 + width)


cdef inline int _sized(Buf* b, Py_ssize_t n, uint8_t fix, int fix_max, uint8_t c8, uint8_t c16, uint8_t c32) except -1:
    """The header of a str, bin or array of ``n`` (``fix``: its short form below ``fix_max``;
    ``c8`` 0: none of one byte, as arrays have)."""
    if n < fix_max:
        return _head(b, fix | <uint8_t>n, 0, 0)
    if c8 and n < 0x100:
        return _head(b, c8, n, 1)
    if n < 0x10000:
        return _head(b, c16, n, 2)
    return _head(b, c32, n, 4)


cdef inline uint64_t _bits(double d) noexcept:
    cdef uint64_t u
    memcpy(&u, &d, 8)  # not a pointer cast: that breaks strict aliasing
    return u


cdef int _pack_int(Buf* b, object o) except -1:
    """0 packed; 1 out of 64 bits (msgpack's Packer decides)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    cdef unsigned long long u
    if overflow > 0:
        u = PyLong_AsUnsignedLongLong(o)
        if u == <unsigned long long>-1 and PyErr_Occurred() != NULL:  # beyond 64 bits
            PyErr_Clear()
            return 1
        _head(b, 0xCF, u, 8)
        return 0
    if overflow < 0:
        return 1
    if v >= 0:  # as msgpack-c packs an unsigned value: the smallest form
        if v < 0x80:
            _head(b, <uint8_t>v, 0, 0)
        elif v < 0x100:
            _head(b, 0xCC, v, 1)
        elif v < 0x10000:
            _head(b, 0xCD, v, 2)
        elif v < 0x100000000:
            _head(b, 0xCE, v, 4)
        else:
            _head(b, 0xCF, v, 8)
    elif v >= -32:
        _head(b, <uint8_t>(<int64_t>v & 0xFF), 0, 0)
    elif v >= -0x80:
        _head(b, 0xD0, <uint64_t>v & 0xFF, 1)
    elif v >= -0x8000:
        _head(b, 0xD1, <uint64_t>v & 0xFFFF, 2)
    elif v >= -0x80000000:
        _head(b, 0xD2, <uint64_t>v & 0xFFFFFFFF, 4)
    else:
        _head(b, 0xD3, <uint64_t>v, 8)
    return 0


cdef inline int _pack_str(Buf* b, object o) except -1:
    """0 packed; 1 a string that does not encode (msgpack's Packer raises its error)."""
    cdef Py_ssize_t n
    cdef const char* s = PyUnicode_AsUTF8AndSize(o, &n)
    if s == NULL or n > MAX_LEN:
        PyErr_Clear()
        return 1
    _sized(b, n, 0xA0, 32, 0xD9, 0xDA, 0xDB)
    return _put(b, s, n)


cdef int _pack(Buf* b, object o, int depth) except -1:
    """0 packed; 1 a value this packer leaves to msgpack's."""
    cdef Py_ssize_t n, i
    cdef PyObject** items
    cdef type t = type(o)
    if t is str:  # the common types first, by exact type (the checks below walk the MRO)
        return _pack_str(b, o)
    if t is float:
        return _head(b, 0xCB, _bits(PyFloat_AS_DOUBLE(o)), 8)
    if t is int:
        return _pack_int(b, o)
    if o is None:
        return _head(b, 0xC0, 0, 0)
    if o is True:
        return _head(b, 0xC3, 0, 0)
    if o is False:
        return _head(b, 0xC2, 0, 0)
    if PyLong_Check(o):
        return _pack_int(b, o)
    if PyFloat_Check(o):
        return _head(b, 0xCB, _bits(PyFloat_AS_DOUBLE(o)), 8)
    if PyBytes_Check(o):
        n = PyBytes_GET_SIZE(o)
        if n > MAX_LEN:
            return 1
        _sized(b, n, 0, 0, 0xC4, 0xC5, 0xC6)
        return _put(b, PyBytes_AS_STRING(o), n)
    if PyUnicode_Check(o):
        return _pack_str(b, o)
    if depth >= MAX_DEPTH or not (PyTuple_Check(o) or PyList_Check(o)):
        return 1
    n = PySequence_Fast_GET_SIZE(o)
    if n > MAX_LEN:
        return 1
    _sized(b, n, 0x90, 16, 0, 0xDC, 0xDD)
    items = PySequence_Fast_ITEMS(o)
    for i in range(n):
        # A list's items stay put: nothing here runs Python code that could change it.
        if _pack(b, <object>items[i], depth + 1):
            return 1
    return 0


cdef class FieldPacker:
    """Packs a record's fields, named in order, as one msgpack array."""

    cdef readonly tuple names
    cdef object _get
    cdef object _pack
    cdef bint _single

    def __init__(self, names):
        self.names = tuple(names)
        if not self.names:
            raise ValueError("a record has at least one field")
        if not all(isinstance(name, str) for name in self.names):
            raise TypeError("field names must be strings")
        self._get = operator.itemgetter(*self.names)
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._single = len(self.names) == 1

    def pack(self, dict fields):
        """The msgpack array of ``fields[name]`` for every name; None if one is missing."""
        cdef char stack[STACK_BYTES]
        cdef Buf b
        cdef PyObject* value
        cdef PyObject* key
        cdef tuple names = self.names
        cdef PyObject** wanted = PySequence_Fast_ITEMS(names)
        cdef Py_ssize_t i = 0, pos = 0, n = len(names)
        cdef int left = 0
        b.data, b.used, b.size, b.heap = stack, 0, STACK_BYTES, False
        try:
            _sized(&b, n, 0x90, 16, 0, 0xDC, 0xDD)
            # A record's dict holds its fields in field order (__init__, copy and the job table's
            # template all keep it): walk it while its keys are the names, with no lookup.
            while i < n and PyDict_Next(fields, &pos, &key, &value) and key == wanted[i]:
                if _pack(&b, <object>value, 0):
                    left = 1
                    break
                i += 1
            while i < n and not left:  # the rest (a dict in another order) by name
                value = PyDict_GetItemWithError(fields, <object>wanted[i])
                if value == NULL:  # missing (an error raises: except? NULL)
                    return None
                left = _pack(&b, <object>value, 0)
                i += 1
            if not left:
                return PyBytes_FromStringAndSize(b.data, b.used)
        finally:
            if b.heap:
                PyMem_Free(b.data)
        # A value this packer does not take: msgpack packs the whole record (its bytes, its errors).
        try:
            values = self._get(fields)
        except KeyError:
            return None
        return self._pack((values,) if self._single else values)


cdef class RecordTemplate:
    """A record's encoding with most of its fields fixed (see ``_record_py.RecordTemplate``): the
    fixed fields are packed once, here, and copied; only the variable ones are packed per call."""

    cdef readonly tuple names, variable
    cdef tuple _segs  # per field: its packed default (bytes), or None where a value goes
    cdef list _defaults
    cdef tuple _slots
    cdef bytes _head
    cdef object _pack

    def __init__(self, names, dict defaults, variable):
        self.names = tuple(names)
        self.variable = tuple(variable)
        missing = [name for name in self.names + self.variable if name not in defaults]
        if (
            missing
            or not set(self.variable) <= set(self.names)
            or list(self.variable) != sorted(set(self.variable), key=self.names.index)
        ):
            raise ValueError(f"variable fields must be record fields with defaults, in field order: {self.variable}")
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._defaults = [defaults[name] for name in self.names]
        self._slots = tuple(self.names.index(name) for name in self.variable)
        self._segs = tuple(None if name in self.variable else self._pack(defaults[name]) for name in self.names)
        n = len(self.names)
        self._head = bytes((0x90 | n,)) if n < 16 else (b"\xdc" if n < 0x10000 else b"\xdd") + n.to_bytes(
            2 if n < 0x10000 else 4, "big"
        )

    def pack(self, tuple values):
        """The record's msgpack array, the variable fields' ``values`` in ``variable`` order."""
        cdef char stack[STACK_BYTES]
        cdef Buf b
        cdef tuple segs = self._segs
        cdef Py_ssize_t i, k = 0, n = len(segs)
        cdef int left = 0
        cdef object seg
        if len(values) != len(self._slots):
            raise ValueError(f"expected {len(self._slots)} values, got {len(values)}")
        b.data, b.used, b.size, b.heap = stack, 0, STACK_BYTES, False
        try:
            _put(&b, PyBytes_AS_STRING(self._head), PyBytes_GET_SIZE(self._head))
            for i in range(n):
                seg = segs[i]
                if seg is None:
                    if _pack(&b, values[k], 0):
                        left = 1
                        break
                    k += 1
                else:
                    _put(&b, PyBytes_AS_STRING(seg), PyBytes_GET_SIZE(seg))
            if not left:
                return PyBytes_FromStringAndSize(b.data, b.used)
        finally:
            if b.heap:
                PyMem_Free(b.data)
        # A value this packer does not take: msgpack packs the whole record (its bytes, its errors).
        fields = self._defaults.copy()
        for k in range(len(values)):
            fields[<Py_ssize_t>self._slots[k]] = values[k]
        return self._pack(fields)


cdef inline void _time_key(double t, unsigned char* out) noexcept:
    cdef uint64_t u = _bits(t + 0.0)
    cdef int i
    u = u ^ <uint64_t>0xFFFFFFFFFFFFFFFF if u >> 63 else u | (<uint64_t>1 << 63)
    for i in range(8):
        out[7 - i] = <unsigned char>(u >> (8 * i))


def time_key(double t):
    """8 bytes that sort like the doubles they encode (``t + 0.0`` folds -0.0 into 0.0)."""
    cdef unsigned char out[8]
    _time_key(t, out)
    return PyBytes_FromStringAndSize(<char*>out, 8)


cdef class PreparedRows:
    """``LmdbStore.prepare_encoded``: a record's row for the job-log writer, from its parts (see
    ``_record_py.PreparedRows``). Compiled, it is one C call where the store's method was a
    Python one, twice per job on the control plane."""

    cdef dict _codes
    cdef frozenset _terminal

    def __init__(self, codes, terminal):
        self._codes = dict(codes)
        self._terminal = frozenset(terminal)

    def __call__(self, job_id, state, agent, command, created, updated, data):
        cdef unsigned char key[16]
        cdef uint64_t n
        cdef int i
        code = self._codes[state]
        if state in self._terminal:
            n = job_id  # OverflowError for an id below 0 or past 64 bits, as struct's error
            _time_key(updated, key)
            for i in range(8):
                key[15 - i] = <unsigned char>(n >> (8 * i))
            done = PyBytes_FromStringAndSize(<char*>key, 16)
        else:
            done = b""
        return (job_id, code, agent, command, created, "", done, data)
