"""Job store on a Redis server (redis-py), every key under one prefix.

Keys (``P`` is the prefix; ``M`` a member: the id as 20 zero-padded digits, so that the
lexicographic order of equal-score members is the numeric order of the ids):

* ``P job:<id>``            string: ``JobRecord.to_bytes()``
* ``P ids``                 sorted set of every M (score 0: paged with ZREVRANGEBYLEX)
* ``P state:<STATE>``, ``P agent:<name>``, ``P command:<name>``   the same, per value
* ``P created``             sorted set, M scored by ``created``
* ``P done``                sorted set, M scored by ``updated``, terminal records only
* ``P idem``                hash: idempotency key -> id
* ``P max_id``              the highest id ever stored
* ``P meta``                hash: ``marker`` -> ``orbitmesh-joblog``, ``version`` -> format version

``write`` WATCHes the records it replaces, then queues every change in one MULTI/EXEC: other
clients see all of it or none of it. Durability is the server's: ``sync`` needs
``appendonly yes`` + ``appendfsync always`` (checked at ``open`` with CONFIG GET), ``batch``
needs ``appendonly yes`` (the server fsyncs about every second; ``flush`` can do no more), and
``none`` checks nothing. ``trust_server_durability=True`` skips the check where CONFIG is
disabled (managed services).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions

from ..errors import ErrorCode, StorageError
from ..models import JobState
from .base import FORMAT_VERSION, JobRecord, JobStore, check_durability
from .common import (
    MAX_ID,
    UNFINISHED_STATES,
    check_id,
    check_query,
    duplicate_key,
    encode_record,
    matches,
    not_open,
    take_page,
)

MARKER = b"orbitmesh-joblog"
_CHUNK = 256  # ids fetched per round trip while paging


def _member(job_id: int) -> bytes:
    return b"%020d" % job_id


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisStore(JobStore):
    """Job store on the Redis server at ``url``, keys under ``prefix``.

    Connecting and every command time out (``socket_timeout`` seconds): an unreachable server is
    StorageError(STORAGE_ERROR) naming the URL, never a hang.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "orbitmesh:",
        durability: str = "sync",
        *,
        trust_server_durability: bool = False,
        socket_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.durability = check_durability(durability)
        self.trust_server_durability = trust_server_durability
        self.socket_timeout = socket_timeout
        self._client: redis.Redis | None = None
        p = prefix.encode()
        self._k_ids = p + b"ids"
        self._k_created = p + b"created"
        self._k_done = p + b"done"
        self._k_idem = p + b"idem"
        self._k_max = p + b"max_id"
        self._k_meta = p + b"meta"
        self._p = p

    def __repr__(self) -> str:
        return f"RedisStore({redact(self.url)!r}, prefix={self.prefix!r}, durability={self.durability!r})"

    # -- keys ---------------------------------------------------------------------------------

    def _k_job(self, job_id: int) -> bytes:
        return self._p + b"job:%d" % job_id

    def _k_state(self, state: JobState) -> bytes:
        return self._p + b"state:" + state.value.encode()

    def _k_agent(self, agent: str) -> bytes:
        return self._p + b"agent:" + agent.encode("utf-8", "surrogatepass")

    def _k_command(self, command: str) -> bytes:
        return self._p + b"command:" + command.encode("utf-8", "surrogatepass")

    def _index_entries(self, rec: JobRecord) -> set[tuple[bytes, bytes, float]]:
        """(sorted set, member, score) for every index that holds ``rec``."""
        m = _member(rec.id)
        entries = {
            (self._k_ids, m, 0.0),
            (self._k_state(rec.state), m, 0.0),
            (self._k_agent(rec.agent), m, 0.0),
            (self._k_command(rec.command), m, 0.0),
            (self._k_created, m, rec.created + 0.0),
        }
        if rec.terminal:
            entries.add((self._k_done, m, rec.updated + 0.0))
        return entries

    # -- errors -------------------------------------------------------------------------------

    def _raise_redis(self, exc: redis.exceptions.RedisError, doing: str) -> NoReturn:
        where = redact(self.url)
        if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            msg = f"Redis at {where} is unreachable {doing}: {exc}"
            raise StorageError(msg, code=ErrorCode.STORAGE_ERROR, path=where) from exc
        text = str(exc)
        code = ErrorCode.STORAGE_FULL if text.startswith("OOM") else ErrorCode.STORAGE_ERROR
        raise StorageError(f"Redis at {where} failed {doing}: {text}", code=code, path=where) from exc

    def _fail(self, message: str, code: ErrorCode) -> NoReturn:
        where = redact(self.url)
        raise StorageError(f"{message}: {where} (prefix {self.prefix!r})", code=code, path=where)

    # -- open / close -------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, check the server's durability for the mode, and check (or create) the job log
        marker: keys under the prefix without one are STORAGE_CORRUPT, another version
        STORAGE_VERSION."""
        if self._client is not None:
            return
        try:
            client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry_on_timeout=False,
            )
        except (ValueError, redis.exceptions.RedisError) as exc:
            raise StorageError(f"bad Redis URL {redact(self.url)}: {exc}", path=redact(self.url)) from exc
        try:
            client.ping()
            self._check_server(client)
            self._check_marker(client)
        except redis.exceptions.RedisError as exc:
            client.close()
            self._raise_redis(exc, "opening")
        except BaseException:
            client.close()
            raise
        self._client = client

    def _check_server(self, client: redis.Redis) -> None:
        if self.durability == "none" or self.trust_server_durability:
            return
        try:
            config = client.config_get("append*")
        except redis.exceptions.ResponseError as exc:
            self._fail(
                f"cannot read the server's persistence settings to check durability={self.durability!r} ({exc}); "
                "pass trust_server_durability=True if the server is configured for it",
                ErrorCode.STORAGE_ERROR,
            )
        settings = {_text(k): _text(v) for k, v in config.items()}
        appendonly, appendfsync = settings.get("appendonly"), settings.get("appendfsync")
        if self.durability == "sync" and (appendonly, appendfsync) != ("yes", "always"):
            self._fail(
                f"durability='sync' needs the Redis server to run with appendonly yes and appendfsync always "
                f"(it has appendonly {appendonly}, appendfsync {appendfsync}); configure the server, choose "
                "durability='batch' or 'none', or pass trust_server_durability=True",
                ErrorCode.STORAGE_ERROR,
            )
        if self.durability == "batch" and appendonly != "yes":
            self._fail(
                f"durability='batch' needs the Redis server to run with appendonly yes (it has appendonly "
                f"{appendonly}); configure the server, choose durability='none', or pass "
                "trust_server_durability=True",
                ErrorCode.STORAGE_ERROR,
            )

    def _check_marker(self, client: redis.Redis) -> None:
        try:
            meta = client.hgetall(self._k_meta)
        except redis.exceptions.ResponseError as exc:  # WRONGTYPE: someone else's key
            self._fail(f"{self._k_meta!r} is not a job log marker ({exc})", ErrorCode.STORAGE_CORRUPT)
        if not meta:
            ours = client.exists(self._k_ids, self._k_idem, self._k_max, self._k_created, self._k_done)
            if ours:
                what = "keys under the prefix but no job log marker (foreign or damaged data)"
                self._fail(what, ErrorCode.STORAGE_CORRUPT)
            client.hsetnx(self._k_meta, "marker", MARKER)
            client.hsetnx(self._k_meta, "version", FORMAT_VERSION)
            meta = client.hgetall(self._k_meta)
        if meta.get(b"marker") != MARKER:
            self._fail(f"{self._k_meta!r} holds no job log marker", ErrorCode.STORAGE_CORRUPT)
        version = meta.get(b"version", b"")
        if version != str(FORMAT_VERSION).encode():
            self._fail(
                f"job log format version {_text(version)}, this orbitmesh reads version {FORMAT_VERSION}",
                ErrorCode.STORAGE_VERSION,
            )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _redis(self) -> redis.Redis:
        client = self._client
        if client is None:
            raise not_open(repr(self))
        return client

    # -- writes -------------------------------------------------------------------------------

    def write(self, records: Sequence[JobRecord], delete: Sequence[int] = ()) -> None:
        """One MULTI/EXEC. Everything is validated and encoded before anything is sent; Redis does
        not roll back a transaction whose commands fail at run time, so none may fail there."""
        encoded = [(rec, encode_record(rec)) for rec in records]
        deletes = [check_id(i) for i in delete]
        if not encoded and not deletes:
            return
        ids = sorted({rec.id for rec, _ in encoded} | set(deletes))
        job_keys = [self._k_job(i) for i in ids]
        idem_keys = sorted({rec.idempotency_key for rec, _ in encoded if rec.idempotency_key})
        client = self._redis()
        try:
            pipe: Any
            with client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._k_idem, self._k_max, *job_keys)
                        self._queue(pipe, encoded, deletes, ids, job_keys, idem_keys)
                        pipe.execute()
                        return
                    except redis.exceptions.WatchError:
                        continue  # another client changed a watched key: read again
        except redis.exceptions.RedisError as exc:
            self._raise_redis(exc, "writing")

    def _queue(
        self,
        pipe: Any,
        encoded: list[tuple[JobRecord, bytes]],
        deletes: list[int],
        ids: list[int],
        job_keys: list[bytes],
        idem_keys: list[str],
    ) -> None:
        """Read (immediate mode, under WATCH) what the write replaces, then queue the changes."""
        current: dict[int, JobRecord | None] = {
            i: None if raw is None else JobRecord.from_bytes(raw)
            for i, raw in zip(ids, pipe.mget(job_keys), strict=True)
        }
        holders: dict[str, int | None] = {}
        if idem_keys:
            for key, raw in zip(idem_keys, pipe.hmget(self._k_idem, idem_keys), strict=True):
                holders[key] = None if raw is None else int(raw)
        max_id = int(pipe.get(self._k_max) or 0)
        pipe.multi()
        top = max_id
        for rec, data in encoded:
            old = current[rec.id]
            stale = self._index_entries(old) if old is not None else set()
            fresh = self._index_entries(rec)
            self._unindex(pipe, stale - fresh)
            self._index(pipe, fresh - stale)
            if old is not None and old.idempotency_key and old.idempotency_key != rec.idempotency_key:
                self._drop_key(pipe, holders, old.idempotency_key, rec.id)
            if rec.idempotency_key:
                holder = holders.get(rec.idempotency_key)
                if holder is not None and holder != rec.id:
                    raise duplicate_key(rec.idempotency_key, holder, rec.id)
                holders[rec.idempotency_key] = rec.id
                pipe.hset(self._k_idem, rec.idempotency_key, rec.id)
            pipe.set(self._k_job(rec.id), data)
            current[rec.id] = rec
            top = max(top, rec.id)
        for job_id in deletes:
            old = current[job_id]
            if old is None:
                continue
            self._unindex(pipe, self._index_entries(old))
            if old.idempotency_key:
                self._drop_key(pipe, holders, old.idempotency_key, job_id)
            pipe.delete(self._k_job(job_id))
            current[job_id] = None
        if top != max_id:
            pipe.set(self._k_max, top)

    def _drop_key(self, pipe: Any, holders: dict[str, int | None], key: str, job_id: int) -> None:
        if key not in holders:
            # Not prefetched (only the batch's new keys are): a key the old record held. The
            # index is consistent, so it maps to this job; HDEL is guarded below anyway.
            holders[key] = job_id
        if holders[key] == job_id:
            holders[key] = None
            pipe.hdel(self._k_idem, key)

    @staticmethod
    def _unindex(pipe: Any, entries: Iterable[tuple[bytes, bytes, float]]) -> None:
        for key, member, _ in entries:
            pipe.zrem(key, member)

    @staticmethod
    def _index(pipe: Any, entries: Iterable[tuple[bytes, bytes, float]]) -> None:
        for key, member, score in entries:
            pipe.zadd(key, {member: score})

    # -- reads --------------------------------------------------------------------------------

    def _call(self, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.exceptions.RedisError as exc:
            self._raise_redis(exc, doing)

    def _load(self, ids: Sequence[int]) -> list[JobRecord]:
        """The records of ``ids`` that still exist, in that order."""
        if not ids:
            return []
        client = self._redis()
        raws = self._call("reading", client.mget, [self._k_job(i) for i in ids])
        return [JobRecord.from_bytes(raw) for raw in raws if raw is not None]

    def get(self, job_id: int) -> JobRecord | None:
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            return None
        raw = self._call("reading", self._redis().get, self._k_job(job_id))
        return None if raw is None else JobRecord.from_bytes(raw)

    def find_key(self, key: str) -> int | None:
        if not key:
            return None
        raw = self._call("reading", self._redis().hget, self._k_idem, key)
        return None if raw is None else int(raw)

    def query(
        self,
        *,
        state: JobState | None = None,
        agent: str | None = None,
        command: str | None = None,
        since: float | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        check_query(limit, cursor)
        if cursor is not None and cursor > MAX_ID:
            cursor = None  # above every id: members past 20 digits would not sort numerically
        client = self._redis()
        keys: list[bytes] = []
        if state is not None:
            keys.append(self._k_state(state))
        if agent is not None:
            keys.append(self._k_agent(agent))
        if command is not None:
            keys.append(self._k_command(command))
        chunks: Iterator[list[int]]
        if keys:
            sizes = self._call("reading", _pipelined, client, [("zcard", (k,)) for k in keys])
            chunks = self._lex_desc(min(zip(sizes, keys, strict=True))[1], cursor, limit + 1)
        elif since is not None:
            members = self._call("reading", client.zrangebyscore, self._k_created, since, "+inf")
            found = sorted((int(m) for m in members), reverse=True)
            if cursor is not None:
                found = [i for i in found if i < cursor]
            chunks = (found[i : i + _CHUNK] for i in range(0, len(found), _CHUNK))
        else:
            chunks = self._lex_desc(self._k_ids, cursor, limit + 1)

        def candidates() -> Iterator[JobRecord]:
            for chunk in chunks:
                for rec in self._load(chunk):
                    if matches(rec, state, agent, command, since):
                        yield rec

        return take_page(candidates(), limit)

    def _lex_desc(self, key: bytes, cursor: int | None, first: int) -> Iterator[list[int]]:
        """Ids in the lex-ordered sorted set ``key``, highest first, below ``cursor``, in chunks."""
        client = self._redis()
        top: bytes = b"+" if cursor is None else b"(" + _member(max(cursor, 0))
        size = max(first, 1)
        while True:
            if cursor is not None and cursor <= 0:
                return
            members = self._call("reading", client.zrevrangebylex, key, top, b"-", 0, size)
            if not members:
                return
            yield [int(m) for m in members]
            if len(members) < size:
                return
            top = b"(" + members[-1]
            size = _CHUNK

    def unfinished(self) -> list[JobRecord]:
        client = self._redis()
        calls = [("zrange", (self._k_state(s), 0, -1)) for s in UNFINISHED_STATES]
        ids = sorted({int(m) for members in self._call("reading", _pipelined, client, calls) for m in members})
        out: list[JobRecord] = []
        for i in range(0, len(ids), _CHUNK):
            out.extend(self._load(ids[i : i + _CHUNK]))
        return out

    def terminal_before(self, updated_before: float, limit: int) -> list[int]:
        if limit <= 0:
            return []
        # Equal scores order by member, i.e. by id (zero-padded): the (updated, id) order.
        members = self._call(
            "reading", self._redis().zrangebyscore, self._k_done, "-inf", f"({updated_before!r}", 0, limit
        )
        return [int(m) for m in members]

    def counts(self) -> dict[JobState, int]:
        states = list(JobState)
        sizes = self._call("reading", _pipelined, self._redis(), [("zcard", (self._k_state(s),)) for s in states])
        return {s: int(n) for s, n in zip(states, sizes, strict=True)}

    def max_id(self) -> int:
        return int(self._call("reading", self._redis().get, self._k_max) or 0)


def _pipelined(client: redis.Redis, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """Several read commands in one round trip (no transaction needed: each reads one key)."""
    with client.pipeline(transaction=False) as pipe:
        for name, args in calls:
            getattr(pipe, name)(*args)
        return list(pipe.execute())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
