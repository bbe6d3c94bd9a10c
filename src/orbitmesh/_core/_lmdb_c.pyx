"""LMDB through the system's liblmdb: the part of py-lmdb's API the job store uses, compiled
(the twin, ``_lmdb_py.py``, is py-lmdb itself; see ``lmdbapi.py``).

Why a binding of our own: py-lmdb releases the GIL around every call and takes it back after. A
job-log writer making ~9 puts and deletes per job then gives the GIL to the control plane and
waits for it again at each one: timed in the broker, its batch took ~4.8 ms of wall time for
~1.4 ms of CPU, and a job waits for two such batches. Here the short calls (get, put, delete,
cursor moves) keep the GIL (they take well under a microsecond), and a write transaction can
queue its writes (``put_later``, ``delete_later``, ``later(db)``): they are copied, then made in
order without the GIL, with the commit (or before the transaction's next read). The calls that
may wait release the GIL: beginning a write transaction (another process may hold LMDB's writer
lock), committing one (the pages, and the fsync) and ``sync``.

The same rules as py-lmdb, kept exactly: one environment per path per process (a second open
raises Error "... already open in this process", LMDB forbids it); MDB_NOTLS (a read txn is not
tied to its thread's slot); a cursor and its values are valid only within its transaction (the
values returned are copies); a transaction that ends closes its cursors first.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EACCES, EFBIG, EINVAL, ENOSPC
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import os
import weakref

public_api = [
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

cdef extern from "errno.h":
    enum:
        EDQUOT

cdef extern from "lmdb.h" nogil:
    ctypedef struct MDB_env:
        pass
    ctypedef struct MDB_txn:
        pass
    ctypedef struct MDB_cursor:
        pass
    ctypedef unsigned int MDB_dbi
    ctypedef int mdb_mode_t
    ctypedef struct MDB_val:
        size_t mv_size
        void* mv_data
    ctypedef struct MDB_envinfo:
        void* me_mapaddr
        size_t me_mapsize
        size_t me_last_pgno
        size_t me_last_txnid
        unsigned int me_maxreaders
        unsigned int me_numreaders
    ctypedef enum MDB_cursor_op:
        MDB_FIRST
        MDB_GET_BOTH_RANGE
        MDB_GET_CURRENT
        MDB_LAST
        MDB_LAST_DUP
        MDB_NEXT
        MDB_NEXT_DUP
        MDB_PREV
        MDB_PREV_DUP
        MDB_SET_KEY
        MDB_SET_RANGE
    enum:
        MDB_RDONLY
        MDB_NOSYNC
        MDB_NOMETASYNC
        MDB_WRITEMAP
        MDB_MAPASYNC
        MDB_NOTLS
        MDB_NOLOCK
        MDB_NORDAHEAD
        MDB_NOMEMINIT
        MDB_NOSUBDIR
        MDB_DUPSORT
        MDB_DUPFIXED
        MDB_CREATE
        MDB_NOOVERWRITE
        MDB_NODUPDATA
        MDB_APPEND
        MDB_APPENDDUP
        MDB_KEYEXIST
        MDB_NOTFOUND
        MDB_PAGE_NOTFOUND
        MDB_CORRUPTED
        MDB_PANIC
        MDB_VERSION_MISMATCH
        MDB_INVALID
        MDB_MAP_FULL
        MDB_MAP_RESIZED
        MDB_VERSION_MAJOR
        MDB_VERSION_MINOR
        MDB_VERSION_PATCH
    char* mdb_strerror(int err)
    int mdb_env_create(MDB_env** env)
    int mdb_env_open(MDB_env* env, const char* path, unsigned int flags, mdb_mode_t mode)
    void mdb_env_close(MDB_env* env)
    int mdb_env_set_mapsize(MDB_env* env, size_t size)
    int mdb_env_set_maxreaders(MDB_env* env, unsigned int readers)
    int mdb_env_set_maxdbs(MDB_env* env, MDB_dbi dbs)
    int mdb_env_info(MDB_env* env, MDB_envinfo* stat)
    int mdb_env_sync(MDB_env* env, int force)
    int mdb_txn_begin(MDB_env* env, MDB_txn* parent, unsigned int flags, MDB_txn** txn)
    int mdb_txn_commit(MDB_txn* txn)
    void mdb_txn_abort(MDB_txn* txn)
    int mdb_dbi_open(MDB_txn* txn, const char* name, unsigned int flags, MDB_dbi* dbi)
    int mdb_get(MDB_txn* txn, MDB_dbi dbi, MDB_val* key, MDB_val* data)
    int mdb_put(MDB_txn* txn, MDB_dbi dbi, MDB_val* key, MDB_val* data, unsigned int flags)
    int mdb_del(MDB_txn* txn, MDB_dbi dbi, MDB_val* key, MDB_val* data)
    int mdb_cursor_open(MDB_txn* txn, MDB_dbi dbi, MDB_cursor** cursor)
    void mdb_cursor_close(MDB_cursor* cursor)
    int mdb_cursor_get(MDB_cursor* cursor, MDB_val* key, MDB_val* data, MDB_cursor_op op)
    int mdb_cursor_put(MDB_cursor* cursor, MDB_val* key, MDB_val* data, unsigned int flags)
    int mdb_cursor_count(MDB_cursor* cursor, size_t* countp)

BINDING = f"liblmdb {MDB_VERSION_MAJOR}.{MDB_VERSION_MINOR}.{MDB_VERSION_PATCH}"


class Error(Exception):
    """An LMDB failure: ``what`` failed with ``code`` (an MDB_* code or an errno; 0 for ours)."""

    def __init__(self, what, code=0):
        self.what = what
        self.code = code
        message = f"{what}: {mdb_strerror(code).decode('utf-8', 'replace')}" if code else what
        super().__init__(message)


class MapFullError(Error):
    """The map is full (MDB_MAP_FULL): grow it with ``set_mapsize``."""


class NotFoundError(Error):
    """No such key or database (MDB_NOTFOUND), where not finding one is an error."""


class MapResizedError(Error):
    """Another process grew the map (MDB_MAP_RESIZED): adopt it with ``set_mapsize(0)``."""


class CorruptedError(Error):
    """A page has an unexpected type (MDB_CORRUPTED)."""


class PageNotFoundError(Error):
    """A page was not found (MDB_PAGE_NOTFOUND): the file is damaged or truncated."""


class InvalidError(Error):
    """Not an LMDB file (MDB_INVALID)."""


class VersionMismatchError(Error):
    """The file was made by an incompatible LMDB (MDB_VERSION_MISMATCH)."""


class DiskError(Error):
    """No room on the disk or in the file size allowed (ENOSPC, EDQUOT, EFBIG)."""


class ReadonlyError(Error):
    """Permission denied, or a write to a read-only environment (EACCES)."""


class PanicError(Error):
    """LMDB must be reopened (MDB_PANIC)."""


class InvalidParameterError(Error):
    """An argument LMDB refused (EINVAL)."""


_BY_CODE = {
    MDB_MAP_FULL: MapFullError,
    MDB_MAP_RESIZED: MapResizedError,
    MDB_NOTFOUND: NotFoundError,
    MDB_CORRUPTED: CorruptedError,
    MDB_PAGE_NOTFOUND: PageNotFoundError,
    MDB_INVALID: InvalidError,
    MDB_VERSION_MISMATCH: VersionMismatchError,
    MDB_PANIC: PanicError,
    ENOSPC: DiskError,
    EDQUOT: DiskError,
    EFBIG: DiskError,
    EACCES: ReadonlyError,
    EINVAL: InvalidParameterError,
}

_OPEN_PATHS = set()  # real paths of the environments open in this process


cdef object _fail(str what, int rc):
    raise _BY_CODE.get(rc, Error)(what, rc)


cdef inline int _val(MDB_val* v, object data) except -1:
    """Point ``v`` at the bytes of ``data`` (valid while ``data`` is)."""
    if not PyBytes_Check(data):
        raise TypeError(f"LMDB keys and values are bytes, not {type(data).__name__}")
    v.mv_data = PyBytes_AS_STRING(data)
    v.mv_size = PyBytes_GET_SIZE(data)
    return 0


cdef inline bytes _copy(MDB_val* v):
    return PyBytes_FromStringAndSize(<char*>v.mv_data, v.mv_size)


cdef class _Database:
    """A named database's handle (``Environment.open_db``)."""

    cdef MDB_dbi dbi
    cdef readonly bytes name
    cdef readonly bint dupsort


