"""Wire protocol constants: header layout, message kinds, flags, route types, packed framing.

The authoritative description, with byte offsets, is ``docs/protocol.md``.
Everything here is plain data shared by the compiled core, its pure-Python
twin and the Python layers above them.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import NamedTuple

MAGIC = b"OM"
MAGIC_U16 = 0x4D4F  # b"OM" read as little-endian u16
VERSION = 1  # the header's version byte: the messages (kinds, frames) of protocol 1
PROTOCOL = 2  # the newest protocol spoken: 2 is protocol 1's messages in packed framing
PACKED_VERSION = 2  # header byte 2 of a packed header frame
HEADER_SIZE = 40
TOKEN_SIZE = 8
# Packed framing (protocol 2): the header frame carries the parts after it inline, each as a
# u32 length and its bytes, while the frame stays within PACK_LIMIT bytes; the rest follow as
# frames of their own (large payloads travel without a copy). Header byte 12 = parts inline.
PACK_LIMIT = 4096

# Limits the broker enforces before anything else reads a message.
MAX_FRAMES = 64
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class Kind(IntEnum):
    """Message kinds (header byte 3)."""

    HELLO = 1
    WELCOME = 2
    HEARTBEAT = 3
    REQUEST = 4
    ACCEPTED = 5
    RUNNING = 6
    REPLY = 7
    STREAM_ITEM = 8
    STREAM_END = 9
    ERROR = 10
    CANCEL = 11
    RAW = 12
    EVENT = 13
    BYE = 14
    CREDIT = 15
    QUERY = 16


KIND_MAX = max(Kind)


class Flag(IntFlag):
    """Header flag bits (header bytes 4-5)."""

    NONE = 0
    TRACKED = 0x0001  # execute: a job the broker tracks
    STREAM = 0x0002  # the request expects a stream of items
    DRAIN = 0x0004  # BYE: stop routing new work, the peer is draining
    RAW_REPLY = 0x0008  # REPLY payload is raw bytes, not serialised


# The same bits as plain ints, for hot paths: IntFlag arithmetic builds enum members (~1 us).
F_TRACKED = int(Flag.TRACKED)
F_STREAM = int(Flag.STREAM)
F_DRAIN = int(Flag.DRAIN)
F_RAW_REPLY = int(Flag.RAW_REPLY)


class Route(IntEnum):
    """Route frame type byte for REQUEST / RAW sent by a client."""

    NAME = 1  # key: agent name (utf-8)
    CAPABILITY = 2  # key: capability
    GROUP = 3  # key: group
    COMMAND = 4  # any agent serving the request's command (no key)
    LABELS = 5  # key: msgpack map of label -> value (resolved by the control plane)


class Strategy(IntEnum):
    """Selection strategy byte in the route frame."""

    LEAST_LOADED = 0
    ROUND_ROBIN = 1
    RANDOM = 2


class Header(NamedTuple):
    """A decoded 40-byte frame header."""

    version: int
    kind: int
    flags: int
    code: int
    aux: int
    corr: int
    job: int
    deadline: int


class Role(IntEnum):
    """What a peer says it is in HELLO (header aux)."""

    CLIENT = 1
    AGENT = 2


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "F_DRAIN",
    "F_RAW_REPLY",
    "F_STREAM",
    "F_TRACKED",
    "HEADER_SIZE",
    "KIND_MAX",
    "MAGIC",
    "MAGIC_U16",
    "MAX_FRAMES",
    "PACKED_VERSION",
    "PACK_LIMIT",
    "PROTOCOL",
    "TOKEN_SIZE",
    "VERSION",
    "Flag",
    "Header",
    "Kind",
    "Role",
    "Route",
    "Strategy",
]
