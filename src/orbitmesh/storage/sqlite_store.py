"""Job store in one SQLite file (stdlib ``sqlite3``, WAL mode).

Durability maps to ``PRAGMA synchronous``: ``sync`` -> FULL (the WAL is fsynced at every
commit), ``batch`` -> NORMAL (commits are not fsynced; ``flush`` fsyncs the WAL file, which makes
every commit so far durable), ``none`` -> OFF. Each thread gets its own connection; writes are
serialised by a lock and run as one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import quote

from ..errors import ErrorCode, StorageError
from ..models import JobState
from .base import FORMAT_VERSION, JobRecord, JobStore, check_durability
from .common import check_id, check_query, duplicate_key, encode_record, not_open, take_page

MARKER = "orbitmesh-joblog"
_HEADER = b"SQLite format 3\x00"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS orbitmesh_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS orbitmesh_jobs (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    terminal INTEGER NOT NULL,
    agent TEXT NOT NULL,
    command TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    idem TEXT UNIQUE,  -- NULL when the job has no idempotency key
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS orbitmesh_jobs_state ON orbitmesh_jobs (state);
CREATE INDEX IF NOT EXISTS orbitmesh_jobs_agent ON orbitmesh_jobs (agent);
CREATE INDEX IF NOT EXISTS orbitmesh_jobs_command ON orbitmesh_jobs (command);
CREATE INDEX IF NOT EXISTS orbitmesh_jobs_created ON orbitmesh_jobs (created);
CREATE INDEX IF NOT EXISTS orbitmesh_jobs_done ON orbitmesh_jobs (updated, id) WHERE terminal = 1;
"""
_UPSERT = """
INSERT INTO orbitmesh_jobs (id, state, terminal, agent, command, created, updated, idem, record)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, terminal = excluded.terminal, agent = excluded.agent,
    command = excluded.command, created = excluded.created, updated = excluded.updated,
    idem = excluded.idem, record = excluded.record
"""
_SYNCHRONOUS = {"sync": "FULL", "batch": "NORMAL", "none": "OFF"}
_FULL_CODES = {"SQLITE_FULL"}
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


