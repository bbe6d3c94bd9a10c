"""Serializer plugins: how params and results become payload bytes.

A serializer has a small numeric ``id`` that travels in the header's flags
(bits 8-11), so an agent decodes a request with the serializer the client
chose and answers in kind. msgpack is the default; JSON and raw are built in.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Protocol, runtime_checkable

import msgpack

from .errors import ErrorCode, SerializationError

SERIALIZER_SHIFT = 8
SERIALIZER_MASK = 0x0F00


@runtime_checkable
class Serializer(Protocol):
    """What a serializer plugin provides."""

    id: int
    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


def _default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"cannot serialise object of type {type(obj).__name__}")


class MsgpackSerializer:
    """msgpack (default): compact and fast; dataclasses go as maps."""

    id = 0
    name = "msgpack"

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=_default, use_bin_type=True)

    def dumps(self, obj: Any) -> bytes:
        try:
            data: bytes = self._packer.pack(obj)
            return data
        except (TypeError, ValueError, OverflowError) as exc:
            self._packer.reset()
            raise SerializationError(f"msgpack cannot encode: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise SerializationError(
                f"payload is not valid msgpack: {exc}", code=ErrorCode.BAD_PAYLOAD, data=bytes(data)
            ) from exc


class JsonSerializer:
    """JSON (UTF-8): slower, readable, for peers in other languages."""

    id = 1
    name = "json"

    def dumps(self, obj: Any) -> bytes:
        try:
            return json.dumps(obj, default=_default, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"json cannot encode: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SerializationError(
                f"payload is not valid JSON: {exc}", code=ErrorCode.BAD_PAYLOAD, data=bytes(data)
            ) from exc


class RawSerializer:
    """Raw: params and results are bytes-like objects, passed through untouched."""

    id = 2
    name = "raw"

    def dumps(self, obj: Any) -> bytes:
        if obj is None:
            return b""
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj)
        raise SerializationError(f"raw serializer takes bytes-like objects, not {type(obj).__name__}")

    def loads(self, data: bytes) -> Any:
        return bytes(data)


_BUILTIN: dict[str, type[Serializer]] = {
    "msgpack": MsgpackSerializer,
    "json": JsonSerializer,
    "raw": RawSerializer,
}


class SerializerSet:
    """The serializers a client or agent understands, by name and by wire id."""

    def __init__(self, extra: list[Serializer] | None = None) -> None:
        self._by_id: dict[int, Serializer] = {}
        self._by_name: dict[str, Serializer] = {}
        for cls in _BUILTIN.values():
            self.add(cls())
        for s in extra or ():
            self.add(s)

    def add(self, serializer: Serializer) -> None:
        """Register a plugin; its id must be 0-15 and not taken by another name."""
        if not 0 <= serializer.id <= 15:
            raise ValueError(f"serializer id must be 0..15, not {serializer.id}")
        known = self._by_id.get(serializer.id)
        if known is not None and known.name != serializer.name:
            raise ValueError(f"serializer id {serializer.id} is taken by {known.name!r}")
        self._by_id[serializer.id] = serializer
        self._by_name[serializer.name] = serializer

    def get(self, key: str | int | Serializer) -> Serializer:
        """Look a serializer up by name, id or instance; unknown ones raise SerializationError."""
        if isinstance(key, str):
            found = self._by_name.get(key)
        elif isinstance(key, int):
            found = self._by_id.get(key)
        else:
            self.add(key)
            return key
        if found is None:
            raise SerializationError(f"unknown serializer {key!r}")
        return found

    def from_flags(self, flags: int) -> Serializer:
        """The serializer named by a header's flags (once per message: ``get``'s work, inlined)."""
        found = self._by_id.get((flags & SERIALIZER_MASK) >> SERIALIZER_SHIFT)
        if found is None:
            raise SerializationError(f"unknown serializer {(flags & SERIALIZER_MASK) >> SERIALIZER_SHIFT!r}")
        return found


def serializer_flags(serializer: Serializer) -> int:
    """Header flag bits that name ``serializer``."""
    return serializer.id << SERIALIZER_SHIFT


__all__ = [
    "JsonSerializer",
    "MsgpackSerializer",
    "RawSerializer",
    "Serializer",
    "SerializerSet",
    "serializer_flags",
]