cdef class Environment:
    """An open LMDB environment (``open``)."""

    cdef MDB_env* _env
    cdef readonly str path
    cdef str _key
    cdef bint _readonly
    cdef dict _dbs
    cdef object _txns  # the transactions not yet ended: aborted by close()
    cdef object __weakref__

    def __dealloc__(self):
        if self._env != NULL:
            mdb_env_close(self._env)
            self._env = NULL
            _OPEN_PATHS.discard(self._key)

    cdef MDB_env* _live(self) except NULL:
        if self._env == NULL:
            raise Error(f"the environment '{self.path}' is closed")
        return self._env

    def begin(self, db=None, write=False):
        """A transaction (read-only unless ``write``); ``db``: the database its calls default to."""
        cdef MDB_env* env = self._live()
        cdef MDB_txn* txn = NULL
        cdef unsigned int flags = 0 if write else MDB_RDONLY
        cdef int rc
        if write and self._readonly:
            raise ReadonlyError("mdb_txn_begin: the environment is read-only", EACCES)
        if write:
            with nogil:  # another process may hold LMDB's writer lock
                rc = mdb_txn_begin(env, NULL, flags, &txn)
        else:
            rc = mdb_txn_begin(env, NULL, flags, &txn)
        if rc:
            _fail("mdb_txn_begin", rc)
        t = Transaction.__new__(Transaction)
        (<Transaction>t)._setup(self, txn, db, write)
        self._txns.add(t)
        return t

    def open_db(self, key=None, txn=None, bint create=True, bint dupsort=False, bint dupfixed=False):
        """The handle of database ``key`` (created if ``create``), opened in ``txn`` or in a
        transaction of its own; the same object for the same name."""
        cdef Transaction t
        cdef MDB_dbi dbi
        cdef unsigned int flags = (MDB_CREATE if create else 0) | (MDB_DUPSORT if dupsort else 0)
        cdef int rc
        flags |= MDB_DUPFIXED if dupfixed else 0
        if key is not None and not isinstance(key, bytes):
            raise TypeError("a database name is bytes")
        known = self._dbs.get(key)
        if known is not None:
            return known
        own = txn is None
        t = self.begin(write=create and not self._readonly) if own else txn
        try:
            rc = mdb_dbi_open(t._check(), NULL if key is None else <const char*>PyBytes_AS_STRING(key), flags, &dbi)
            if rc:
                _fail(f"mdb_dbi_open {key!r}", rc)
            if own:
                t.commit()  # the handle is the transaction's own until it commits
        except BaseException:
            if own:
                t.abort()
            raise
        db = _Database.__new__(_Database)
        (<_Database>db).dbi = dbi
        (<_Database>db).name = key
        (<_Database>db).dupsort = dupsort
        self._dbs[key] = db
        return db

    def set_mapsize(self, size_t map_size):
        """Resize the map (0: adopt the size another process set); no transaction may be open."""
        cdef int rc = mdb_env_set_mapsize(self._live(), map_size)
        if rc:
            _fail("mdb_env_set_mapsize", rc)

    def info(self):
        """map_addr, map_size, last_pgno, last_txnid, max_readers, num_readers."""
        cdef MDB_envinfo st
        cdef int rc = mdb_env_info(self._live(), &st)
        if rc:
            _fail("mdb_env_info", rc)
        return {
            "map_addr": <size_t>st.me_mapaddr,
            "map_size": st.me_mapsize,
            "last_pgno": st.me_last_pgno,
            "last_txnid": st.me_last_txnid,
            "max_readers": st.me_maxreaders,
            "num_readers": st.me_numreaders,
        }

    def sync(self, bint force=False):
        """Flush to disk (``force``: even with MDB_NOSYNC / MDB_MAPASYNC)."""
        cdef MDB_env* env = self._live()
        cdef int rc
        with nogil:
            rc = mdb_env_sync(env, force)
        if rc:
            _fail("mdb_env_sync", rc)

    def close(self):
        """Abort the transactions still open, then close; idempotent."""
        if self._env == NULL:
            return
        for t in list(self._txns):
            (<Transaction>t).abort()
        mdb_env_close(self._env)
        self._env = NULL
        self._dbs.clear()
        _OPEN_PATHS.discard(self._key)