class SqliteStore(JobStore):
    """Job store in the SQLite database file ``path`` (created if absent).

    A file that is not an SQLite database, is damaged or truncated, or holds other tables but
    no job log marker raises StorageError(STORAGE_CORRUPT) and is not written to.
    """

    def __init__(self, path: str | os.PathLike[str], durability: str = "sync", *, timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.durability = check_durability(durability)
        self.timeout = timeout  # waiting for another process's write lock, seconds
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._open = False
        self._generation = 0  # connections of an earlier open() are never reused

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r}, durability={self.durability!r})"

    def _fail(self, message: str, code: ErrorCode) -> NoReturn:
        raise StorageError(f"{message}: {self.path}", code=code, path=self.path)

    def _raise_sqlite(self, exc: sqlite3.Error, doing: str) -> NoReturn:
        name = getattr(exc, "sqlite_errorname", "")
        if name in _FULL_CODES:
            code = ErrorCode.STORAGE_FULL
        elif name in _CORRUPT_CODES:
            code = ErrorCode.STORAGE_CORRUPT
        else:
            code = ErrorCode.STORAGE_ERROR
        what = f"SQLite failed {doing} {self.path} ({name or type(exc).__name__}: {exc})"
        raise StorageError(what, code=code, path=self.path) from exc

    # -- open / close -------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        fresh = self._probe()
        self._generation += 1
        self._open = True
        try:
            conn = self._conn()
            if fresh:
                with self._write_lock:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        # one statement at a time: executescript() would COMMIT first
                        for stmt in filter(str.strip, _SCHEMA.split(";")):
                            conn.execute(stmt)
                        conn.execute("INSERT OR IGNORE INTO orbitmesh_meta VALUES (?, ?)", (MARKER, FORMAT_VERSION))
                        conn.execute("INSERT OR IGNORE INTO orbitmesh_meta VALUES ('max_id', 0)")
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
        except sqlite3.Error as exc:
            self.close()
            self._raise_sqlite(exc, "opening")
        except BaseException:
            self.close()
            raise

    def _probe(self) -> bool:
        """Check what is at ``path`` without changing it; True for nothing (create a new log)."""
        try:
            return self._probe_path()
        except OSError as exc:  # permissions, I/O: not a verdict on the data
            raise StorageError(f"cannot read {self.path}: {exc}", path=self.path) from exc

    def _probe_path(self) -> bool:
        if not os.path.exists(self.path):
            return True
        if not os.path.isfile(self.path):
            self._fail("not a job log file", ErrorCode.STORAGE_CORRUPT)
        size = os.path.getsize(self.path)
        if size == 0:
            return True  # SQLite's own empty database (created, never written)
        with open(self.path, "rb") as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(_HEADER):
            what = "truncated" if len(header) < 100 and _HEADER.startswith(header[:16]) else "not an SQLite database"
            self._fail(f"{what}, not a job log", ErrorCode.STORAGE_CORRUPT)
        page_size = struct.unpack(">H", header[16:18])[0] or 65536
        page_size = 65536 if page_size == 1 else page_size
        (pages,) = struct.unpack(">I", header[28:32])
        counter_valid = header[24:28] == header[92:96]
        # With a WAL beside it, a crash mid-checkpoint can leave the file short of its header's
        # size; the WAL still holds those pages, so only judge the size of a file without one.
        wal = self.path + "-wal"
        no_wal = not os.path.exists(wal) or os.path.getsize(wal) == 0
        if counter_valid and pages and no_wal and size < pages * page_size:
            self._fail(f"truncated: {size} bytes, the header says {pages * page_size}", ErrorCode.STORAGE_CORRUPT)
        # Read-only. With no WAL or rollback journal beside the file, also immutable: a read-only
        # connection to a WAL-mode database would otherwise create -wal and -shm files.
        quiet = not os.path.exists(self.path + "-wal") and not os.path.exists(self.path + "-journal")
        uri = f"file:{_uri_path(self.path)}?mode=ro" + ("&immutable=1" if quiet else "")
        try:
            probe = sqlite3.connect(uri, uri=True, timeout=self.timeout)
        except sqlite3.Error as exc:
            self._fail(f"cannot open read-only ({exc})", ErrorCode.STORAGE_ERROR)
        try:
            tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return True
            if "orbitmesh_meta" not in tables or "orbitmesh_jobs" not in tables:
                shown = ", ".join(sorted(tables)[:5])
                self._fail(f"a foreign SQLite database, not a job log (tables: {shown})", ErrorCode.STORAGE_CORRUPT)
            row = probe.execute("SELECT value FROM orbitmesh_meta WHERE key = ?", (MARKER,)).fetchone()
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", "")
            code = ErrorCode.STORAGE_CORRUPT if name in _CORRUPT_CODES else ErrorCode.STORAGE_ERROR
            self._fail(f"unreadable job log ({exc})", code)
        finally:
            probe.close()
        if row is None:
            self._fail("a foreign SQLite database without the job log marker", ErrorCode.STORAGE_CORRUPT)
        if row[0] != FORMAT_VERSION:
            self._fail(
                f"job log format version {row[0]}, this orbitmesh reads version {FORMAT_VERSION}",
                ErrorCode.STORAGE_VERSION,
            )
        return False

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (made on first use)."""
        if not self._open:
            raise not_open(repr(self))
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "generation", 0) == self._generation:
            return conn
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            # check_same_thread=False only so close() can close every thread's connection.
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self.durability]}")
        except sqlite3.Error as exc:
            self._raise_sqlite(exc, "connecting")
        with self._conns_lock:
            self._conns.append(conn)
        self._local.conn = conn
        self._local.generation = self._generation
        return conn

    def close(self) -> None:
        if not self._open:
            return
        with self._write_lock:
            try:
                self.flush()
            finally:
                self._open = False
                with self._conns_lock:
                    conns, self._conns = self._conns, []
                for conn in conns:
                    conn.close()

    def flush(self) -> None:
        """``batch``: fsync the WAL, making every commit so far durable."""
        if self.durability != "batch" or not self._open:
            return
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # nothing committed since the last checkpoint removed it
        except OSError as exc:
            raise StorageError(f"cannot flush {self.path}-wal: {exc}", path=self.path) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot flush {self.path}-wal: {exc}", path=self.path) from exc
        finally:
            os.close(fd)

    # -- writes -------------------------------------------------------------------------------

    def write(self, records: Sequence[JobRecord], delete: Sequence[int] = ()) -> None:
        deletes = [check_id(i) for i in delete]
        if not records and not deletes:
            return
        with self._write_lock:
            conn = self._conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._raise_sqlite(exc, "starting a write")
            try:
                top = 0
                for rec in records:
                    data = encode_record(rec)  # may raise midway: everything is rolled back
                    key = rec.idempotency_key or None
                    try:
                        conn.execute(
                            _UPSERT,
                            (rec.id, rec.state.value, int(rec.terminal), rec.agent, rec.command)
                            + (rec.created, rec.updated, key, data),
                        )
                    except sqlite3.IntegrityError as exc:
                        holder = conn.execute("SELECT id FROM orbitmesh_jobs WHERE idem = ?", (key,)).fetchone()
                        if holder is None:
                            raise
                        raise duplicate_key(rec.idempotency_key, holder[0], rec.id) from exc
                    top = max(top, rec.id)
                if deletes:
                    conn.executemany("DELETE FROM orbitmesh_jobs WHERE id = ?", [(i,) for i in deletes])
                if top:
                    conn.execute("UPDATE orbitmesh_meta SET value = max(value, ?) WHERE key = 'max_id'", (top,))
                conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite already rolled back (e.g. after SQLITE_FULL)
                if isinstance(exc, sqlite3.Error):
                    self._raise_sqlite(exc, "writing")
                raise

    # -- reads --------------------------------------------------------------------------------

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            self._raise_sqlite(exc, "reading")

    def get(self, job_id: int) -> JobRecord | None:
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not -(2**63) <= job_id < 2**63:
            return None
        rows = self._rows("SELECT record FROM orbitmesh_jobs WHERE id = ?", (job_id,))
        return JobRecord.from_bytes(rows[0][0]) if rows else None

    def find_key(self, key: str) -> int | None:
        if not key:
            return None
        rows = self._rows("SELECT id FROM orbitmesh_jobs WHERE idem = ?", (key,))
        return int(rows[0][0]) if rows else None

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
        where: list[str] = []
        args: list[Any] = []
        equal = (("state", None if state is None else state.value), ("agent", agent), ("command", command))
        for column, value in equal:
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("created >= ?")
            args.append(since)
        if cursor is not None:
            where.append("id < ?")
            args.append(max(min(cursor, 2**63 - 1), -(2**63)))
        sql = "SELECT record FROM orbitmesh_jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        return take_page((JobRecord.from_bytes(row[0]) for row in self._rows(sql, args)), limit)

    def unfinished(self) -> list[JobRecord]:
        rows = self._rows("SELECT record FROM orbitmesh_jobs WHERE terminal = 0 ORDER BY id")
        return [JobRecord.from_bytes(row[0]) for row in rows]

    def terminal_before(self, updated_before: float, limit: int) -> list[int]:
        if limit <= 0:
            return []
        rows = self._rows(
            "SELECT id FROM orbitmesh_jobs WHERE terminal = 1 AND updated < ? ORDER BY updated, id LIMIT ?",
            (updated_before, limit),
        )
        return [int(row[0]) for row in rows]

    def counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for state, n in self._rows("SELECT state, count(*) FROM orbitmesh_jobs GROUP BY state"):
            counts[JobState(state)] = int(n)
        return counts

    def max_id(self) -> int:
        rows = self._rows("SELECT value FROM orbitmesh_meta WHERE key = 'max_id'")
        return int(rows[0][0])


def _uri_path(path: str) -> str:
    """``path`` for a ``file:`` URI (``?`` and ``#`` would otherwise start the query / fragment)."""
    return quote(os.path.abspath(path))
