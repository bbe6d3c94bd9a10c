"""The default job store: one LMDB environment, every index updated in the record's write txn.

Layout (named databases in one environment directory):

* ``jobs``        id (8-byte big-endian) -> ``JobRecord.to_bytes()``
* ``idem``        idempotency key -> id
* ``by_state``    state code (1 byte) -> id, dupsort
* ``by_agent``    agent key -> id, dupsort
* ``by_command``  command key -> id, dupsort
* ``by_time``     created (8 bytes, order-preserving double) + id -> empty
* ``by_done``     updated (same) + id -> empty, terminal records only (retention without a scan)
* ``meta``        ``orbitmesh-joblog`` -> format version; ``max_id`` -> highest id ever stored

String keys are ``b"="`` + UTF-8, or ``b"#"`` + SHA-256 when longer than LMDB's key limit
allows (UTF-8 never contains 0xFF, and the prefix also makes the empty string a valid key).
Times are indexed as exact doubles rather than milliseconds, so ``since`` and the retention
order compare exactly what the record holds.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NoReturn

from .._core import lmdbapi
from .._core.handoff import merge
from .._core.record import PreparedRows, time_key
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

log = logging.getLogger("orbitmesh.storage")

MARKER = b"orbitmesh-joblog"
_MAX_ID_KEY = b"max_id"
# The databases a record's write puts to, in the order of _writers' puts and queue_records' dbs.
_WRITTEN = (b"by_state", b"by_agent", b"by_command", b"by_time", b"by_done", b"jobs")
_DB_FLAGS: dict[bytes, dict[str, bool]] = {
    b"jobs": {},
    b"idem": {},
    b"by_state": {"dupsort": True, "dupfixed": True},
    b"by_agent": {"dupsort": True, "dupfixed": True},
    b"by_command": {"dupsort": True, "dupfixed": True},
    b"by_time": {},
    b"by_done": {},
    b"meta": {},
}
# Stable on disk (the format version covers it): never derive these from the enum's order.
_STATE_CODE: dict[JobState, bytes] = {
    JobState.PENDING: b"\x01",
    JobState.DISPATCHED: b"\x02",
    JobState.RUNNING: b"\x03",
    JobState.SUCCEEDED: b"\x04",
    JobState.FAILED: b"\x05",
    JobState.CANCELLED: b"\x06",
    JobState.TIMED_OUT: b"\x07",
    JobState.LOST: b"\x08",
}
assert set(_STATE_CODE) == set(JobState), "every JobState needs an on-disk code"
_TERMINAL = frozenset(state for state in JobState if state.terminal)

_U64 = struct.Struct(">Q")
_VERSION = struct.Struct(">I")
_KEY_LIMIT = 400  # below LMDB's 511-byte default key limit, with room for the prefix
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _be(n: int) -> bytes:
    return _U64.pack(n)


def _str_key(s: str) -> bytes:
    key = _STR_KEYS.get(s)
    if key is None:
        raw = s.encode("utf-8", "surrogatepass")
        key = b"=" + raw if len(raw) <= _KEY_LIMIT else b"#" + hashlib.sha256(raw).digest()
        if len(s) <= 64:  # agent and command names repeat: keep theirs (bounded)
            if len(_STR_KEYS) >= 4096:
                _STR_KEYS.clear()
            _STR_KEYS[s] = key
    return key


_STR_KEYS: dict[str, bytes] = {}


_time_key = time_key  # 8 bytes that sort like the doubles they encode


# What the indexes hold for a record as last written: state code, agent, command, created,
# idempotency key, ``by_done`` key (empty unless terminal).
_Indexed = tuple[bytes, str, str, float, str, bytes]
# A record as ``write_prepared`` takes it: id, then ``_Indexed``'s fields, then the encoded record.
Prepared = tuple[int, bytes, str, str, float, str, bytes, bytes]


def _indexed(rec: JobRecord) -> _Indexed:
    done = _time_key(rec.updated) + _be(rec.id) if rec.state.terminal else b""
    return (_STATE_CODE[rec.state], rec.agent, rec.command, rec.created, rec.idempotency_key, done)


class _Gate:
    """Readers share; resizing the map (or closing) waits for them to finish and holds off new
    ones: LMDB forbids ``mdb_env_set_mapsize`` while this process has a transaction open."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class LmdbStore(JobStore):
    """Job store in an LMDB environment directory ``path`` (created if absent).

    ``durability``: ``sync`` fsyncs every commit; ``batch`` commits without fsync and ``flush``
    forces one; ``none`` never syncs. The memory map starts at ``map_size`` bytes and doubles
    whenever a write needs more, up to ``max_map_size`` (then StorageError(STORAGE_FULL)).
    Writes come from one thread at a time (serialised by a lock); any thread may read.
    ``binding``: the LMDB binding (default ``_core.lmdbapi``: the system's liblmdb through the
    compiled core where it was built, else py-lmdb); ``self.binding`` names the one in use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        durability: str = "sync",
        *,
        map_size: int = 64 << 20,
        max_map_size: int = 1 << 40,
        binding: ModuleType | None = None,
    ) -> None:
        if map_size <= 0 or max_map_size < map_size:
            raise ValueError(f"need 0 < map_size <= max_map_size, got {map_size} and {max_map_size}")
        # The LMDB binding (``_core.lmdbapi``: liblmdb compiled, or py-lmdb): one per process in
        # practice, since LMDB forbids opening one environment twice in a process.
        self._lmdb: Any = lmdbapi if binding is None else binding
        self.binding: str = self._lmdb.BINDING
        b = self._lmdb
        self._corrupt = (b.CorruptedError, b.PageNotFoundError, b.InvalidError, b.VersionMismatchError)
        self.path = os.fspath(path)
        self.durability = check_durability(durability)
        self.map_size = map_size
        self.max_map_size = max_map_size
        self._env: Any = None
        self._dbs: dict[bytes, Any] = {}
        # Index entries and idempotency key of each live (non-terminal) record as last written:
        # a replace then needs no read and decode of the old record (the writer's main cost).
        self._live_index: dict[int, _Indexed] = {}
        self._gate = _Gate()
        self._write_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LmdbStore({self.path!r}, durability={self.durability!r})"

    # -- errors -------------------------------------------------------------------------------

    def _fail(self, message: str, code: ErrorCode) -> NoReturn:
        raise StorageError(f"{message}: {self.path}", code=code, path=self.path)

    def _raise_lmdb(self, exc: Exception, doing: str) -> NoReturn:
        b = self._lmdb
        if isinstance(exc, (b.DiskError, b.MapFullError)) or getattr(exc, "code", None) in _FULL_ERRNOS:
            what = f"no space left {doing} {self.path}: {exc}"
            raise StorageError(what, code=ErrorCode.STORAGE_FULL, path=self.path) from exc
        if isinstance(exc, self._corrupt):
            code, what = ErrorCode.STORAGE_CORRUPT, "damaged job log"
        else:
            code, what = ErrorCode.STORAGE_ERROR, "LMDB failed"
        raise StorageError(f"{what} {doing} {self.path}: {exc}", code=code, path=self.path) from exc

    # -- open / close -------------------------------------------------------------------------

    def open(self) -> None:
        """Open or create the environment; StorageError(STORAGE_CORRUPT) for a directory that is
        not a job log (damaged, truncated, foreign), STORAGE_VERSION for another format version.
        Such a directory is only read, never written."""
        if self._env is not None:
            return
        fresh = self._probe()
        flags = {
            "sync": {"sync": True, "metasync": True},
            "batch": {"sync": False, "metasync": True},
            "none": {"sync": False, "metasync": False},
        }[self.durability]
        try:
            env = self._lmdb.open(
                self.path,
                map_size=self.map_size,
                subdir=True,
                max_dbs=len(_DB_FLAGS) + 4,
                writemap=False,  # with the async modes an OS crash could corrupt a writemap file
                map_async=False,
                readahead=False,  # random access to a log bigger than RAM: readahead only evicts
                **flags,
            )
        except self._lmdb.Error as exc:
            self._raise_lmdb(exc, "opening")
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name, txn=txn, **kw) for name, kw in _DB_FLAGS.items()}
                if fresh:
                    txn.put(MARKER, _VERSION.pack(FORMAT_VERSION), db=dbs[b"meta"])
                    txn.put(_MAX_ID_KEY, _be(0), db=dbs[b"meta"])
        except self._lmdb.Error as exc:
            env.close()
            self._raise_lmdb(exc, "opening")
        self._env, self._dbs = env, dbs
        log.info("job log %s open (%s, %s)", self.path, self.durability, self.binding)

    def _probe(self) -> bool:
        """Check what is at ``path`` without changing it; True for nothing (create a new log)."""
        try:
            return self._probe_path()
        except OSError as exc:  # permissions, I/O: not a verdict on the data
            raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc

    def _probe_path(self) -> bool:
        if not os.path.exists(self.path):
            os.makedirs(self.path)
            return True
        if not os.path.isdir(self.path):
            self._fail("not a job log directory (a file is in the way)", ErrorCode.STORAGE_CORRUPT)
        entries = set(os.listdir(self.path))
        data_file = os.path.join(self.path, "data.mdb")
        if "data.mdb" not in entries:
            others = sorted(entries - {"lock.mdb"})
            if others:
                shown = ", ".join(others[:5])
                self._fail(f"not an LMDB environment (no data.mdb; holds {shown})", ErrorCode.STORAGE_CORRUPT)
            return True
        size = os.path.getsize(data_file)
        if size == 0:
            self._fail("data.mdb is empty (truncated job log)", ErrorCode.STORAGE_CORRUPT)
        needed = _committed_size(data_file)
        if needed is not None and size < needed:
            # Reading the missing pages through the memory map would kill the process (SIGBUS).
            self._fail(
                f"data.mdb is truncated ({size} bytes, its last commit needs {needed})", ErrorCode.STORAGE_CORRUPT
            )
        # Read-only and without the lock file: a foreign or damaged directory stays byte-identical.
        try:
            env = self._lmdb.open(self.path, readonly=True, lock=False, max_dbs=len(_DB_FLAGS) + 4, subdir=True)
        except self._lmdb.Error as exc:
            if "already open" in str(exc):
                self._fail("the job log is already open in this process", ErrorCode.STORAGE_ERROR)
            if not isinstance(exc, self._corrupt):
                self._fail(f"cannot read data.mdb ({exc})", ErrorCode.STORAGE_ERROR)
            self._fail(f"data.mdb is not a readable LMDB file, damaged or truncated ({exc})", ErrorCode.STORAGE_CORRUPT)
        try:
            with env.begin() as txn:
                names = [key for key, _ in txn.cursor()]
            if not names:
                return True  # an empty environment (ours interrupted before its first commit)
            if b"meta" not in names:
                shown = ", ".join(repr(n) for n in names[:5])
                self._fail(f"a foreign LMDB environment, not a job log (holds {shown})", ErrorCode.STORAGE_CORRUPT)
            meta = env.open_db(b"meta", create=False)
            with env.begin(db=meta) as txn:
                version = txn.get(MARKER)
        except self._lmdb.Error as exc:
            self._fail(f"a damaged or foreign LMDB environment ({exc})", ErrorCode.STORAGE_CORRUPT)
        finally:
            env.close()
        if version is None:
            self._fail("a foreign LMDB environment without the job log marker", ErrorCode.STORAGE_CORRUPT)
        if len(version) != _VERSION.size:
            self._fail(f"unreadable job log marker {version!r}", ErrorCode.STORAGE_CORRUPT)
        (found,) = _VERSION.unpack(version)
        if found != FORMAT_VERSION:
            self._fail(
                f"job log format version {found}, this orbitmesh reads version {FORMAT_VERSION}",
                ErrorCode.STORAGE_VERSION,
            )
        return False

    def close(self) -> None:
        if self._env is None:
            return
        with self._write_lock, self._gate.exclusive():
            self._live_index.clear()
            env, self._env = self._env, None
            if env is None:
                return
            try:
                if self.durability == "batch":
                    env.sync(True)
            except self._lmdb.Error as exc:
                self._raise_lmdb(exc, "flushing")
            finally:
                env.close()
                self._dbs = {}

    def flush(self) -> None:
        """``batch``: fsync what was committed (``env.sync()`` without force does nothing there)."""
        if self.durability != "batch":
            return
        env = self._check_env()
        try:
            env.sync(True)
        except self._lmdb.Error as exc:
            self._raise_lmdb(exc, "flushing")

    def _check_env(self) -> Any:
        env = self._env
        if env is None:
            raise not_open(repr(self))
        return env

    # -- writes -------------------------------------------------------------------------------

    def write(self, records: Sequence[JobRecord], delete: Sequence[int] = ()) -> None:
        self.write_prepared([self.prepare(rec) for rec in records], delete)

    def prepare(self, record: JobRecord) -> Prepared:
        """``record`` as the writer needs it: its encoded bytes and what its indexes hold. Taken on
        the caller's thread, this is the snapshot (no copy of the record, and the encoding is
        off the writer's share). Raises ValueError for a record no store may hold."""
        data = encode_record(record)
        state = record.state
        job_id = record.id
        done = _time_key(record.updated) + _U64.pack(job_id) if state in _TERMINAL else b""
        key = record.idempotency_key
        return (job_id, _STATE_CODE[state], record.agent, record.command, record.created, key, done, data)

    # ``prepare`` from the parts (the common-path job table's records): no decode, no encode; a
    # compiled call (the twins: _core/record), as the control plane makes two per job: a
    # callable object (no self) with the signature of the method it replaces.
    prepare_encoded = PreparedRows(_STATE_CODE, _TERMINAL)

    def write_prepared(self, items: Sequence[Prepared], delete: Sequence[int] = ()) -> None:
        """Write ``prepare`` output and delete ``delete`` ids, with every index, in one transaction."""
        deletes = [check_id(i) for i in delete]
        if not items and not deletes:
            return
        with self._write_lock:
            while True:
                env = self._check_env()
                try:
                    txn = env.begin(write=True)
                except self._lmdb.MapResizedError:  # another process grew the map: adopt its size
                    with self._gate.exclusive():
                        env.set_mapsize(0)
                    continue
                except self._lmdb.Error as exc:
                    self._raise_lmdb(exc, "writing")
                try:
                    cache = self._apply(txn, items, deletes)
                    txn.commit()
                    merge(self._live_index, cache)  # a terminal record's entry (None) removed
                    return
                except self._lmdb.MapFullError:
                    self._abort(txn, grow=True)
                except self._lmdb.MapResizedError:  # another process grew the map: adopt its size
                    self._abort(txn, adopt=True)
                except self._lmdb.Error as exc:
                    self._abort(txn)
                    self._raise_lmdb(exc, "writing")
                except BaseException:
                    self._abort(txn)
                    raise

    def _abort(self, txn: Any, *, grow: bool = False, adopt: bool = False) -> None:
        """Abort a write txn with no read in flight: py-lmdb 3.0's abort waits for a moment when
        no other thread is inside the environment, which busy readers can postpone for ever (a
        commit does not wait). The same quiet moment is when the map may be resized."""
        env = self._check_env()
        with self._gate.exclusive():
            txn.abort()
            if adopt:
                env.set_mapsize(0)
            if grow:
                current = int(env.info()["map_size"])
                if current >= self.max_map_size:
                    self._fail(f"job log reached max_map_size ({self.max_map_size} bytes)", ErrorCode.STORAGE_FULL)
                try:
                    env.set_mapsize(min(current * 2, self.max_map_size))
                except self._lmdb.Error as exc:
                    self._raise_lmdb(exc, "growing the map")

    def _index_entries(self, rec: JobRecord) -> list[tuple[Any, bytes, bytes]]:
        """(database, key, value) of every index entry for ``rec``."""
        dbs = self._dbs
        rid = _be(rec.id)
        entries = [
            (dbs[b"by_state"], _STATE_CODE[rec.state], rid),
            (dbs[b"by_agent"], _str_key(rec.agent), rid),
            (dbs[b"by_command"], _str_key(rec.command), rid),
            (dbs[b"by_time"], _time_key(rec.created) + rid, b""),
        ]
        if rec.terminal:
            entries.append((dbs[b"by_done"], _time_key(rec.updated) + rid, b""))
        return entries

    def _apply(self, txn: Any, items: Sequence[Prepared], deletes: list[int]) -> dict[int, _Indexed | None]:
        """Write in ``txn``; returns the updates to ``_live_index``, applied once it commits.

        Per record only the index entries that changed are touched (all of them for a new
        record): a job that goes from PENDING to SUCCEEDED costs one state move, one ``by_done``
        entry and the record itself."""
        cache: dict[int, _Indexed | None] = {}
        dbs = self._dbs
        max_id = _U64.unpack(txn.get(_MAX_ID_KEY, db=dbs[b"meta"]))[0]
        writers = self._writers(txn)
        queue_records = getattr(txn, "queue_records", None)
        if queue_records is None:
            top = self._apply_items(txn, writers, cache, items, max_id)
        else:
            # The compiled binding's loop: the common records queued in C (the GIL held 0.20 us
            # per record, against 0.54 in _apply_items), any other handed back to it in its turn.
            top = queue_records(
                items if items.__class__ is list else list(items),
                self._live_index,
                cache,
                tuple(dbs[name] for name in _WRITTEN),
                max_id,
                _str_key,
                _STR_KEYS,
                _time_key,
                lambda batch, top: self._apply_items(txn, writers, cache, batch, top),
            )
        delete = writers[1]
        for job_id in deletes:
            rid = _be(job_id)
            raw = txn.pop(rid, db=dbs[b"jobs"])
            if raw is None:
                continue
            old = JobRecord.from_bytes(raw)
            for db, ikey, value in self._index_entries(old):
                delete(ikey, value, db=db)
            if old.idempotency_key:
                self._drop_key(txn, old.idempotency_key, rid)
            cache[job_id] = None
        if top != max_id:
            writers[0](_MAX_ID_KEY, _be(top), db=dbs[b"meta"])  # queued too, with the compiled binding
        return cache

    def _writers(self, txn: Any) -> tuple[Callable[..., Any], ...]:
        """put, delete, then the puts to by_state, by_agent, by_command, by_time, by_done, jobs."""
        dbs = self._dbs
        later = getattr(txn, "later", None)
        if later is None:  # py-lmdb: each write is made at once (and releases the GIL)
            # A cursor's put skips Transaction.put's argument parsing (~0.1 us each, ~5 per record).
            return (txn.put, txn.delete, *(txn.cursor(dbs[name]).put for name in _WRITTEN))
        # The compiled binding queues the writes and makes them, in order, without the GIL at the
        # commit (or at the next read through txn): the control plane keeps the GIL meanwhile.
        return (txn.put_later, txn.delete_later, *(later(dbs[name]).put for name in _WRITTEN))

    def _apply_items(
        self,
        txn: Any,
        writers: tuple[Callable[..., Any], ...],
        cache: dict[int, _Indexed | None],
        items: Sequence[Prepared],
        top: int,
    ) -> int:
        """``_apply``'s loop over ``items``; returns the highest id written (or ``top``)."""
        live = self._live_index
        dbs = self._dbs
        jobs, idem = dbs[b"jobs"], dbs[b"idem"]
        by_state, by_agent, by_command, by_time, by_done = (dbs[name] for name in _WRITTEN[:5])
        put, delete, put_state, put_agent, put_command, put_time, put_done, put_job = writers
        pack_id = _U64.pack
        for job_id, state, agent, command, created, key, done, data in items:
            if job_id.__class__ is not int or not 0 < job_id <= MAX_ID:
                check_id(job_id)  # prepare checked it: this is for a hand-made item
            rid = pack_id(job_id)
            known = cache[job_id] if job_id in cache else live.get(job_id)
            if known is None and job_id <= top:  # above every id stored so far (this txn too): new
                raw = txn.get(rid, db=jobs)
                if raw is not None:
                    known = _indexed(JobRecord.from_bytes(raw))
            if known is None:
                put_state(state, rid)
                put_agent(_str_key(agent), rid)
                put_command(_str_key(command), rid)
                put_time(_time_key(created) + rid, b"")
                old_key = ""
            else:
                old_state, old_agent, old_command, old_created, old_key, old_done = known
                if old_state != state:
                    delete(old_state, rid, db=by_state)
                    put_state(state, rid)
                if old_agent != agent:
                    delete(_str_key(old_agent), rid, db=by_agent)
                    put_agent(_str_key(agent), rid)
                if old_command != command:
                    delete(_str_key(old_command), rid, db=by_command)
                    put_command(_str_key(command), rid)
                if old_created != created:
                    delete(_time_key(old_created) + rid, b"", db=by_time)
                    put_time(_time_key(created) + rid, b"")
                if old_done and old_done != done:
                    delete(old_done, b"", db=by_done)
                if old_key and old_key != key:
                    self._drop_key(txn, old_key, rid)
            if done and (known is None or known[5] != done):
                put_done(done, b"")
            if key and key != old_key:  # a key this record did not hold yet
                ikey = _str_key(key)
                holder = txn.get(ikey, db=idem)
                if holder is not None and holder != rid:
                    raise duplicate_key(key, _U64.unpack(holder)[0], job_id)
                if holder is None:
                    put(ikey, rid, db=idem)
            cache[job_id] = (state, agent, command, created, key, done) if not done else None
            put_job(rid, data)
            if job_id > top:
                top = job_id
        return top

    def _drop_key(self, txn: Any, key: str, rid: bytes) -> None:
        ikey = _str_key(key)
        if txn.get(ikey, db=self._dbs[b"idem"]) == rid:
            txn.delete(ikey, db=self._dbs[b"idem"])

    # -- reads --------------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A read txn of this thread's own, under the shared side of the resize gate."""
        with self._gate.shared():
            env = self._check_env()
            try:
                with env.begin() as txn:
                    yield txn
            except self._lmdb.Error as exc:
                self._raise_lmdb(exc, "reading")

    def _load(self, txn: Any, rid: bytes) -> JobRecord | None:
        raw = txn.get(rid, db=self._dbs[b"jobs"])
        return None if raw is None else JobRecord.from_bytes(raw)

    def get(self, job_id: int) -> JobRecord | None:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 <= job_id < 1 << 64:
            return None
        with self._read() as txn:
            return self._load(txn, _be(job_id))

    def find_key(self, key: str) -> int | None:
        if not key:
            return None
        with self._read() as txn:
            rid = txn.get(_str_key(key), db=self._dbs[b"idem"])
        return None if rid is None else int(_U64.unpack(rid)[0])

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
        below = None if cursor is None else max(0, min(cursor, 1 << 63))
        with self._read() as txn:
            ids = self._candidates(txn, state, agent, command, since, below)
            found = (
                rec
                for rec in (self._load(txn, rid) for rid in ids)
                if rec is not None and matches(rec, state, agent, command, since)
            )
            return take_page(found, limit)

    def _candidates(
        self,
        txn: Any,
        state: JobState | None,
        agent: str | None,
        command: str | None,
        since: float | None,
        below: int | None,
    ) -> Iterator[bytes]:
        """Ids (big-endian) that may match, highest first: from the smallest equality index given,
        else the time index for ``since``, else every job."""
        dbs = self._dbs
        options: list[tuple[bytes, bytes]] = []
        if state is not None:
            options.append((b"by_state", _STATE_CODE[state]))
        if agent is not None:
            options.append((b"by_agent", _str_key(agent)))
        if command is not None:
            options.append((b"by_command", _str_key(command)))
        if options:
            best: tuple[int, Any, bytes] | None = None
            for name, key in options:
                cur = txn.cursor(dbs[name])
                size = cur.count() if cur.set_key(key) else 0
                if best is None or size < best[0]:
                    best = (size, cur, key)
            assert best is not None
            return _dups_desc(best[1], best[2], below)
        if since is not None:
            cur = txn.cursor(dbs[b"by_time"])
            found: list[bytes] = []
            if cur.set_range(_time_key(since)):
                found = [key[8:] for key in cur.iternext(keys=True, values=False)]
            if below is not None:
                limit_key = _be(below)
                found = [rid for rid in found if rid < limit_key]
            found.sort(reverse=True)
            return iter(found)
        return _keys_desc(txn.cursor(dbs[b"jobs"]), below)

    def unfinished(self) -> list[JobRecord]:
        with self._read() as txn:
            cur = txn.cursor(self._dbs[b"by_state"])
            ids: list[bytes] = []
            for state in UNFINISHED_STATES:
                if cur.set_key(_STATE_CODE[state]):
                    ids.extend(cur.iternext_dup(keys=False, values=True))
            ids.sort()
            return [rec for rec in (self._load(txn, rid) for rid in ids) if rec is not None]

    def terminal_before(self, updated_before: float, limit: int) -> list[int]:
        if limit <= 0:
            return []
        end = _time_key(updated_before)
        out: list[int] = []
        with self._read() as txn:
            cur = txn.cursor(self._dbs[b"by_done"])
            if not cur.first():
                return out
            for key in cur.iternext(keys=True, values=False):
                if key[:8] >= end or len(out) >= limit:
                    break
                out.append(_U64.unpack(key[8:])[0])
        return out

    def counts(self) -> dict[JobState, int]:
        with self._read() as txn:
            cur = txn.cursor(self._dbs[b"by_state"])
            return {state: cur.count() if cur.set_key(code) else 0 for state, code in _STATE_CODE.items()}

    def max_id(self) -> int:
        with self._read() as txn:
            return int(_U64.unpack(txn.get(_MAX_ID_KEY, db=self._dbs[b"meta"]))[0])


