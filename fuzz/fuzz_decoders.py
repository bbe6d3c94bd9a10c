"""Coverage-guided differential fuzzing of the frame codec (atheris / libFuzzer).

Every input goes to the compiled codec (``orbitmesh._core._frame_c``) and to its pure-Python
twin (``_frame_py``), and the harness fails (an uncaught exception: libFuzzer saves the input
as ``crash-*``) unless, for that input:

* each twin either returns a value or raises ``ProtocolError`` whose code is an ``ErrorCode``
  (any other exception is a bug);
* both twins agree exactly: the same value of the same type, or the same error code and message;
* ``check_header`` agrees with a third, independent reading of docs/protocol.md (so a mistake
  both twins share is caught too), and with ``unpack_header``; so does ``unpack_parts`` (packed
  framing, protocol 2) with its own reading;
* what ``pack_*`` encodes, ``unpack_*`` decodes back to the same fields.

Input layout (so that the seed corpus in ``fuzz/corpus`` is readable): byte 0 picks the target,
byte 1 the argument type (bytes, bytearray or memoryview; int or an int subclass), the rest is
the payload: the bytes to decode, or the integers to encode (9-byte signed little-endian each,
so values reach beyond 64 bits and below 0).

Run for a fixed time with libFuzzer flags (the first directory receives new inputs)::

    python fuzz/fuzz_decoders.py -max_total_time=60 /tmp/om-corpus fuzz/corpus

Coverage feedback comes from the pure twin, whose bytecode atheris instruments here; for
feedback from the compiled twin's C too, build it with clang's coverage instrumentation (see
docs/security.md, "Fuzzing"). ``ORBITMESH_FUZZ_PLANT=1`` plants a bug in the pure twin (its
reserved-field check skips byte 15), which a working harness finds within seconds: the test
suite uses it to prove the harness can fail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import atheris

from orbitmesh._core import _frame_c as c_codec
from orbitmesh._core import _frame_py as py_codec
from orbitmesh.errors import ErrorCode, ProtocolError
from orbitmesh.protocol import Header

_HEADER_CODES = {
    ErrorCode.BAD_HEADER,
    ErrorCode.BAD_MAGIC,
    ErrorCode.UNSUPPORTED_VERSION,
    ErrorCode.UNKNOWN_KIND,
    ErrorCode.BAD_HEADER_FIELD,
}


class Disagreement(AssertionError):
    """The twins (or a twin and the spec) disagree on one input: a bug."""


class _Int(int):
    """An int subclass: the compiled codec takes another path for these."""


def spec_check_header(data: bytes) -> int:
    """``check_header`` as docs/protocol.md states it, written apart from both twins."""
    if len(data) != 40:
        return ErrorCode.BAD_HEADER
    if data[:2] != b"OM":
        return ErrorCode.BAD_MAGIC
    if data[2] != 1:
        return ErrorCode.UNSUPPORTED_VERSION
    if not 1 <= data[3] <= 16:
        return ErrorCode.UNKNOWN_KIND
    if data[12:16] != b"\0\0\0\0":
        return ErrorCode.BAD_HEADER_FIELD
    return 0


def spec_unpack_parts(data: bytes) -> int | list[bytes]:
    """``unpack_parts([data])`` as docs/protocol.md states it: the error code, or the message."""
    if data[:2] != b"OM" or data[2:3] != b"\x02":
        return [data]
    if len(data) < 40:
        return ErrorCode.BAD_HEADER
    if data[13:16] != b"\0\0\0":
        return ErrorCode.BAD_HEADER_FIELD
    if data[12] > 62:
        return ErrorCode.BAD_FRAMES
    out, at = [data[:2] + b"\x01" + data[3:12] + b"\0" + data[13:40]], 40
    for _ in range(data[12]):
        if at + 4 > len(data):
            return ErrorCode.BAD_FRAMES
        size = int.from_bytes(data[at : at + 4], "little")
        out.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return out if at == len(data) else ErrorCode.BAD_FRAMES


def _plant_bug() -> None:
    """Make the pure twin's reserved check skip byte 15 (for the test that the harness fails)."""
    honest = py_codec.check_header

    def planted(data: bytes) -> int:
        code = honest(data)
        if code == ErrorCode.BAD_HEADER_FIELD and not (data[12] | data[13] | data[14]):
            return 0
        return code

    py_codec.check_header = planted  # unpack_header and the compiled fallbacks look it up per call


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """("ok", type, value) or ("err", code, message); any other exception is a bug."""
    try:
        value = fn(*args)
    except ProtocolError as exc:
        if type(exc.code) is not ErrorCode:
            raise Disagreement(f"{fn.__module__}.{fn.__name__}{args!r}: code {exc.code!r} is not an ErrorCode") from exc
        return ("err", exc.code, exc.message)
    except Exception as exc:
        raise Disagreement(f"{fn.__module__}.{fn.__name__}{args!r} raised {exc!r}, not ProtocolError") from exc
    return ("ok", type(value), value)