ctypedef struct _Op:
    MDB_dbi dbi
    bint delete
    size_t at  # the key's offset in the arena; the value follows it
    size_t klen
    size_t vlen


cdef inline object _name_key(str_key, dict str_keys, name):
    """``str_key(name)``, from ``str_keys`` when it holds it."""
    key = str_keys.get(name)
    return str_key(name) if key is None else key


cdef class Transaction:
    """A transaction (``Environment.begin``); a context manager that commits, or aborts on an
    exception.

    Writes queued with ``put_later`` / ``delete_later`` (a write transaction's) are copied and
    run, in order, without the GIL, at the next call that reads or writes through this
    transaction (or one of its cursors) or at its commit; an error of theirs is raised there
    (the transaction is then aborted by the caller, or ended by the commit)."""

    cdef MDB_txn* _txn
    cdef Environment _env
    cdef MDB_dbi _dbi
    cdef readonly bint write
    cdef object _cursors
    cdef object __weakref__
    cdef _Op* _ops
    cdef size_t _nops, _capops
    cdef char* _arena
    cdef size_t _used, _cap

    cdef int _setup(self, Environment env, MDB_txn* txn, db, bint write) except -1:
        cdef int rc
        self._env = env
        self._txn = txn
        self.write = write
        self._cursors = weakref.WeakSet()
        if db is None:
            rc = mdb_dbi_open(txn, NULL, 0, &self._dbi)  # the main database
            if rc:
                mdb_txn_abort(txn)
                self._txn = NULL
                _fail("mdb_dbi_open", rc)
        else:
            self._dbi = (<_Database?>db).dbi
        return 0

    def __dealloc__(self):
        if self._txn != NULL:  # its cursors are gone already: each holds its transaction
            mdb_txn_abort(self._txn)
            self._txn = NULL
        free(self._ops)
        free(self._arena)

    cdef MDB_txn* _check(self) except NULL:
        """The live MDB_txn, with the writes queued so far done."""
        if self._txn == NULL:
            raise Error("the transaction has ended")
        if self._nops:
            self._run_later()
        return self._txn

    cdef int _later(self, bint delete, MDB_dbi dbi, object key, object value) except -1:
        cdef MDB_val k, v
        _val(&k, key)
        _val(&v, value)
        return self._later_raw(delete, dbi, <const char*>k.mv_data, k.mv_size, <const char*>v.mv_data, v.mv_size)

    cdef int _later_raw(self, bint delete, MDB_dbi dbi, const char* key, size_t klen, const char* value, size_t vlen) except -1:
        cdef MDB_val k, v
        cdef size_t need, cap
        cdef void* grown
        if self._txn == NULL:
            raise Error("the transaction has ended")
        if not self.write:
            _fail("mdb_put" if not delete else "mdb_del", EACCES)
        k.mv_data, k.mv_size = <void*>key, klen
        v.mv_data, v.mv_size = <void*>value, vlen
        if self._nops == self._capops:
            cap = self._capops * 2 if self._capops else 256
            grown = realloc(self._ops, cap * sizeof(_Op))
            if grown == NULL:
                raise MemoryError()
            self._ops, self._capops = <_Op*>grown, cap
        need = self._used + k.mv_size + v.mv_size
        if need > self._cap:
            cap = self._cap * 2 if self._cap else 65536
            while cap < need:
                cap *= 2
            grown = realloc(self._arena, cap)
            if grown == NULL:
                raise MemoryError()
            self._arena, self._cap = <char*>grown, cap
        memcpy(self._arena + self._used, k.mv_data, k.mv_size)
        memcpy(self._arena + self._used + k.mv_size, v.mv_data, v.mv_size)
        self._ops[self._nops] = _Op(dbi, delete, self._used, k.mv_size, v.mv_size)
        self._nops += 1
        self._used = need
        return 0

    cdef int _run_ops(self, MDB_txn* txn, size_t* failed) noexcept nogil:
        """Run the queued writes in order in ``txn``; 0, or the first one's error (its index in
        ``failed``). The queue is emptied either way."""
        cdef size_t i, n = self._nops
        cdef int rc = 0
        cdef _Op* op
        cdef MDB_val k, v
        for i in range(n):
            op = &self._ops[i]
            k.mv_data = self._arena + op.at
            k.mv_size = op.klen
            v.mv_data = self._arena + op.at + op.klen
            v.mv_size = op.vlen
            if op.delete:
                rc = mdb_del(txn, op.dbi, &k, &v if v.mv_size else NULL)
                if rc == MDB_NOTFOUND:
                    rc = 0
            else:
                rc = mdb_put(txn, op.dbi, &k, &v, 0)
                if rc == MDB_KEYEXIST:
                    rc = 0
            if rc:
                failed[0] = i
                break
        self._nops = 0
        self._used = 0
        return rc

    cdef int _run_later(self) except -1:
        cdef size_t failed = 0
        cdef bint delete = False
        cdef int rc
        with nogil:
            rc = self._run_ops(self._txn, &failed)
        if rc:
            delete = self._ops[failed].delete
            _fail("mdb_del" if delete else "mdb_put", rc)
        return 0

    def put_later(self, key, value, db=None):
        """``put(key, value, db=db)``, queued (see the class)."""
        self._later(False, self._db(db), key, value)

    def delete_later(self, key, value=b"", db=None):
        """``delete(key, value, db=db)``, queued (see the class); not finding it is no error."""
        self._later(True, self._db(db), key, value)

    def later(self, db=None):
        """An object whose ``put(key, value)`` / ``delete(key, value=b"")`` queue writes to
        ``db`` (the cheap call for many writes to one database)."""
        w = _Later.__new__(_Later)
        (<_Later>w).txn = self
        (<_Later>w).dbi = self._db(db)
        return w

    def queue_records(self, list items, dict live, dict cache, tuple dbs, top, str_key, dict str_keys, time_key, rest):
        """The job store's records queued with their index entries (``LmdbStore._apply``'s loop,
        compiled for its common case): ``items`` are ``LmdbStore.prepare`` tuples, ``dbs`` the
        handles of by_state, by_agent, by_command, by_time, by_done and jobs. A record that is new
        (its id above ``top``) or whose indexed fields ``live`` / ``cache`` hold, with no
        idempotency key then or now, is done here; any other goes, in its turn, to
        ``rest([item], top)``, the store's own loop. ``cache`` gets what each record's indexes
        now hold (None once it is terminal). ``str_key(s)`` is a name's index key, which
        ``str_keys`` holds for the names seen lately (looked up first: the call is Python).
        Returns the highest id written (or ``top``)."""
        cdef MDB_dbi d_state = (<_Database?>dbs[0]).dbi, d_agent = (<_Database?>dbs[1]).dbi
        cdef MDB_dbi d_command = (<_Database?>dbs[2]).dbi, d_time = (<_Database?>dbs[3]).dbi
        cdef MDB_dbi d_done = (<_Database?>dbs[4]).dbi, d_jobs = (<_Database?>dbs[5]).dbi
        cdef unsigned long long high = top, job_id
        cdef unsigned char rid[8]
        cdef char tkey[16]
        cdef tuple t, known
        cdef object entry
        cdef bytes state, done, data
        cdef int i
        for item in items:
            if type(item) is not tuple or len(<tuple>item) != 8:
                high = rest([item], high)
                continue
            t = <tuple>item
            if (
                type(t[0]) is not int or type(t[1]) is not bytes or type(t[2]) is not str
                or type(t[3]) is not str or type(t[4]) is not float or t[5] != ""
                or type(t[6]) is not bytes or type(t[7]) is not bytes
                or not 0 < t[0] <= 0x7FFFFFFFFFFFFFFF  # the stores' MAX_ID
            ):
                high = rest([item], high)  # a key, or a hand-made item: the store's loop checks it
                continue
            job_id = t[0]
            entry = cache[t[0]] if t[0] in cache else live.get(t[0])
            if entry is None and job_id <= high:  # not indexed here: stored before, or never
                high = rest([item], high)
                continue
            if entry is not None:
                known = <tuple>entry
                if known[4] != "":
                    high = rest([item], high)
                    continue
            else:
                known = None
            state, done, data = t[1], t[6], t[7]
            for i in range(8):
                rid[7 - i] = <unsigned char>(job_id >> (8 * i))
            memcpy(tkey + 8, rid, 8)
            if known is None:
                self._index(False, d_state, state, <char*>rid, 8)
                self._index(False, d_agent, _name_key(str_key, str_keys, t[2]), <char*>rid, 8)
                self._index(False, d_command, _name_key(str_key, str_keys, t[3]), <char*>rid, 8)
                self._timed(False, d_time, time_key(t[4]), tkey)
            else:
                if known[0] != state:
                    self._index(True, d_state, known[0], <char*>rid, 8)
                    self._index(False, d_state, state, <char*>rid, 8)
                if known[1] != t[2]:
                    self._index(True, d_agent, str_key(known[1]), <char*>rid, 8)
                    self._index(False, d_agent, str_key(t[2]), <char*>rid, 8)
                if known[2] != t[3]:
                    self._index(True, d_command, str_key(known[2]), <char*>rid, 8)
                    self._index(False, d_command, str_key(t[3]), <char*>rid, 8)
                if known[3] != t[4]:
                    self._timed(True, d_time, time_key(known[3]), tkey)
                    self._timed(False, d_time, time_key(t[4]), tkey)
                if known[5] and known[5] != done:
                    self._index(True, d_done, known[5], b"", 0)
            if done and (known is None or known[5] != done):
                self._index(False, d_done, done, b"", 0)
            cache[t[0]] = None if done else t[1:7]
            self._later_raw(False, d_jobs, <char*>rid, 8, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            if job_id > high:
                high = job_id
        return high

    cdef inline int _index(self, bint delete, MDB_dbi dbi, bytes key, const char* value, size_t vlen) except -1:
        """An index entry queued: ``key``, and the record's 8-byte id (or nothing) as its value."""
        if key is None:
            raise TypeError("an index key is bytes, not None")
        return self._later_raw(delete, dbi, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), value, vlen)

    cdef inline int _timed(self, bint delete, MDB_dbi dbi, bytes time, char* tkey) except -1:
        """A time index entry queued: ``time`` (8 bytes) then the id already in ``tkey[8:16]``."""
        if time is None or PyBytes_GET_SIZE(time) != 8:
            raise ValueError(f"a time key is 8 bytes, not {time!r}")
        memcpy(tkey, PyBytes_AS_STRING(time), 8)
        return self._later_raw(delete, dbi, tkey, 16, b"", 0)

    @property
    def queued(self):
        """Writes queued and not run yet."""
        return self._nops

    cdef inline MDB_dbi _db(self, db) except? 0:
        return self._dbi if db is None else (<_Database?>db).dbi

    cdef MDB_txn* _end(self):
        """Close this transaction's cursors and forget it; its MDB_txn, to commit or abort."""
        cdef MDB_txn* txn = self._txn
        for c in list(self._cursors):
            (<Cursor>c)._close()
        self._txn = NULL
        self._env._txns.discard(self)
        return txn

    def commit(self):
        """Run the queued writes and commit (durably, as the environment's sync flags say); the
        transaction ends either way (aborted if a queued write failed)."""
        cdef MDB_txn* txn
        cdef size_t failed = 0
        cdef int rc = 0
        cdef bint write_failed = False
        if self._txn == NULL:
            raise Error("the transaction has ended")
        txn = self._end()
        if self.write:
            with nogil:  # the queued writes, then the pages written (and fsynced in sync mode)
                if self._nops:
                    rc = self._run_ops(txn, &failed)
                if rc:
                    mdb_txn_abort(txn)
                    write_failed = True
                else:
                    rc = mdb_txn_commit(txn)
        else:
            rc = mdb_txn_commit(txn)
        if write_failed:
            _fail("mdb_del" if self._ops[failed].delete else "mdb_put", rc)
        if rc:
            _fail("mdb_txn_commit", rc)

    def abort(self):
        """Abort; nothing it wrote (or queued) is kept. Idempotent."""
        self._nops = 0
        self._used = 0
        if self._txn != NULL:
            mdb_txn_abort(self._end())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._txn == NULL:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def get(self, key, default=None, db=None):
        """The value of ``key`` (a copy), or ``default``."""
        cdef MDB_val k, v
        _val(&k, key)
        cdef int rc = mdb_get(self._check(), self._db(db), &k, &v)
        if rc == MDB_NOTFOUND:
            return default
        if rc:
            _fail("mdb_get", rc)
        return _copy(&v)

    def put(self, key, value, bint dupdata=True, bint overwrite=True, bint append=False, db=None):
        """Store ``key`` = ``value``; False if it was there already and nothing changed."""
        cdef MDB_val k, v
        cdef MDB_dbi dbi = self._db(db)
        _val(&k, key)
        _val(&v, value)
        cdef unsigned int flags = (0 if dupdata else MDB_NODUPDATA) | (0 if overwrite else MDB_NOOVERWRITE)
        flags |= MDB_APPEND if append else 0
        cdef int rc = mdb_put(self._check(), dbi, &k, &v, flags)
        if rc == MDB_KEYEXIST:
            return False
        if rc:
            _fail("mdb_put", rc)
        return True

    def delete(self, key, value=b"", db=None):
        """Delete ``key`` (with ``value``: only that duplicate); False if it was not there."""
        cdef MDB_val k, v
        cdef MDB_dbi dbi = self._db(db)
        _val(&k, key)
        _val(&v, value)
        cdef int rc = mdb_del(self._check(), dbi, &k, &v if v.mv_size else NULL)
        if rc == MDB_NOTFOUND:
            return False
        if rc:
            _fail("mdb_del", rc)
        return True

    def pop(self, key, db=None):
        """Delete ``key`` and return its value (a copy), or None if it was not there."""
        cdef MDB_val k, v
        cdef MDB_dbi dbi = self._db(db)
        cdef MDB_txn* txn = self._check()
        _val(&k, key)
        cdef int rc = mdb_get(txn, dbi, &k, &v)
        if rc == MDB_NOTFOUND:
            return None
        if rc:
            _fail("mdb_get", rc)
        old = _copy(&v)
        rc = mdb_del(txn, dbi, &k, NULL)
        if rc:
            _fail("mdb_del", rc)
        return old

    def cursor(self, db=None):
        """A cursor over ``db`` (default: this transaction's database), valid while it is."""
        cdef MDB_cursor* cur = NULL
        cdef int rc = mdb_cursor_open(self._check(), self._db(db), &cur)
        if rc:
            _fail("mdb_cursor_open", rc)
        c = Cursor.__new__(Cursor)
        (<Cursor>c)._cur = cur
        (<Cursor>c)._txn = self
        self._cursors.add(c)
        return c


