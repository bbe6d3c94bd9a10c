"""A durable job's common path, compiled (see ``_jobfast_py.py`` for the behaviour, which this
follows line for line; ``tests/test_jobfast.py`` holds both to ``JobManager``'s general path).

What compiling buys: a job is a C struct behind one object (``_Job``), the table's own calls are
C calls, and the dictionaries of ``JobManager`` it uses are held directly. Those are the ones
``JobManager`` never replaces (``_names``, ``_routes``, ``_outstanding``, ``_live``, ``_mem``,
``_delivered``); everything it may change (``_next_id``,
``_flusher``, ``_dirty``, ``lease_s``, ``max_live``) is read from it each time.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from orbitmesh._core._frame_c cimport OM_HEADER_SIZE, om_write_header

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    enum:
        CLOCK_REALTIME

import logging

from orbitmesh._wire import HDR
from orbitmesh.models import JobState
from orbitmesh.protocol import F_TRACKED, Kind, Route
from orbitmesh.storage.base import JobRecord
from orbitmesh._core._jobfast_py import VARIABLE
from orbitmesh._core.record import RecordTemplate

public_api = ["DISPATCHED", "FINISHING", "FastJobs", "PENDING", "RUNNING", "VARIABLE"]

log = logging.getLogger("orbitmesh.jobs")

cdef int _REQUEST = Kind.REQUEST, _ACCEPTED = Kind.ACCEPTED, _RUNNING = Kind.RUNNING, _REPLY = Kind.REPLY
cdef int _F_TRACKED = F_TRACKED
cdef bytes _NAME_ROUTE = bytes((Route.NAME,))
cdef object _unpack_header = HDR.unpack
cdef Py_ssize_t _HEADER_SIZE = HDR.size
cdef enum:
    _EV_MSG = 1
    _EV_JOB = 3
cdef object _new_record = object.__new__
cdef object _JobRecord = JobRecord

cdef enum:
    P_PENDING = 0
    P_DISPATCHED = 1
    P_RUNNING = 2
    P_FINISHING = 3

PENDING, DISPATCHED, RUNNING, FINISHING = P_PENDING, P_DISPATCHED, P_RUNNING, P_FINISHING
cdef tuple _STATES = (JobState.PENDING, JobState.DISPATCHED, JobState.RUNNING, JobState.SUCCEEDED)


cdef inline bytes _header(uint8_t kind, uint16_t flags, uint32_t aux, uint64_t corr, uint64_t job):
    """``HDR.pack(b"OM", 1, kind, flags, 0, aux, 0, corr, job, 0)``, written in C."""
    cdef bytes hdr = PyBytes_FromStringAndSize(NULL, OM_HEADER_SIZE)
    om_write_header(<unsigned char*>PyBytes_AS_STRING(hdr), kind, flags, 0, aux, corr, job, 0)
    return hdr


cdef inline double _now() noexcept nogil:
    """``time.time()``, without the call (the same clock: CLOCK_REALTIME)."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class FastJobs


cdef class _Job:
    """One job on the common path: what its record and its answer need, nothing more."""

    cdef public uint64_t id
    cdef public bytes rid
    cdef public uint64_t corr
    cdef public bytes route
    cdef public str command
    cdef public bytes params
    cdef public int flags
    cdef public str agent
    cdef public int phase
    cdef public double created, dispatched, running, finished, lease_expires
    cdef public int64_t session
    cdef public object result
    cdef public int result_flags
    cdef public list late
    cdef public object rec
    cdef FastJobs table

    def __call__(self, err):
        """The log's callback for the job's records that have one (see ``_jobfast_py._Job``)."""
        if self.phase == P_FINISHING:
            self.table._finished(self, err)
        else:
            self.table._accepted(self, err)


