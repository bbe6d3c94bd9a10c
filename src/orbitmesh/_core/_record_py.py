"""A job record's encoding, pure-Python twin of ``_record_c.pyx``.

``FieldPacker(names).pack(fields)`` encodes the values of ``fields`` (a record's instance
dict) in the order of ``names`` as one msgpack array, exactly as
``msgpack.Packer(use_bin_type=True)`` packs the tuple of them; None if a name is missing.
``time_key(t)`` is the 8-byte key that sorts like the double ``t`` (the job log's time
indexes).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

public_api = ["FieldPacker", "time_key"]

_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


class FieldPacker:
    """Packs a record's fields, named in order, as one msgpack array."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        if not self.names:
            raise ValueError("a record has at least one field")
        if not all(isinstance(name, str) for name in self.names):
            raise TypeError("field names must be strings")
        self._get = operator.itemgetter(*self.names)
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
        self._single = len(self.names) == 1

    def pack(self, fields: dict[str, Any]) -> bytes | None:
        """The msgpack array of ``fields[name]`` for every name; None if one is missing."""
        try:
            values = self._get(fields)
        except KeyError:
            return None
        return self._pack((values,) if self._single else values)  # type: ignore[no-any-return]


def time_key(t: float) -> bytes:
    """8 bytes that sort like the doubles they encode (``t + 0.0`` folds -0.0 into 0.0)."""
    (u,) = _U64.unpack(_F64.pack(t + 0.0))
    return _U64.pack(u ^ 0xFFFF_FFFF_FFFF_FFFF if u >> 63 else u | 1 << 63)