cdef class _Later:
    """``Transaction.later(db)``."""

    cdef Transaction txn
    cdef MDB_dbi dbi

    def put(self, key, value):
        self.txn._later(False, self.dbi, key, value)

    def delete(self, key, value=b""):
        self.txn._later(True, self.dbi, key, value)


cdef class Cursor:
    """A position in one database of a transaction; each move returns True if it found an item
    (False leaves the cursor unpositioned: ``key()`` and ``value()`` are then b"")."""

    cdef MDB_cursor* _cur
    cdef Transaction _txn
    cdef MDB_val _k, _v
    cdef bint _positioned
    cdef object __weakref__

    def __dealloc__(self):
        if self._cur != NULL:
            mdb_cursor_close(self._cur)
            self._cur = NULL

    cdef void _close(self):
        if self._cur != NULL:
            mdb_cursor_close(self._cur)
            self._cur = NULL
        self._positioned = False

    cdef MDB_cursor* _check(self) except NULL:
        """The live MDB_cursor, with its transaction's queued writes done."""
        if self._cur == NULL:
            raise Error("the cursor's transaction has ended")
        if self._txn._nops:
            self._txn._run_later()
        return self._cur

    cdef bint _get(self, MDB_cursor_op op) except -1:
        cdef int rc = mdb_cursor_get(self._check(), &self._k, &self._v, op)
        if rc == MDB_NOTFOUND:
            self._positioned = False
            return False
        if rc:
            self._positioned = False
            _fail("mdb_cursor_get", rc)
        self._positioned = True
        return True

    def first(self):
        return self._get(MDB_FIRST)

    def last(self):
        return self._get(MDB_LAST)

    def next(self):
        return self._get(MDB_NEXT)

    def prev(self):
        return self._get(MDB_PREV)

    def next_dup(self):
        return self._get(MDB_NEXT_DUP)

    def prev_dup(self):
        return self._get(MDB_PREV_DUP)

    def last_dup(self):
        return self._get(MDB_LAST_DUP)

    def set_key(self, key):
        """At ``key`` (its first duplicate)."""
        _val(&self._k, key)
        return self._get(MDB_SET_KEY)

    def set_range(self, key):
        """At the first key >= ``key`` (b"": the first)."""
        _val(&self._k, key)
        return self._get(MDB_SET_RANGE if self._k.mv_size else MDB_FIRST)

    def set_range_dup(self, key, value):
        """At ``key``'s first duplicate >= ``value``."""
        _val(&self._k, key)
        _val(&self._v, value)
        return self._get(MDB_GET_BOTH_RANGE) and self._get(MDB_GET_CURRENT)

    def count(self):
        """Duplicates of the current key."""
        cdef size_t n = 0
        cdef int rc = mdb_cursor_count(self._check(), &n)
        if rc:
            _fail("mdb_cursor_count", rc)
        return n

    def key(self):
        """The current key (a copy), or b""."""
        if not self._positioned or not self._get(MDB_GET_CURRENT):
            return b""
        return _copy(&self._k)

    def value(self):
        """The current value (a copy), or b""."""
        if not self._positioned or not self._get(MDB_GET_CURRENT):
            return b""
        return _copy(&self._v)

    def put(self, key, value, bint dupdata=True, bint overwrite=True, bint append=False):
        """Store ``key`` = ``value`` and move there; False if it was there and nothing changed."""
        cdef MDB_val k, v
        _val(&k, key)
        _val(&v, value)
        cdef unsigned int flags = (0 if dupdata else MDB_NODUPDATA) | (0 if overwrite else MDB_NOOVERWRITE)
        flags |= MDB_APPEND if append else 0
        cdef int rc = mdb_cursor_put(self._check(), &k, &v, flags)
        if rc == MDB_KEYEXIST:
            return False
        if rc:
            self._positioned = False
            _fail("mdb_cursor_put", rc)
        self._positioned = True
        return True

    def _items(self, bint keys, bint values, MDB_cursor_op step):
        while True:
            if keys and values:
                yield (_copy(&self._k), _copy(&self._v))
            elif keys:
                yield _copy(&self._k)
            else:
                yield _copy(&self._v)
            if not self._get(step):
                return

    def iternext(self, keys=True, values=True):
        """Items from the current one on (from the first if unpositioned)."""
        if not self._positioned and not self._get(MDB_FIRST):
            return iter(())
        return self._items(keys, values, MDB_NEXT)

    def iternext_dup(self, keys=False, values=True):
        """The current key's duplicates from the current one on (none if unpositioned)."""
        if not self._positioned:
            return iter(())
        return self._items(keys, values, MDB_NEXT_DUP)

    def __iter__(self):
        return self.iternext()


