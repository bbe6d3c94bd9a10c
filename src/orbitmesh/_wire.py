"""Helpers the Python layers (client, agent, control plane) share to build and read messages."""

from __future__ import annotations

import struct
import time
import traceback as _tb
from typing import Any

import msgpack

from .errors import ErrorCode, OrbitMeshError, RemoteError, error_for_code
from .protocol import Kind

HDR = struct.Struct("<2sBBHHIIQQQ")
_pack = HDR.pack
EMPTY = b""


def header(
    kind: int, flags: int = 0, code: int = 0, aux: int = 0, corr: int = 0, job: int = 0, deadline: int = 0
) -> bytes:
    """A v1 header (fields must be in range; the codec in ``_core.frame`` validates)."""
    return _pack(b"OM", 1, kind, flags, code, aux, 0, corr, job, deadline)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def error_message(
    code: int,
    corr: int,
    message: str,
    *,
    job: int = 0,
    route: bytes = EMPTY,
    exc: BaseException | None = None,
    agent: str = "",
) -> list[bytes]:
    """ERROR frames: [hdr, route, message] plus a msgpack details frame for a handler exception."""
    frames = [header(Kind.ERROR, code=code, corr=corr, job=job), route, message.encode("utf-8", "replace")]
    if exc is not None:
        details = {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "traceback": "".join(_tb.format_exception(type(exc), exc, exc.__traceback__)),
            "agent": agent,
        }
        frames.append(msgpack.packb(details))
    return frames


def parse_error(code: int, frames: list[Any]) -> OrbitMeshError:
    """The exception an ERROR message stands for (frames = [hdr, route, message, details?])."""
    message = bytes(frames[2]).decode("utf-8", "replace") if len(frames) > 2 else ""
    extra: dict[str, str] = {}
    if len(frames) > 3:
        try:
            details = msgpack.unpackb(bytes(frames[3]), raw=False)
            if isinstance(details, dict):
                extra = {
                    "remote_type": str(details.get("type", "")),
                    "traceback": str(details.get("traceback", "")),
                    "agent": str(details.get("agent", "")),
                }
        except Exception:  # a bad details frame must not hide the error itself
            extra = {}
    exc = error_for_code(code, message, **extra) if extra else error_for_code(code, message)
    if isinstance(exc, RemoteError) and not extra:
        return RemoteError(message, code=code)
    return exc


__all__ = ["HDR", "ErrorCode", "error_message", "header", "parse_error", "wall_ms"]
