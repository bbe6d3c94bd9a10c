"""A durable job's common path, lean (the pure-Python twin of ``_jobfast_c``): the jobs that need
nothing but submit -> logged -> ACCEPTED -> dispatched -> answered -> logged -> the result to the
client, kept as one small object each instead of a ``JobRecord``, its ``_Live`` and their closures.

``JobManager`` owns the semantics; this table keeps them, byte for byte (the same records in the
log, the same messages, at the same moments), for the jobs it takes: a tracked REQUEST with no
options whose agent is known and registered (a NAME route, or a selector ``JobManager``'s chooser
resolves). Anything else about a job it holds -- an agent's ERROR, a lease that
expires, a stale answer, ``cancel``, ``wait``, its agent gone or full when it is to be sent --
hands it to ``JobManager`` (``take``): its ``JobRecord`` and ``_Live`` are built as
``JobManager`` would hold them at that point, and ``JobManager`` carries on from there. Queries by
id read a snapshot (``peek``). Everything runs on the control plane's loop, like ``JobManager``.

Why: the broker's GIL bounds durable jobs/s (docs/performance.md, "Durable execute"), and the
objects and calls per job of the general path were most of the control plane's share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

from .._wire import HDR
from ..models import JobState
from ..protocol import F_TRACKED, Kind, Route
from ..storage.base import JobRecord
from .record import RecordTemplate

if TYPE_CHECKING:
    from ..jobs import JobManager

log = logging.getLogger("orbitmesh.jobs")

_REQUEST, _ACCEPTED, _RUNNING, _REPLY = int(Kind.REQUEST), int(Kind.ACCEPTED), int(Kind.RUNNING), int(Kind.REPLY)
_NAME_ROUTE = bytes((Route.NAME,))
_pack_header, _unpack_header, _HEADER_SIZE = HDR.pack, HDR.unpack, HDR.size
# The data plane's events the table takes (see dispatch): a peer's message, a tracked job's answer.
_EV_MSG, _EV_JOB = 1, 3
_new_record = object.__new__

# A fast job's phases (its record's state, but for FINISHING: SUCCEEDED, its record being written).
PENDING, DISPATCHED, RUNNING, FINISHING = 0, 1, 2, 3
_STATES = (JobState.PENDING, JobState.DISPATCHED, JobState.RUNNING, JobState.SUCCEEDED)
# The fields a fast job's record has of its own (in field order); the rest are the template's.
VARIABLE = (
    "id",
    "command",
    "route",
    "params",
    "flags",
    "state",
    "attempts",
    "created",
    "updated",
    "agent",
    "session",
    "lease",
    "lease_expires",
    "result",
    "result_flags",
    "transitions",
)


class _Job:
    """One job on the common path: what its record and its answer need, nothing more."""

    __slots__ = (
        "agent",
        "command",
        "corr",
        "created",
        "dispatched",
        "finished",
        "flags",
        "id",
        "late",
        "lease_expires",
        "params",
        "phase",
        "rec",
        "result",
        "result_flags",
        "rid",
        "route",
        "running",
        "session",
        "table",
    )

    def __init__(
        self, table: FastJobs, job_id: int, rid: bytes, corr: int, route: bytes, command: str, params: bytes, flags: int
    ) -> None:
        self.table = table
        self.id = job_id
        self.rid = rid
        self.corr = corr
        self.route = route
        self.command = command
        self.params = params
        self.flags = flags
        self.agent = ""
        self.phase = PENDING
        self.created = self.dispatched = self.running = self.finished = 0.0
        self.lease_expires = 0.0
        self.session = 0
        self.result: bytes | None = None
        self.result_flags = 0
        self.late: list[tuple[str, float, str]] = []  # LATE_* transitions after it finished
        self.rec: JobRecord | None = None  # once handed to JobManager: the record it holds

    def __call__(self, err: BaseException | None) -> None:
        """The log's callback for the job's records that have one: its new record written (its
        ACCEPTED and dispatch follow), or its final one (its result follows)."""
        if self.phase == FINISHING:
            self.table._finished(self, err)
        else:
            self.table._accepted(self, err)


class FastJobs:
    """The common-path job table of one ``JobManager`` (see the module docstring)."""

    def __init__(self, manager: JobManager, defaults: dict[str, Any], jobs_rid: bytes, flush_s: float) -> None:
        self._m = manager
        self._defaults = defaults  # a new record's fields (JobManager's template)
        self._jobs_rid = jobs_rid  # the client the data plane sees for every tracked dispatch
        self._flush_s = flush_s  # JobManager's DIRTY_FLUSH_S
        self.jobs: dict[int, _Job] = {}
        self.live = 0  # jobs not yet finished (JobManager counts these as live)
        self.taken = 0  # jobs taken on this path, ever
        self.handed_over = 0  # of those, handed to JobManager before they ended
        self._dirty: dict[int, _Job] = {}  # dispatched or running, not yet logged in that state
        # Its records are encoded from the template and handed to the store's prepare_encoded,
        # with no JobRecord: the bytes are those of the record _record makes (FieldPacker's).
        self._template = RecordTemplate(list(defaults), defaults, VARIABLE)
        self._prepare = manager.log.store.prepare_encoded

    # ------------------------------------------------------------------ submit

    def submit(self, rid: bytes, fields: tuple[Any, ...], frames: list[bytes]) -> bool:
        """Take a client's tracked REQUEST if it needs only the common path; False (and nothing
        done) leaves it to ``JobManager.submit``."""
        n = len(frames)
        if fields[2] != _REQUEST or n < 3 or n > 5 or (n == 5 and frames[4]):
            return False  # not a job request, or with options
        m = self._m
        if len(m._live) + self.live >= m.max_live:
            return False  # JobManager refuses it (QUEUE_FULL)
        try:
            command = frames[2].decode()
        except UnicodeDecodeError:
            return False
        route = frames[1]
        name = m._names.get(route)
        if name is None or m._agent_session(name) is None:
            chosen = m._choose(route, command, m._free)
            if not isinstance(chosen, str):
                return False  # JobManager logs it with no agent, and parks it
            name = chosen
            if route[:1] == _NAME_ROUTE and len(m._names) < 4096:
                m._names[route] = name
        job_id = m._next_id
        m._next_id = job_id + 1
        job = _Job(self, job_id, rid, fields[7], route, command, frames[3] if n > 3 else b"", fields[3] & 0x0F00)
        job.agent = name
        job.created = time.time()
        self.jobs[job_id] = job
        self.live += 1
        self.taken += 1
        m.log.append_prepared(job_id, self._prepared(job), job)  # job(err): _accepted
        return True

    def _accepted(self, job: _Job, err: BaseException | None) -> None:
        """Its new record is written: ACCEPTED, then the dispatch (JobManager._accepted)."""
        m = self._m
        if job.rec is not None:  # handed to JobManager meanwhile: it answers
            m._accepted(job.rec, job.rid, job.corr, err)
            return
        if err is not None:
            self._forget(job)
            m._not_recorded(job.rid, job.corr, job.id, err)
            return
        job_id = job.id
        m._to_peer(job.rid, [_pack_header(b"OM", 1, _ACCEPTED, 0, 0, 0, 0, job.corr, job_id, 0), b""])
        if m._listening():
            m._publish("job_accepted", {"id": job_id, "command": job.command})
        agent = job.agent
        session = m._agent_session(agent)
        out = m._outstanding.get(agent, 0)
        if session is None or out >= m._window(agent):
            m._dispatch(self.take(job_id).id)  # its agent is gone or full: JobManager decides
            return
        m._outstanding[agent] = out + 1
        hdr = _pack_header(b"OM", 1, _REQUEST, job.flags | F_TRACKED, 0, 1, 0, job_id, job_id, 0)
        route = m._routes.get(agent)
        if route is None:
            route = _NAME_ROUTE + b"\x00" + agent.encode()
            if len(m._routes) < 4096:
                m._routes[agent] = route
        m._send([m._op_inject, self._jobs_rid, hdr, route, job.command.encode(), job.params])
        now = time.time()
        job.session = session
        job.lease_expires = now + m.lease_s
        job.phase = DISPATCHED
        job.dispatched = now
        self._dirty[job_id] = job
        if m._flusher is None:
            m._flusher = m._loop.call_later(self._flush_s, m._flush_dirty)

    # ----------------------------------------------------------------- answers

    def on_event(self, fields: tuple[Any, ...], frames: list[bytes]) -> bool:
        """A RUNNING / REPLY / ERROR about a job in this table: True if handled here; else the job
        is ``JobManager``'s now (or was never live here) and ``JobManager.on_event`` goes on."""
        kind, lease, job_id = fields[2], fields[5], fields[8]
        job = self.jobs[job_id]
        phase = job.phase
        if phase == FINISHING:
            # JobManager._late on a finished job: recorded, never applied (RUNNING: ignored)
            if kind != _RUNNING:
                job.late.append((f"LATE_{Kind(kind).name}", time.time(), f"lease {lease}"))
                self._m.log.append_prepared(job_id, self._prepared(job))
            return True
        if phase == PENDING or lease != 1 or (kind != _RUNNING and kind != _REPLY):
            self.take(job_id)
            return False
        m = self._m
        now = time.time()
        if kind == _RUNNING:
            job.lease_expires = now + m.lease_s
            if phase == DISPATCHED:
                job.phase = RUNNING
                job.running = now
                self._dirty[job_id] = job
                if m._flusher is None:
                    m._flusher = m._loop.call_later(self._flush_s, m._flush_dirty)
                if m._listening():
                    m._publish("job_running", {"id": job_id, "agent": job.agent})
            return True
        job.result = frames[2] if len(frames) > 2 else b""
        job.result_flags = fields[3] & 0x0F00
        agent = job.agent
        m._release_slot(agent)  # JobManager._release
        job.phase = FINISHING
        job.finished = now
        job.lease_expires = 0.0
        self.live -= 1
        self._dirty.pop(job_id, None)
        m.log.append_prepared(job_id, self._prepared(job), job)  # job(err): _finished
        if m._listening():
            m._publish("job_finished", {"id": job_id, "state": "SUCCEEDED", "agent": agent})
        return True

    def _finished(self, job: _Job, err: BaseException | None) -> None:
        """Its final record is written: the result to the client (JobManager._finished)."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        if err is not None:
            log.error("job %d finished as SUCCEEDED but could not be logged: %s", job.id, err)
        hdr = _pack_header(b"OM", 1, _REPLY, job.result_flags, 0, 0, 0, job.corr, job.id, 0)
        self._m._to_peer(job.rid, [hdr, b"", job.result or b""])

    # --------------------------------------------------------------- the events

    def dispatch(
        self, events: list[list[bytes]], sessions: Container[bytes], other: Callable[[list[bytes]], None]
    ) -> None:
        """A turn's events from the data plane (``[event, rid, header, ...]`` each), in order.

        A tracked REQUEST from a client with no secured session (not in ``sessions``) goes to
        ``JobManager.submit``, and a job's answer (``EV_JOB``) to ``JobManager.on_event``, both
        from here: this table first, as they would, then their general paths. Every other
        event goes to ``other`` (the broker's own dispatch). What the broker's three Python
        calls per message did, for the two messages a durable job brings up. An exception
        handling one event is logged, and the others go on (the broker's rule)."""
        m = self._m
        for event in events:
            ev = -1
            try:
                if type(event) is not list:
                    other(event)
                    continue
                if event and type(event[0]) is bytes and len(event[0]) == 1:
                    ev = event[0][0]
                if (ev == _EV_MSG or ev == _EV_JOB) and len(event) > 2 and len(event[2]) == _HEADER_SIZE:
                    if ev == _EV_MSG:
                        fields = _unpack_header(event[2])
                        rid = event[1]
                        if fields[2] == _REQUEST and fields[3] & F_TRACKED and rid not in sessions:
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
                other(event)
            except Exception:
                log.exception("control plane failed on event %d", ev)

    # --------------------------------------------------------------- hand-over

    def take(self, job_id: int) -> JobRecord:
        """Hand a live job to ``JobManager``: its record and ``_Live`` as JobManager would hold
        them now (in ``_live``, ``_mem``, and ``_delivered`` / ``_dirty`` once dispatched)."""
        from ..jobs import _Live

        job = self.jobs.pop(job_id)
        assert job.phase != FINISHING, "a finishing job stays until its record is written"
        m = self._m
        rec = self._record(job)
        job.rec = rec
        self.live -= 1
        self.handed_over += 1
        m._live[job_id] = rec
        m._mem[job_id] = mem = _Live([(job.rid, job.corr)])
        if job.phase != PENDING:
            mem.sent_to = job.agent  # its slot, counted in _outstanding at dispatch
            m._delivered[job_id] = None
            if self._dirty.pop(job_id, None) is not None:
                m._dirty[job_id] = rec
        return rec

    def peek(self, job_id: int) -> JobRecord | None:
        """A snapshot of a job in this table, as ``JobManager.get`` would return it; else None."""
        job = self.jobs.get(job_id)
        return None if job is None else self._record(job)

    def expire(self, now: float) -> None:
        """Hand the jobs whose lease has expired to ``JobManager`` (its sweep redelivers them)."""
        gone = [j.id for j in self.jobs.values() if j.phase in (DISPATCHED, RUNNING) and 0 < j.lease_expires < now]
        for job_id in gone:
            self.take(job_id)

    def flush_dirty(self) -> None:
        """Queue the records of the jobs dispatched or running since the last flush."""
        dirty, self._dirty = self._dirty, {}
        append = self._m.log.append_prepared
        for job_id, job in dirty.items():
            append(job_id, self._prepared(job))

    def _forget(self, job: _Job) -> None:
        if self.jobs.pop(job.id, None) is not None and job.phase != FINISHING:
            self.live -= 1
        self._dirty.pop(job.id, None)

    # ------------------------------------------------------------------ record

    def _values(self, job: _Job) -> tuple[Any, ...]:
        """The ``VARIABLE`` fields of the job's record, as JobManager's path makes them at the same point."""
        created = job.created
        steps = [("PENDING", created, "")]
        phase = job.phase
        if phase == PENDING:
            return (job.id, job.command, job.route, job.params, job.flags, _STATES[phase], 0, created, created,
                    job.agent, 0, 0, 0.0, None, 0, steps)  # fmt: skip
        agent = job.agent
        steps.append(("DISPATCHED", job.dispatched, agent))
        updated = job.dispatched
        if job.running:
            steps.append(("RUNNING", job.running, agent))
            updated = job.running
        result, result_flags = None, 0
        if phase == FINISHING:
            result, result_flags = job.result, job.result_flags
            steps.append(("SUCCEEDED", job.finished, agent))
            updated = job.finished
            steps += job.late
        return (job.id, job.command, job.route, job.params, job.flags, _STATES[phase], 1, created, updated,
                agent, job.session, 1, job.lease_expires, result, result_flags, steps)  # fmt: skip

    def _prepared(self, job: _Job) -> Any:
        """The job's record as the store prepares it for the log, encoded from the template."""
        values = self._values(job)
        data = self._template.pack(values)
        return self._prepare(job.id, values[5], job.agent, job.command, job.created, values[8], data)

    def _record(self, job: _Job) -> JobRecord:
        """The job's record (a hand-over, a query), field for field as JobManager's path makes it."""
        rec = _new_record(JobRecord)
        rec.__dict__ = values = self._defaults.copy()
        values.update(zip(VARIABLE, self._values(job), strict=True))
        return rec


public_api = ["DISPATCHED", "FINISHING", "FastJobs", "PENDING", "RUNNING"]