def open(
    path,
    size_t map_size=10485760,
    bint subdir=True,
    bint readonly=False,
    bint metasync=True,
    bint sync=True,
    bint map_async=False,
    int mode=0o755,
    bint create=True,
    bint readahead=True,
    bint writemap=False,
    bint meminit=True,
    unsigned int max_readers=126,
    MDB_dbi max_dbs=0,
    bint lock=True,
):
    """Open the environment at ``path``, with py-lmdb's ``open`` options (and MDB_NOTLS)."""
    cdef MDB_env* env = NULL
    cdef unsigned int flags = MDB_NOTLS
    cdef int rc
    path = os.fspath(path)
    key = os.path.realpath(path)
    if key in _OPEN_PATHS:
        raise Error(f"The environment '{path}' is already open in this process.")
    if subdir and create and not readonly and not os.path.exists(path):
        os.mkdir(path, mode)
    flags |= 0 if subdir else MDB_NOSUBDIR
    flags |= MDB_RDONLY if readonly else 0
    flags |= 0 if metasync else MDB_NOMETASYNC
    flags |= 0 if sync else MDB_NOSYNC
    flags |= MDB_MAPASYNC if map_async else 0
    flags |= 0 if readahead else MDB_NORDAHEAD
    flags |= MDB_WRITEMAP if writemap else 0
    flags |= 0 if meminit else MDB_NOMEMINIT
    flags |= 0 if lock else MDB_NOLOCK
    rc = mdb_env_create(&env)
    if rc:
        _fail("mdb_env_create", rc)
    try:
        rc = mdb_env_set_mapsize(env, map_size)
        if rc:
            _fail("mdb_env_set_mapsize", rc)
        rc = mdb_env_set_maxreaders(env, max_readers)
        if rc:
            _fail("mdb_env_set_maxreaders", rc)
        rc = mdb_env_set_maxdbs(env, max_dbs)
        if rc:
            _fail("mdb_env_set_maxdbs", rc)
        encoded = os.fsencode(path)
        rc = mdb_env_open(env, <const char*>encoded, flags, mode)
        if rc:
            _fail(path, rc)
    except BaseException:
        mdb_env_close(env)
        raise
    e = Environment.__new__(Environment)
    (<Environment>e)._env = env
    (<Environment>e).path = path
    (<Environment>e)._key = key
    (<Environment>e)._readonly = readonly
    (<Environment>e)._dbs = {}
    (<Environment>e)._txns = weakref.WeakSet()
    _OPEN_PATHS.add(key)
    return e
