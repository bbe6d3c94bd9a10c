"""A job record's encoding, pure-Python twin of ``_record_c.pyx``.

``FieldPacker(names).pack(fields)`` encodes the values of ``fields`` (a record's instance
dict) in the order of ``names`` as one msgpack array, exactly as
``msgpack.Packer(use_bin_type=True)`` packs the tuple of them; None if a name is missing.
``RecordTemplate(names, defaults, variable).pack(values)`` encodes the same array for a record
whose fields are ``defaults`` but for the ``variable`` ones (named in field order, their values
given in that order): the common-path job table's records, with no record object.
``time_key(t)`` is the 8-byte key that sorts like the double ``t`` (the job log's time indexes).
``PreparedRows(codes, terminal)`` builds the LMDB store's row for the writer from a record's
parts (``LmdbStore.prepare_encoded``).
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import msgpack

public_api = ["FieldPacker", "PreparedRows", "RecordTemplate", "time_key"]

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


class RecordTemplate:
    """A record's encoding with most of its fields fixed: the bytes ``FieldPacker`` makes of
    ``defaults`` with the ``variable`` fields replaced by the values ``pack`` is given."""

    def __init__(self, names: Sequence[str], defaults: dict[str, Any], variable: Sequence[str]) -> None:
        self.names = tuple(names)
        self.variable = tuple(variable)
        missing = [name for name in (*self.names, *self.variable) if name not in defaults]
        if (
            missing
            or not set(self.variable) <= set(self.names)
            or list(self.variable) != sorted(set(self.variable), key=self.names.index)
        ):
            raise ValueError(f"variable fields must be record fields with defaults, in field order: {self.variable}")
        self._defaults = [defaults[name] for name in self.names]
        self._slots = [self.names.index(name) for name in self.variable]
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def pack(self, values: tuple[Any, ...]) -> bytes:
        """The record's msgpack array, the variable fields' ``values`` in ``variable`` order."""
        if len(values) != len(self._slots):
            raise ValueError(f"expected {len(self._slots)} values, got {len(values)}")
        fields = self._defaults.copy()
        for slot, value in zip(self._slots, values, strict=True):
            fields[slot] = value
        return self._pack(fields)  # type: ignore[no-any-return]


def time_key(t: float) -> bytes:
    """8 bytes that sort like the doubles they encode (``t + 0.0`` folds -0.0 into 0.0)."""
    (u,) = _U64.unpack(_F64.pack(t + 0.0))
    return _U64.pack(u ^ 0xFFFF_FFFF_FFFF_FFFF if u >> 63 else u | 1 << 63)


class PreparedRows:
    """``LmdbStore.prepare_encoded``: a record's row for the job-log writer, from its parts.

    The row is ``(id, state code, agent, command, created, "", done, data)``: ``codes`` maps a
    state to its code in the store's state index, and a state in ``terminal`` gets its ``by_done``
    key (``time_key(updated)`` then the id, 8 bytes big-endian); any other, none."""

    __slots__ = ("_codes", "_terminal")

    def __init__(self, codes: Mapping[Any, bytes], terminal: Collection[Any]) -> None:
        self._codes = dict(codes)
        self._terminal = frozenset(terminal)

    def __call__(
        self, job_id: int, state: Any, agent: str, command: str, created: float, updated: float, data: bytes
    ) -> tuple[int, bytes, str, str, float, str, bytes, bytes]:
        done = time_key(updated) + _U64.pack(job_id) if state in self._terminal else b""
        return (job_id, self._codes[state], agent, command, created, "", done, data)