def same(name: str, *args: Any) -> tuple[Any, ...]:
    """Call ``name`` in both twins; they must agree exactly. Returns the (common) outcome."""
    c = outcome(getattr(c_codec, name), *args)
    p = outcome(getattr(py_codec, name), *args)
    if c != p:
        raise Disagreement(f"{name}{args!r}: compiled {c!r} != pure {p!r}")
    return c


def _ints(payload: bytes, n: int, wrap: bool) -> list[int]:
    out = []
    for i in range(n):
        chunk = payload[9 * i : 9 * i + 9]
        value = int.from_bytes(chunk, "little", signed=True) if chunk else 0
        out.append(_Int(value) if wrap else value)
    return out


def _decode_targets(data: bytes, as_type: int) -> None:
    arg: Any = (bytes, bytearray, memoryview)[as_type % 3](data)
    code = same("check_header", arg)
    if code[0] != "ok" or not (code[2] == 0 or code[2] in _HEADER_CODES):
        raise Disagreement(f"check_header({data!r}) = {code!r}: neither 0 nor a header code")
    if code[2] != spec_check_header(data):
        raise Disagreement(f"check_header({data!r}) = {code[2]!r}, the spec says {spec_check_header(data)!r}")
    hdr = same("unpack_header", arg)
    if (hdr[0] == "ok") != (code[2] == 0) or (hdr[0] == "err" and hdr[1] != code[2]):
        raise Disagreement(f"unpack_header({data!r}) = {hdr!r} but check_header says {code[2]!r}")
    if hdr[0] == "ok":
        h: Header = hdr[2]
        again = same("pack_header", h.kind, h.flags, h.code, h.aux, h.corr, h.job, h.deadline)
        if again != ("ok", bytes, bytes(data)):
            raise Disagreement(f"pack_header(unpack_header({data!r})) = {again!r}")
    same("unpack_token", arg)
    parts = same("unpack_parts", [bytes(data)])
    spec = spec_unpack_parts(bytes(data))
    if (parts[1] if parts[0] == "err" else parts[2]) != spec:
        raise Disagreement(f"unpack_parts([{data!r}]) = {parts!r}, the spec says {spec!r}")
    if parts[0] == "ok" and py_codec.packable(parts[2][0]):
        packed = same("pack_parts", parts[2])
        if packed[0] != "ok" or same("unpack_parts", packed[2]) != parts:
            raise Disagreement(f"unpack_parts(pack_parts({parts[2]!r})) = {packed!r}: not the message")
    route = same("unpack_route", arg)
    if route[0] == "ok":
        back = same("pack_route", *route[2])
        if back != ("ok", bytes, bytes(data)):
            raise Disagreement(f"pack_route(unpack_route({data!r})) = {back!r}")


def _encode_targets(target: int, payload: bytes, wrap: bool) -> None:
    if target == 1:
        fields = _ints(payload, 7, wrap)
        packed = same("pack_header", *fields)
        if packed[0] == "ok":
            decoded = same("unpack_header", packed[2])
            if decoded != ("ok", Header, Header(1, *fields)):
                raise Disagreement(f"unpack_header(pack_header{tuple(fields)!r}) = {decoded!r}")
    elif target == 2:
        index, generation = _ints(payload, 2, wrap)
        packed = same("pack_token", index, generation)
        if packed[0] == "ok" and same("unpack_token", packed[2]) != ("ok", tuple, (index, generation)):
            raise Disagreement(f"unpack_token(pack_token({index!r}, {generation!r})) does not round-trip")
    else:
        rtype, strategy = (int.from_bytes(payload[i : i + 1] or b"\0", "little", signed=True) for i in (0, 1))
        key = payload[2:]
        packed = same("pack_route", _Int(rtype) if wrap else rtype, strategy, key)
        if packed[0] == "ok":
            decoded = same("unpack_route", packed[2])
            # pack_route lets an empty key through for every type; unpack_route wants one but for COMMAND
            want = ("err", ErrorCode.BAD_ROUTE) if not key and rtype != 4 else ("ok", tuple)
            if decoded[:2] != want or (decoded[0] == "ok" and decoded[2] != (rtype, strategy, key)):
                raise Disagreement(f"unpack_route(pack_route({rtype}, {strategy}, {key!r})) = {decoded!r}")


def test_one_input(data: bytes) -> None:
    """One libFuzzer input: see the module docstring for its layout."""
    if len(data) < 2:
        return
    target, as_type, payload = data[0] % 4, data[1], data[2:]
    if target == 0:
        _decode_targets(payload, as_type)
    else:
        _encode_targets(target, payload, bool(as_type & 1))


def main(argv: list[str]) -> None:
    # Coverage feedback: instrument the pure twin (the compiled twin is C, see the docstring).
    for module in (py_codec, sys.modules[__name__]):
        for value in list(vars(module).values()):
            if callable(value) and getattr(value, "__module__", None) == module.__name__:
                if hasattr(value, "__code__"):
                    atheris.instrument_func(value)
    if os.environ.get("ORBITMESH_FUZZ_PLANT") == "1":
        _plant_bug()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