_META_MAGIC = 0xBEEFC0DE
_META = struct.Struct("=II")  # LMDB 0.9 meta page (native order): mm_magic, mm_version at offset 16
_META_PSIZE = 16 + 24  # the free DB's md_pad holds the page size
_META_TAIL = struct.Struct("=QQ")  # mm_last_pg, mm_txnid
_META_TAIL_AT = 16 + 4 + 4 + 8 + 8 + 2 * 48


def _committed_size(data_file: str) -> int | None:
    """Bytes the newest valid meta page says the file holds, or None if the file does not look
    like LMDB 0.9 (then LMDB itself reports what is wrong)."""
    with open(data_file, "rb") as f:
        first = f.read(_META_TAIL_AT + _META_TAIL.size)
        if len(first) < _META_TAIL_AT + _META_TAIL.size or _META.unpack_from(first, 16)[0] != _META_MAGIC:
            return None
        psize = int(struct.unpack_from("=I", first, _META_PSIZE)[0])
        if psize < 512 or psize & (psize - 1):
            return None
        f.seek(psize)
        second = f.read(_META_TAIL_AT + _META_TAIL.size)
    metas = [first]
    if len(second) == len(first) and _META.unpack_from(second, 16)[0] == _META_MAGIC:
        metas.append(second)
    last_pg, _ = max((_META_TAIL.unpack_from(m, _META_TAIL_AT) for m in metas), key=lambda t: t[1])
    return max(int(last_pg) + 1, 2) * psize


def _keys_desc(cur: Any, below: int | None) -> Iterator[bytes]:
    """Keys of a plain database, highest first, below ``below``."""
    if below is None:
        ok = cur.last()
    elif cur.set_range(_be(below)):
        ok = cur.prev()
    else:
        ok = cur.last()
    while ok:
        yield cur.key()
        ok = cur.prev()


def _dups_desc(cur: Any, key: bytes, below: int | None) -> Iterator[bytes]:
    """Values of one dupsort key, highest first, below ``below``."""
    if not cur.set_key(key):
        return
    if below is None:
        ok = cur.last_dup()
    elif cur.set_range_dup(key, _be(below)):
        ok = cur.prev_dup()
    else:
        ok = cur.set_key(key) and cur.last_dup()
    while ok:
        yield cur.value()
        ok = cur.prev_dup()
