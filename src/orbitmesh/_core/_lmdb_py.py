"""LMDB through py-lmdb: the pure-Python core's binding, and the reference ``_lmdb_c`` follows
(the same names, arguments and behaviour, for the part of the API the job store uses)."""

from __future__ import annotations

from lmdb import (
    CorruptedError,
    DiskError,
    Error,
    InvalidError,
    MapFullError,
    MapResizedError,
    NotFoundError,
    PageNotFoundError,
    ReadonlyError,
    VersionMismatchError,
    open,
)
from lmdb import version as _version

BINDING = "py-lmdb " + ".".join(map(str, _version()))

__all__ = [
    "BINDING",
    "CorruptedError",
    "DiskError",
    "Error",
    "InvalidError",
    "MapFullError",
    "MapResizedError",
    "NotFoundError",
    "PageNotFoundError",
    "ReadonlyError",
    "VersionMismatchError",
    "open",
]
public_api = __all__
