"""Job storage plugins behind one interface (:class:`JobStore`).

``open_store(url)`` picks one by URL: ``lmdb:///dir`` (or a bare path; the default),
``sqlite:///file.db``, ``redis://host:port/db``, ``memory://``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import DURABILITY_MODES, FORMAT_VERSION, JobRecord, JobStore, check_durability
from .lmdb_store import LmdbStore
from .memory_store import MemoryStore
from .sqlite_store import SqliteStore

if TYPE_CHECKING:
    from .redis_store import RedisStore


def __getattr__(name: str) -> Any:
    # redis-py is an optional dependency (the ``redis`` extra): import it only when asked for.
    if name == "RedisStore":
        return _redis_store()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str, durability: str = "sync") -> JobStore:
    """Make and open the store ``url`` names, in ``durability`` mode (``sync``, ``batch``, ``none``).

    ``lmdb://`` and ``sqlite://`` take the path after the ``//`` (``lmdb:///var/lib/om`` is
    absolute, ``lmdb://data/om`` relative); a URL without a scheme is an LMDB directory.
    ``redis://`` / ``rediss://`` URLs go to redis-py, but for an optional ``?prefix=`` for the
    keys (default ``orbitmesh:``). Raises ValueError for an
    unknown scheme or mode, StorageError if the store cannot be opened.
    """
    check_durability(durability)
    scheme, sep, rest = url.partition("://")
    store: JobStore
    if not sep:
        store = LmdbStore(url, durability)
    elif scheme == "lmdb":
        store = LmdbStore(_path(url, rest), durability)
    elif scheme == "sqlite":
        store = SqliteStore(_path(url, rest), durability)
    elif scheme in ("redis", "rediss", "unix"):
        url, prefix = _pop_prefix(url)
        store = _redis_store()(url, prefix if prefix is not None else "orbitmesh:", durability)
    elif scheme == "memory":
        store = MemoryStore(durability)
    else:
        raise ValueError(f"unknown job store URL scheme {scheme!r} in {url!r} (lmdb, sqlite, redis, memory)")
    store.open()
    return store


def _redis_store() -> type[RedisStore]:
    try:
        from .redis_store import RedisStore
    except ImportError as exc:
        raise ImportError(f"the Redis job store needs redis-py: pip install 'orbitmesh[redis]' ({exc})") from exc
    return RedisStore


def _pop_prefix(url: str) -> tuple[str, str | None]:
    """``url`` without its ``prefix=`` query parameter (ours, not redis-py's), and that prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [v for k, v in query if k == "prefix"]
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), (prefixes[-1] if prefixes else None)


def _path(url: str, rest: str) -> str:
    if not rest:
        raise ValueError(f"no path in job store URL {url!r}")
    return rest


__all__ = [
    "DURABILITY_MODES",
    "FORMAT_VERSION",
    "JobRecord",
    "JobStore",
    "LmdbStore",
    "MemoryStore",
    "RedisStore",  # resolved lazily by __getattr__
    "SqliteStore",
    "check_durability",
    "open_store",
]