cdef class FastJobs:
    """The common-path job table of one ``JobManager`` (see ``_jobfast_py.py``)."""

    cdef object _m
    cdef dict _defaults
    cdef bytes _jobs_rid
    cdef double _flush_s
    cdef public dict jobs
    cdef public long live, taken, handed_over
    cdef dict _dirty
    cdef dict _names, _routes, _outstanding, _live, _mem, _delivered
    cdef dict _backlog
    cdef object _log, _offer, _to_peer, _send, _listening, _publish, _session_of, _capacity, _choose, _free, _loop
    cdef bytes _op_inject
    cdef object _pack_record, _prepare

    def __init__(self, manager, dict defaults, bytes jobs_rid, double flush_s):
        m = manager
        self._m = m
        self._defaults = defaults
        self._jobs_rid = jobs_rid
        self._flush_s = flush_s
        self.jobs = {}
        self.live = self.taken = self.handed_over = 0
        self._dirty = {}
        self._names, self._routes, self._outstanding = m._names, m._routes, m._outstanding
        self._live, self._mem, self._delivered = m._live, m._mem, m._delivered
        self._log = m.log
        self._offer = m.log.offer
        self._to_peer, self._send, self._op_inject = m._to_peer, m._send, m._op_inject
        self._listening, self._publish = m._listening, m._publish
        self._session_of, self._capacity, self._choose, self._free = m._agent_session, m._agent_capacity, m._choose, m._free
        self._backlog = m._backlog
        self._loop = m._loop
        self._pack_record = RecordTemplate(list(defaults), defaults, VARIABLE).pack
        self._prepare = m.log.store.prepare_encoded

    # ------------------------------------------------------------------ submit

    cpdef submit(self, bytes rid, tuple fields, list frames):
        """Take a client's tracked REQUEST if it needs only the common path; False (and nothing
        done) leaves it to ``JobManager.submit``."""
        cdef Py_ssize_t n = len(frames)
        cdef _Job job
        cdef uint64_t job_id
        if fields[2] != _REQUEST or n < 3 or n > 5 or (n == 5 and frames[4]):
            return False
        m = self._m
        if len(self._live) + self.live >= m.max_live:
            return False
        try:
            command = (<bytes?>frames[2]).decode()
        except UnicodeDecodeError:
            return False
        route = frames[1]
        name = self._names.get(route)
        if name is None or self._session_of(name) is None:
            chosen = self._choose(route, command, self._free)
            if not isinstance(chosen, str):
                return False
            name = chosen
            if route[:1] == _NAME_ROUTE and len(self._names) < 4096:
                self._names[route] = name
        job_id = m._next_id
        m._next_id = job_id + 1
        job = _Job.__new__(_Job)
        job.table = self
        job.id = job_id
        job.rid = rid
        job.corr = fields[7]
        job.route = route
        job.command = command
        job.params = frames[3] if n > 3 else b""
        job.flags = fields[3] & 0x0F00
        job.agent = name
        job.phase = P_PENDING
        job.late = []
        job.created = _now()
        self.jobs[job_id] = job
        self.live += 1
        self.taken += 1
        self._append(job_id, self._prepared(job), job)  # job(err): _accepted
        return True

    cpdef _accepted(self, _Job job, err):
        """Its new record is written: ACCEPTED, then the dispatch (JobManager._accepted)."""
        cdef uint64_t job_id = job.id
        cdef long out
        cdef double now
        m = self._m
        if job.rec is not None:
            m._accepted(job.rec, job.rid, job.corr, err)
            return
        if err is not None:
            self._forget(job)
            m._not_recorded(job.rid, job.corr, job_id, err)
            return
        self._to_peer(job.rid, [_header(_ACCEPTED, 0, 0, job.corr, job_id), b""])
        if self._listening():
            self._publish("job_accepted", {"id": job_id, "command": job.command})
        agent = job.agent
        session = self._session_of(agent)
        out = self._outstanding.get(agent, 0)
        if session is None or out >= self._window(agent):  # JobManager._window, inlined
            m._dispatch(self.take(job_id).id)
            return
        self._outstanding[agent] = out + 1
        hdr = _header(_REQUEST, job.flags | _F_TRACKED, 1, job_id, job_id)
        route = self._routes.get(agent)
        if route is None:
            route = _NAME_ROUTE + b"\x00" + agent.encode()
            if len(self._routes) < 4096:
                self._routes[agent] = route
        self._send([self._op_inject, self._jobs_rid, hdr, route, job.command.encode(), job.params])
        now = _now()
        job.session = session
        job.lease_expires = now + m.lease_s
        job.phase = P_DISPATCHED
        job.dispatched = now
        self._dirty[job_id] = job
        if m._flusher is None:
            m._flusher = self._loop.call_later(self._flush_s, m._flush_dirty)

    # ----------------------------------------------------------------- answers

    cpdef on_event(self, tuple fields, list frames):
        """A RUNNING / REPLY / ERROR about a job in this table: True if handled here; else the job
        is ``JobManager``'s now (or was never live here) and ``JobManager.on_event`` goes on."""
        cdef int kind = fields[2]
        cdef uint64_t lease = fields[5], job_id = fields[8]
        cdef _Job job = self.jobs[job_id]
        cdef int phase = job.phase
        cdef double now
        if phase == P_FINISHING:
            if kind != _RUNNING:
                job.late.append((f"LATE_{Kind(kind).name}", _now(), f"lease {lease}"))
                self._append(job_id, self._prepared(job), None)
            return True
        if phase == P_PENDING or lease != 1 or (kind != _RUNNING and kind != _REPLY):
            self.take(job_id)
            return False
        m = self._m
        now = _now()
        if kind == _RUNNING:
            job.lease_expires = now + m.lease_s
            if phase == P_DISPATCHED:
                job.phase = P_RUNNING
                job.running = now
                self._dirty[job_id] = job
                if m._flusher is None:
                    m._flusher = self._loop.call_later(self._flush_s, m._flush_dirty)
                if self._listening():
                    self._publish("job_running", {"id": job_id, "agent": job.agent})
            return True
        job.result = frames[2] if len(frames) > 2 else b""
        job.result_flags = fields[3] & 0x0F00
        agent = job.agent
        # JobManager._release_slot, inlined: one slot of the agent's free, its backlog fed
        out = self._outstanding.get(agent, 0) - 1
        if out > 0:
            self._outstanding[agent] = out
        else:
            self._outstanding.pop(agent, None)
        if agent in self._backlog:
            m._feed_soon(agent)
        job.phase = P_FINISHING
        job.finished = now
        job.lease_expires = 0.0
        self.live -= 1
        self._dirty.pop(job_id, None)
        self._append(job_id, self._prepared(job), job)  # job(err): _finished
        if self._listening():
            self._publish("job_finished", {"id": job_id, "state": "SUCCEEDED", "agent": agent})
        return True

    cpdef _finished(self, _Job job, err):
        """Its final record is written: the result to the client (JobManager._finished)."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        if err is not None:
            log.error("job %d finished as SUCCEEDED but could not be logged: %s", job.id, err)
        hdr = _header(_REPLY, job.result_flags, 0, job.corr, job.id)
        self._to_peer(job.rid, [hdr, b"", job.result or b""])

    # --------------------------------------------------------------- the events

    def dispatch(self, list events, sessions, other):
        """A turn's events from the data plane, in order: a tracked REQUEST from a client with
        no secured session and a job's answer go to ``JobManager`` from here, every other event to
        ``other`` (see ``_jobfast_py.FastJobs.dispatch``)."""
        cdef list event, frames
        cdef int ev
        cdef tuple fields
        m = self._m
        for item in events:
            ev = -1
            try:
                if type(item) is not list:
                    other(item)
                    continue
                event = <list>item
                if len(event) and type(event[0]) is bytes and len(<bytes>event[0]) == 1:
                    ev = (<bytes>event[0])[0]
                if (ev == _EV_MSG or ev == _EV_JOB) and len(event) > 2 and len(event[2]) == _HEADER_SIZE:
                    if ev == _EV_MSG:
                        fields = _unpack_header(event[2])
                        rid = event[1]
                        if fields[2] == _REQUEST and fields[3] & _F_TRACKED and rid not in sessions:
                            frames = event[2:]
                            if not self.submit(rid, fields, frames):
                                m._submit(rid, fields, frames)
                            continue
                    elif ev == _EV_JOB:
                        fields = _unpack_header(event[2])
                        frames = event[2:]
                        if not (fields[8] in self.jobs and self.on_event(fields, frames)):
                            m._on_answer(fields, frames)
                        continue
                other(item)
            except Exception:
                log.exception("control plane failed on event %d", ev)

    # --------------------------------------------------------------- hand-over

    def take(self, job_id):
        """Hand a live job to ``JobManager``: its record and ``_Live`` as JobManager would hold
        them now (in ``_live``, ``_mem``, and ``_delivered`` / ``_dirty`` once dispatched)."""
        from orbitmesh.jobs import _Live

        cdef _Job job = self.jobs.pop(job_id)
        assert job.phase != P_FINISHING, "a finishing job stays until its record is written"
        rec = self._record(job)
        job.rec = rec
        self.live -= 1
        self.handed_over += 1
        self._live[job_id] = rec
        self._mem[job_id] = mem = _Live([(job.rid, job.corr)])
        if job.phase != P_PENDING:
            mem.sent_to = job.agent
            self._delivered[job_id] = None
            if self._dirty.pop(job_id, None) is not None:
                self._m._dirty[job_id] = rec
        return rec

    def peek(self, job_id):
        """A snapshot of a job in this table, as ``JobManager.get`` would return it; else None."""
        job = self.jobs.get(job_id)
        return None if job is None else self._record(<_Job>job)

    def expire(self, double now):
        """Hand the jobs whose lease has expired to ``JobManager`` (its sweep redelivers them)."""
        cdef _Job job
        gone = [
            job.id
            for job in self.jobs.values()
            if (job.phase == P_DISPATCHED or job.phase == P_RUNNING) and 0 < job.lease_expires < now
        ]
        for job_id in gone:
            self.take(job_id)

    def flush_dirty(self):
        """Queue the records of the jobs dispatched or running since the last flush."""
        cdef _Job job
        dirty, self._dirty = self._dirty, {}
        for job in dirty.values():
            self._append(job.id, self._prepared(job), None)

    cdef _append(self, uint64_t job_id, snapshot, done):
        """``JobLog.append_prepared``, as a C call to the log's queue (``JobLog.offer``)."""
        if not self._offer((job_id, snapshot, done)):
            self._log.refuse(done)

    cdef long _window(self, agent) except -1:
        """``JobManager._window``: jobs one agent may have out at once."""
        cdef long capacity = self._capacity(agent)
        return capacity + min(capacity, 256) if capacity > 0 else 64

    cdef _forget(self, _Job job):
        if self.jobs.pop(job.id, None) is not None and job.phase != P_FINISHING:
            self.live -= 1
        self._dirty.pop(job.id, None)

    # ------------------------------------------------------------------ record

    cdef tuple _values(self, _Job job):
        """The ``VARIABLE`` fields of the job's record, as JobManager's path makes them at the same point."""
        cdef double created = job.created, updated
        cdef int phase = job.phase
        cdef list steps = [("PENDING", created, "")]
        if phase == P_PENDING:
            return (job.id, job.command, job.route, job.params, job.flags, _STATES[phase], 0, created, created,
                    job.agent, 0, 0, 0.0, None, 0, steps)
        agent = job.agent
        steps.append(("DISPATCHED", job.dispatched, agent))
        updated = job.dispatched
        if job.running:
            steps.append(("RUNNING", job.running, agent))
            updated = job.running
        result, result_flags = None, 0
        if phase == P_FINISHING:
            result, result_flags = job.result, job.result_flags
            steps.append(("SUCCEEDED", job.finished, agent))
            updated = job.finished
            steps += job.late
        return (job.id, job.command, job.route, job.params, job.flags, _STATES[phase], 1, created, updated,
                agent, job.session, 1, job.lease_expires, result, result_flags, steps)

    cdef object _prepared(self, _Job job):
        """The job's record as the store prepares it for the log, encoded from the template."""
        cdef tuple values = self._values(job)
        return self._prepare(job.id, values[5], job.agent, job.command, job.created, values[8], self._pack_record(values))

    cdef object _record(self, _Job job):
        """The job's record (a hand-over, a query), field for field as JobManager's path makes it."""
        cdef dict values = self._defaults.copy()
        rec = _new_record(_JobRecord)
        rec.__dict__ = values
        values.update(zip(VARIABLE, self._values(job)))
        return rec
