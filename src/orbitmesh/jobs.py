"""Tracked jobs in the broker's control plane: lifecycle, retries, leases, idempotency,
cancellation, recovery after a restart and retention, over a :class:`JobStore`.

States: PENDING -> DISPATCHED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | TIMED_OUT | LOST;
every transition is appended to the record and written through the group-committing
:class:`~orbitmesh.joblog.JobLog`. ACCEPTED goes to the client only once the new record is
written (durably, in ``sync`` mode).

The data plane sends a tracked job's answers here only (``EV_JOB``), never to the client: this
module decides whether an error is final or retried, and answers the client's ``execute``
(and any ``wait``) with the final outcome.

The jobs that need only the common path (no options, their agent registered) are
held by ``_core.jobfast.FastJobs`` (compiled, with its pure twin) until anything else happens to
them; it keeps these semantics, and hands such a job back here with the record and state this
module would hold at that point.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from ._core.jobfast import FINISHING, FastJobs
from ._wire import HDR, error_message, header
from .errors import ErrorCode, OrbitMeshError
from .joblog import JobLog
from .models import JobState
from .protocol import F_TRACKED, Kind, Route
from .storage.base import JobRecord, JobStore

log = logging.getLogger("orbitmesh.jobs")

# The client the data plane sees for every tracked dispatch: never a connected peer, since
# tracked answers go to the control plane only.
JOBS_RID = b"\x00orbitmesh-jobs"

# Refusals that say "no agent could take it now", not "the job failed": they are retried
# without using up an attempt, until the job's dispatch window closes.
_WAIT_CODES = frozenset(
    (
        ErrorCode.NO_SUCH_AGENT,
        ErrorCode.NO_AGENT_AVAILABLE,
        ErrorCode.QUEUE_FULL,
        ErrorCode.DEADLINE_EXCEEDED,
        ErrorCode.AGENT_BUSY,
    )
)
# What the control plane's own choice says when nobody can take a job now: it parks (_park).
_NO_AGENT_CODES = frozenset((ErrorCode.NO_SUCH_AGENT, ErrorCode.NO_AGENT_AVAILABLE))
_FINAL_CODES = frozenset(
    (ErrorCode.UNKNOWN_COMMAND, ErrorCode.BAD_PAYLOAD, ErrorCode.BAD_ROUTE, ErrorCode.NO_RAW_HANDLER)
)
DIRTY_FLUSH_S = 0.25
_NAME_ROUTE = bytes((Route.NAME,))
# The hot path compares plain ints and module constants (an enum attribute costs 70-190 ns).
_REQUEST, _ACCEPTED, _RUNNING, _REPLY, _ERROR = (
    int(Kind.REQUEST),
    int(Kind.ACCEPTED),
    int(Kind.RUNNING),
    int(Kind.REPLY),
    int(Kind.ERROR),
)
_PENDING, _DISPATCHED, _RUNNING_STATE, _SUCCEEDED = (
    JobState.PENDING,
    JobState.DISPATCHED,
    JobState.RUNNING,
    JobState.SUCCEEDED,
)
_VALUE = {state: state.value for state in JobState}  # what a transition records
_pack_header = HDR.pack
_unpack_header = HDR.unpack
_OPTION_KEYS = frozenset(
    ("max_attempts", "retry_initial", "retry_max", "non_retryable", "timeout", "delay", "run_at", "key")
)


@dataclass
class JobOptions:
    """Per-job policy a client may set with ``execute``."""

    max_attempts: int = 1
    retry_initial: float = 0.5
    retry_max: float = 30.0
    non_retryable: tuple[str, ...] = ()
    timeout: float = 0.0  # per attempt; 0 = none
    run_at: float = 0.0  # unix seconds; 0 = now
    key: str = ""  # idempotency key

    @classmethod
    def parse(cls, raw: bytes | None) -> JobOptions:
        """From the REQUEST's options frame (a msgpack map); raises ValueError naming the field."""
        if not raw:
            return cls()
        data = msgpack.unpackb(raw, raw=False)
        if not isinstance(data, dict):
            raise ValueError("job options must be a map")
        unknown = set(data) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown job options {sorted(unknown)}")
        opts = cls()
        if "max_attempts" in data:
            opts.max_attempts = _num(data, "max_attempts", int, 1, 1000)
        if "retry_initial" in data:
            opts.retry_initial = _num(data, "retry_initial", float, 0.0, 86400.0)
        if "retry_max" in data:
            opts.retry_max = _num(data, "retry_max", float, 0.0, 86400.0)
        if "timeout" in data:
            opts.timeout = _num(data, "timeout", float, 0.0, 365 * 86400.0)
        if "delay" in data:
            opts.run_at = time.time() + _num(data, "delay", float, 0.0, 365 * 86400.0)
        if "run_at" in data:
            opts.run_at = _num(data, "run_at", float, 0.0, 1e11)
        if "non_retryable" in data:
            value = data["non_retryable"]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("non_retryable must be a list of error type names")
            opts.non_retryable = tuple(value)
        if "key" in data:
            key = data["key"]
            if not isinstance(key, str) or not 0 < len(key) <= 256:
                raise ValueError("the idempotency key must be a string of 1 to 256 characters")
            opts.key = key
        return opts


_NO_OPTIONS = JobOptions()  # shared by every job submitted without options: never modified
# A new record's fields: JobRecord's defaults, with _NO_OPTIONS's policy (its lists are replaced).
_RECORD_DEFAULTS = JobRecord(
    id=1,
    command="",
    max_attempts=_NO_OPTIONS.max_attempts,
    run_at=_NO_OPTIONS.run_at,
    timeout=_NO_OPTIONS.timeout,
    idempotency_key=_NO_OPTIONS.key,
    retry_initial=_NO_OPTIONS.retry_initial,
    retry_max=_NO_OPTIONS.retry_max,
    non_retryable=_NO_OPTIONS.non_retryable,
).__dict__
_new_record = object.__new__


def _num(data: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{name} must be a number")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return kind(value)


Watcher = Callable[[JobRecord, bytes, int], None]


class _Live:
    """What the control plane keeps in memory about a live job (never persisted)."""

    __slots__ = (
        "backlogged",
        "held",
        "parked",
        "rerouted",
        "sent_to",
        "timer",
        "wait_rounds",
        "waiters",
        "waiting_since",
        "watchers",
    )

    def __init__(self, waiters: list[tuple[bytes, int]] | None = None) -> None:
        self.waiters: list[tuple[bytes, int]] = [] if waiters is None else waiters  # execute callers
        self.watchers: list[tuple[bytes, int, Watcher]] = []  # wait queries
        self.timer: asyncio.TimerHandle | None = None
        self.waiting_since = 0.0  # first "no agent" refusal of this dispatch round
        self.wait_rounds = 0  # "no agent" refusals so far in this round
        # While no agent can take it: (where it waits: an agent name or a (route, command) key,
        # the error code and message it fails with when its dispatch window closes).
        self.parked: tuple[str | tuple[bytes, str], int, str] | None = None
        self.sent_to: str | None = None  # the agent its current delivery went to (one of its slots)
        self.backlogged: str | None = None  # the agent whose backlog it waits in for a slot
        self.rerouted = False  # sent elsewhere once already because its agent had no room
        # Its agent may hold it already (recovered naming an agent): never moved for lack of
        # room, only once that agent has had recovery_wait_s to come back and did not.
        self.held = False


class JobManager:
    """The job table of one broker. ``send(frames)`` puts an OP_* message to the data plane;
    ``to_peer(rid, frames)`` answers a client through it; ``publish(topic, data)`` emits events."""

    def __init__(
        self,
        store: JobStore,
        loop: asyncio.AbstractEventLoop,
        *,
        op: dict[str, bytes],
        send: Callable[[list[bytes]], None],
        to_peer: Callable[[bytes, list[bytes]], None],
        publish: Callable[[str, dict[str, Any]], None],
        choose: Callable[[bytes, str, Callable[[str], int]], str | OrbitMeshError],
        agent_session: Callable[[str], int | None],
        listening: Callable[[], object] | None = None,
        agent_capacity: Callable[[str], int] | None = None,
        lease_s: float = 5.0,
        dispatch_window_s: float = 60.0,
        recovery_wait_s: float | None = None,
        retention_age_s: float = 7 * 86400.0,
        retention_count: int = 1_000_000,
        max_live: int = 1_000_000,
        fast_path: bool = True,
    ) -> None:
        self.store = store
        self._loop = loop
        self._op = op
        self._send = send
        self._to_peer = to_peer
        self._publish = publish
        # Whether anyone subscribed to events: when not, no event is even built.
        self._listening: Callable[[], object] = listening or (lambda: True)
        self._op_inject = op["INJECT"]
        self._routes: dict[str, bytes] = {}  # agent name -> its NAME route frame
        self._names: dict[bytes, str] = {}  # a client's NAME route frame -> the agent name
        self._choose = choose
        self._agent_session = agent_session
        self.lease_s = lease_s
        self.dispatch_window_s = dispatch_window_s
        # How long a job waits for the agent its record names to come back (after a restart)
        # before another agent may take it: that agent may hold the job, done or running.
        self.recovery_wait_s = 2 * lease_s if recovery_wait_s is None else recovery_wait_s
        self.retention_age_s = retention_age_s
        self.retention_count = retention_count
        self.max_live = max_live  # unfinished jobs held in memory; beyond, a new job is refused
        self.refused_full = 0
        self.log = JobLog(store, loop)
        self._live: dict[int, JobRecord] = {}
        self._mem: dict[int, _Live] = {}
        self._by_key: dict[str, int] = {}
        self._recent: dict[int, JobRecord] = {}  # finished, until the log has written them
        self._dirty: dict[int, JobRecord] = {}  # changed, to be written with the next flush
        self._unwritten: dict[int, list[tuple[bytes, int]]] = {}  # new jobs not yet in the log -> parked submits
        self._flusher: asyncio.TimerHandle | None = None
        self._awaiting: dict[str, set[int]] = {}  # agent name -> jobs waiting for it to (re-)register
        self._parked_any: dict[tuple[bytes, str], set[int]] = {}  # (route, command) -> jobs no agent matches yet
        self._park_deadlines: list[tuple[float, int, float]] = []  # heap: (window closes, job, waiting since)
        self._park_timer: asyncio.TimerHandle | None = None
        self._delivered: dict[int, None] = {}  # jobs sent to an agent (DISPATCHED / RUNNING, or were)
        # Jobs out with each agent, and the ones waiting for a slot (oldest first): an agent takes
        # its capacity plus a little, so a backlog (an agent back after a while, a restart) is fed
        # to it as it answers instead of overflowing the data plane's queue into retries.
        self._agent_capacity = agent_capacity or (lambda name: 0)
        self._outstanding: dict[str, int] = {}
        self._backlog: dict[str, dict[int, None]] = {}
        self._feeding: set[str] = set()
        self._next_id = 1
        self._sweeper: asyncio.TimerHandle | None = None
        self.recovered = 0
        # The common path's jobs (_core/jobfast): same semantics, a fraction of the objects per job.
        self._fast = FastJobs(self, _RECORD_DEFAULTS, JOBS_RID, DIRTY_FLUSH_S) if fast_path else None
        # The broker hands it a turn's events (``FastJobs.dispatch``): a job's two messages up
        # from the data plane reach the table with no Python call of the broker's between.
        self.dispatch_events = self._fast.dispatch if self._fast is not None else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover every unfinished job from the (open) store, start the writer and the sweeps."""
        self._next_id = self.store.max_id() + 1
        self.log.start()
        now = time.time()
        for rec in self.store.unfinished():
            self._live[rec.id] = rec
            self._mem[rec.id] = mem = _Live()
            mem.held = bool(rec.agent)
            if rec.idempotency_key:
                self._by_key[rec.idempotency_key] = rec.id
            if rec.state in (JobState.DISPATCHED, JobState.RUNNING):
                # Its delivery died with the previous broker: deliver again. The interrupted
                # attempt is not held against the job; the agent dedups by job id.
                rec.attempts = max(0, rec.attempts - 1)
                self._transition(rec, JobState.PENDING, now, "broker restarted")
                self._touch(rec)
            self._schedule(rec, max(rec.run_at, now + 0.05))
            self.recovered += 1
        if self.recovered:
            log.info("recovered %d unfinished jobs", self.recovered)
        self._sweeper = self._loop.call_later(1.0, self._sweep)

    def stop(self) -> None:
        """On the loop: stop every timer and queue the changes not yet written."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        if self._park_timer is not None:
            self._park_timer.cancel()
        self._flush_dirty()
        for mem in self._mem.values():
            if mem.timer is not None:
                mem.timer.cancel()

    def close(self) -> None:
        """Blocking: let the writer write what is queued, then close the store."""
        self.log.stop()
        self.store.close()

    # -------------------------------------------------------------- submit

    def submit(self, rid: bytes, fields: tuple[Any, ...], frames: list[bytes]) -> None:
        """A client's tracked REQUEST: frames = [hdr, route, command, params, options?]."""
        fast = self._fast
        if fast is not None and fast.submit(rid, fields, frames):
            return
        self._submit(rid, fields, frames)

    def _submit(self, rid: bytes, fields: tuple[Any, ...], frames: list[bytes]) -> None:
        """``submit``'s general path: a request the common-path table did not take."""
        fast = self._fast
        flags, corr = fields[3], fields[7]
        try:
            if fields[2] != _REQUEST or len(frames) < 3:
                raise ValueError("a job is a REQUEST with a command")
            command = frames[2].decode()
            opts = JobOptions.parse(frames[4]) if len(frames) > 4 and frames[4] else _NO_OPTIONS
        except (ValueError, UnicodeDecodeError, msgpack.UnpackException) as exc:
            self._to_peer(rid, error_message(ErrorCode.BAD_PAYLOAD, corr, f"bad job request: {exc}"))
            return
        if opts.key:
            existing = self._by_key.get(opts.key)
            if existing is None:
                existing = self.store.find_key(opts.key)
            if existing is not None:
                self._attach(existing, rid, corr)
                return
        live = len(self._live) + (fast.live if fast is not None else 0)
        if live >= self.max_live:
            self.refused_full += 1
            message = f"job table full: {live} unfinished jobs (max_live_jobs); try again later"
            self._to_peer(rid, error_message(ErrorCode.QUEUE_FULL, corr, message))
            return
        now = time.time()
        job_id = self._next_id
        route = frames[1]
        # JobRecord(...) with these fields, made from its defaults (half the cost of __init__).
        rec = _new_record(JobRecord)
        rec.__dict__ = values = _RECORD_DEFAULTS.copy()
        values["id"] = job_id
        values["command"] = command
        values["route"] = route
        values["params"] = frames[3] if len(frames) > 3 else b""
        values["flags"] = flags & 0x0F00
        values["created"] = values["updated"] = now
        values["transitions"] = [("PENDING", now, "")]
        if opts is not _NO_OPTIONS:
            values["max_attempts"] = opts.max_attempts
            values["run_at"] = opts.run_at
            values["timeout"] = opts.timeout
            values["idempotency_key"] = opts.key
            values["retry_initial"] = opts.retry_initial
            values["retry_max"] = opts.retry_max
            values["non_retryable"] = opts.non_retryable
        # The agent is written with the job: a restart redelivers it to the same agent.
        name = self._names.get(route)
        if name is not None and self._agent_session(name) is not None:
            rec.agent = name  # a NAME route to a registered agent, as _choose would say
        else:
            chosen = self._choose(route, command, self._free)
            if isinstance(chosen, str):
                rec.agent = chosen
                if route[:1] == _NAME_ROUTE and len(self._names) < 4096:
                    self._names[route] = chosen
        self._next_id = job_id + 1
        self._live[job_id] = rec
        self._mem[job_id] = _Live([(rid, corr)])
        if opts.key:
            self._unwritten[job_id] = []  # submits of the same key wait here for ACCEPTED
            self._by_key[opts.key] = job_id
        self.log.append(rec, lambda err: self._accepted(rec, rid, corr, err))

    def _not_recorded(self, rid: bytes, corr: int, job_id: int, err: BaseException) -> None:
        """Tell a submitter its job could not be logged (so it does not exist)."""
        code = err.code if isinstance(err, OrbitMeshError) else ErrorCode.STORAGE_ERROR
        self._to_peer(rid, error_message(code, corr, f"job not recorded: {err}", job=job_id))

    def _attach(self, job_id: int, rid: bytes, corr: int) -> None:
        """A submit with a known idempotency key: the same job, not a new run."""
        parked = self._unwritten.get(job_id)
        if parked is not None:
            parked.append((rid, corr))  # ACCEPTED only once the job is in the log
            return
        self._to_peer(rid, [header(Kind.ACCEPTED, corr=corr, job=job_id), b""])
        rec = self._live.get(job_id)
        if rec is not None:
            self._mem[job_id].waiters.append((rid, corr))
            return
        done = self.get(job_id)
        if done is not None:
            self._answer(done, [(rid, corr)])

    def _accepted(self, rec: JobRecord, rid: bytes, corr: int, err: BaseException | None) -> None:
        job_id = rec.id
        extra = self._unwritten.pop(job_id, None) if self._unwritten else None
        if err is None and not extra:  # the common case
            self._to_peer(rid, [_pack_header(b"OM", 1, _ACCEPTED, 0, 0, 0, 0, corr, job_id, 0), b""])
            if self._listening():
                self._publish("job_accepted", {"id": job_id, "command": rec.command})
            if rec.state is _PENDING:  # not cancelled meanwhile
                if rec.run_at <= 0:
                    self._dispatch(job_id)
                else:
                    self._schedule(rec, rec.run_at)
            return
        parked = [(rid, corr), *(extra or ())]
        if err is not None:
            self._live.pop(rec.id, None)
            self._mem.pop(rec.id, None)
            self._by_key.pop(rec.idempotency_key, None)
            for r, c in parked:
                self._not_recorded(r, c, rec.id, err)
            return
        mem = self._mem.get(rec.id)
        for r, c in parked:
            self._to_peer(r, [header(Kind.ACCEPTED, corr=c, job=rec.id), b""])
            if mem is not None and (r, c) != (rid, corr):
                mem.waiters.append((r, c))
        if self._listening():
            self._publish("job_accepted", {"id": rec.id, "command": rec.command})
        if rec.state is _PENDING:  # not cancelled meanwhile
            self._schedule(rec, rec.run_at)

    # ------------------------------------------------------------ dispatch

    def _schedule(self, rec: JobRecord, at: float) -> None:
        mem = self._mem[rec.id]
        if mem.timer is not None:
            mem.timer.cancel()
            mem.timer = None
        delay = at - time.time()
        if delay <= 0:
            self._dispatch(rec.id)
        else:
            mem.timer = self._loop.call_later(delay, self._dispatch, rec.id)

    def _dispatch(self, job_id: int) -> None:
        rec = self._live.get(job_id)
        if rec is None or rec.state is not _PENDING:
            return
        mem = self._mem[job_id]
        mem.timer = None
        if mem.parked is not None:
            self._unpark(job_id, mem)
        if mem.backlogged is not None:
            self._drop_backlogged(job_id, mem)
        session = self._agent_session(rec.agent) if rec.agent else None
        if session is not None:
            self._send_job(rec, mem, session)
            return
        now = time.time()
        named = rec.route[:1] == _NAME_ROUTE
        if rec.agent and not named:
            # Its agent is not (back) here. After a restart, give it recovery_wait_s (default
            # two leases) to re-register: it may hold the job, done or running, and an agent
            # only dedups the jobs it has seen itself. An agent notices the old broker's
            # silence within its liveness window (one lease), then reconnects with backoff.
            mem.waiting_since = mem.waiting_since or now
            left = self.recovery_wait_s - (now - mem.waiting_since)
            if left > 0:
                # Woken by agent_joined, or by this timer when the wait is over.
                self._awaiting.setdefault(rec.agent, set()).add(job_id)
                mem.timer = self._loop.call_later(left, self._dispatch, job_id)
                return
            self._awaiting.get(rec.agent, set()).discard(job_id)
            rec.agent = ""
            mem.held = False
        if rec.agent:  # a named agent that is not registered (now)
            self._park(rec, mem, rec.agent, ErrorCode.NO_SUCH_AGENT, f"no agent named '{rec.agent}'", now)
            return
        chosen = self._choose(rec.route, rec.command, self._free)
        if isinstance(chosen, OrbitMeshError):
            if chosen.code in _NO_AGENT_CODES:
                where = rec.route[2:].decode("utf-8", "replace") if named else (rec.route, rec.command)
                self._park(rec, mem, where, chosen.code, chosen.message, now)
                return
            rec.attempts += 1  # _on_error gives back the attempts of "no agent" refusals
            self._on_error(rec, chosen.code, chosen.message, "", now)
            return
        rec.agent = chosen
        # Written before it is sent, so a restart knows which agent may hold the answer.
        self.log.append(rec, lambda err: self._send_chosen(job_id))

    def _park(
        self, rec: JobRecord, mem: _Live, where: str | tuple[bytes, str], code: int, message: str, now: float
    ) -> None:
        """No agent can take the job now: it waits, without polling, until an agent joins (the
        one it names, or any agent for a selector: ``agent_joined``) or its dispatch window
        closes (then FAILED with ``code``). Waiting adds one transition, not one per second."""
        if not mem.waiting_since:
            mem.waiting_since = now
            rec.transitions.append((_VALUE[_PENDING], now, f"waiting for an agent: {message}"))
            self._touch(rec)
        elif now - mem.waiting_since >= self.dispatch_window_s:
            rec.error_code, rec.error = code, message
            self._finish(rec, JobState.FAILED, now)
            return
        deadline = mem.waiting_since + self.dispatch_window_s
        entry = (deadline, rec.id, mem.waiting_since)
        if len(self._park_deadlines) > 2 * len(self._live) + 1024:
            self._compact_park_deadlines()
        heapq.heappush(self._park_deadlines, entry)
        if self._park_timer is None or self._park_deadlines[0] == entry:
            self._arm_park_timer()  # the earliest deadline is the one the timer waits for
        mem.parked = (where, code, message)
        if isinstance(where, str):
            rec.agent = where  # a named route: agent_joined(where) sends it
            self._awaiting.setdefault(where, set()).add(rec.id)
        else:
            self._parked_any.setdefault(where, set()).add(rec.id)

    def _unpark(self, job_id: int, mem: _Live) -> None:
        assert mem.parked is not None
        where = mem.parked[0]
        mem.parked = None
        waiting = self._awaiting.get(where) if isinstance(where, str) else self._parked_any.get(where)
        if waiting is not None:
            waiting.discard(job_id)
            if not waiting:
                if isinstance(where, str):
                    del self._awaiting[where]
                else:
                    del self._parked_any[where]

    def _arm_park_timer(self) -> None:
        if self._park_timer is not None:
            self._park_timer.cancel()
        self._park_timer = None
        if self._park_deadlines:
            delay = max(0.0, self._park_deadlines[0][0] - time.time())
            self._park_timer = self._loop.call_later(delay, self._expire_parked)

    def _compact_park_deadlines(self) -> None:
        """Drop the entries of jobs no longer parked in the round they were pushed for (sent,
        ended, or parked again since): entries stay until their window closes otherwise, and a
        job parked again and again would pile them up."""
        keep = []
        for entry in self._park_deadlines:
            mem = self._mem.get(entry[1])
            if mem is not None and mem.parked is not None and mem.waiting_since == entry[2]:
                keep.append(entry)
        heapq.heapify(keep)
        self._park_deadlines = keep

    def _expire_parked(self) -> None:
        """Fail the parked jobs whose dispatch window has closed."""
        self._park_timer = None
        now = time.time()
        heap = self._park_deadlines
        while heap and heap[0][0] <= now:
            _, job_id, since = heapq.heappop(heap)
            mem = self._mem.get(job_id)
            rec = self._live.get(job_id)
            if rec is None or mem is None or mem.parked is None or mem.waiting_since != since:
                continue  # ended, sent meanwhile, or waiting in a later round (its own entry)
            _, code, message = mem.parked
            self._unpark(job_id, mem)
            rec.error_code, rec.error = code, message
            self._finish(rec, JobState.FAILED, now)
        self._arm_park_timer()

    def agent_joined(self, name: str) -> None:
        """An agent (re-)registered: send it the jobs that were waiting for it, and try again
        the jobs no agent matched (once per distinct route and command)."""
        for job_id in self._awaiting.pop(name, ()):
            rec = self._live.get(job_id)
            if rec is not None and rec.state == JobState.PENDING and rec.agent == name:
                mem = self._mem[job_id]
                mem.parked = None  # the set it was in is gone
                if mem.timer is not None:
                    mem.timer.cancel()
                    mem.timer = None
                self._dispatch(job_id)
        for key in list(self._parked_any):
            if isinstance(self._choose(*key, self._free), str):
                for job_id in self._parked_any.pop(key, ()):
                    waiting = self._mem.get(job_id)
                    if waiting is not None:
                        waiting.parked = None
                        self._dispatch(job_id)

    def _send_chosen(self, job_id: int) -> None:
        """Send a job whose agent was just chosen (and logged), if it still waits for that."""
        rec = self._live.get(job_id)
        if rec is None or rec.state is not _PENDING:
            return
        self._send_job(rec, self._mem[job_id], self._agent_session(rec.agent) or 0)

    def _send_job(self, rec: JobRecord, mem: _Live, session: int) -> None:
        job_id = rec.id
        agent = rec.agent
        out = self._outstanding.get(agent, 0)
        if out >= self._window(agent):
            if rec.route[:1] != _NAME_ROUTE and not mem.rerouted and not mem.held:
                # A selector job whose agent has no room: another matching agent with room
                # takes it. Written first (idempotency: a restart must know where it went).
                # Not a recovered job: its agent may hold it (it waits in that agent's backlog;
                # moved, it ran on two agents when the restarted broker had many such jobs).
                other = self._choose(rec.route, rec.command, self._free)
                if isinstance(other, str) and other != agent and self._free(other) > 0:
                    rec.agent = other
                    mem.rerouted = True
                    self.log.append(rec, lambda err: self._send_chosen(job_id))
                    return
            self._backlog.setdefault(agent, {})[job_id] = None
            mem.backlogged = agent
            return
        self._outstanding[agent] = out + 1
        mem.sent_to = agent
        mem.rerouted = False
        rec.attempts += 1
        rec.lease = lease = (rec.lease + 1) & 0xFFFFFFFF or 1
        hdr = _pack_header(b"OM", 1, _REQUEST, rec.flags | F_TRACKED, 0, lease, 0, job_id, job_id, 0)
        route = self._routes.get(agent)
        if route is None:
            route = _NAME_ROUTE + b"\x00" + agent.encode()
            if len(self._routes) < 4096:
                self._routes[agent] = route
        self._send([self._op_inject, JOBS_RID, hdr, route, rec.command.encode(), rec.params])
        # From here the job is the agent's (or waits in the broker's queue for it).
        now = time.time()
        rec.session = session
        rec.lease_expires = now + self.lease_s
        mem.waiting_since = 0.0
        mem.wait_rounds = 0
        rec.state = _DISPATCHED
        rec.updated = now
        rec.transitions.append(("DISPATCHED", now, agent))
        self._delivered[job_id] = None
        self._dirty[job_id] = rec  # _touch, inlined
        if self._flusher is None:
            self._flusher = self._loop.call_later(DIRTY_FLUSH_S, self._flush_dirty)
        if rec.timeout:
            mem.timer = self._loop.call_later(rec.timeout, self._timed_out, job_id, lease)

    def _window(self, agent: str) -> int:
        """Jobs one agent may have out at once: its capacity plus as many queued for it, up to
        256 (a queued job's lease runs while it waits: keep that wait short); 64 if unknown."""
        capacity = self._agent_capacity(agent)
        return capacity + min(capacity, 256) if capacity > 0 else 64

    def _free(self, agent: str) -> int:
        """Slots an agent has for one more job now (its window minus the jobs out with it)."""
        return self._window(agent) - self._outstanding.get(agent, 0)

    def _release(self, mem: _Live) -> None:
        """A delivery ended (answered, lost, retried): its slot goes to the agent's backlog."""
        agent = mem.sent_to
        assert agent is not None
        mem.sent_to = None
        self._release_slot(agent)

    def _release_slot(self, agent: str) -> None:
        """One of ``agent``'s slots is free (a delivery ended): its backlog may take it."""
        out = self._outstanding.get(agent, 0) - 1
        if out > 0:
            self._outstanding[agent] = out
        else:
            self._outstanding.pop(agent, None)
        if agent in self._backlog:
            self._feed_soon(agent)

    def _feed_soon(self, agent: str) -> None:
        """Feed ``agent``'s backlog on the next turn (once, however many slots free meanwhile)."""
        if agent not in self._feeding:
            self._feeding.add(agent)
            self._loop.call_soon(self._feed, agent)

    def _feed(self, agent: str) -> None:
        """Send an agent's backlog while it has slots (a job that cannot go to it any more, e.g.
        the agent left, is dispatched anew: parked, or sent elsewhere)."""
        self._feeding.discard(agent)
        backlog = self._backlog.get(agent)
        gone = self._agent_session(agent) is None
        while backlog and self._outstanding.get(agent, 0) < self._window(agent):
            job_id = next(iter(backlog))
            del backlog[job_id]
            mem = self._mem.get(job_id)
            rec = self._live.get(job_id)
            if mem is not None and rec is not None:
                mem.backlogged = None
                if gone and rec.route[:1] != _NAME_ROUTE and not mem.held:
                    rec.agent = ""  # never sent to it: choose another agent now, no lease's wait
                self._dispatch(job_id)
        if not backlog:
            self._backlog.pop(agent, None)

    def _drop_backlogged(self, job_id: int, mem: _Live) -> None:
        agent = mem.backlogged
        assert agent is not None
        mem.backlogged = None
        backlog = self._backlog.get(agent)
        if backlog is not None:
            backlog.pop(job_id, None)
            if not backlog:
                del self._backlog[agent]

    # ------------------------------------------------------------- answers

    def on_event(self, agent_rid: bytes, frames: list[bytes]) -> None:
        """A tracked job's RUNNING / REPLY / ERROR (from its agent, or from the data plane)."""
        fields = _unpack_header(frames[0])
        fast = self._fast
        if fast is not None and fields[8] in fast.jobs and fast.on_event(fields, frames):
            return
        self._on_answer(fields, frames)

    def _on_answer(self, fields: tuple[Any, ...], frames: list[bytes]) -> None:
        """``on_event``'s general path: an answer about a job the common-path table does not hold."""
        kind, lease, job_id = fields[2], fields[5], fields[8]
        rec = self._live.get(job_id)
        now = time.time()
        if rec is None or rec.lease != lease:
            self._late(job_id, kind, lease, now)
            return
        if kind == _RUNNING:
            rec.lease_expires = now + self.lease_s
            if rec.state is _DISPATCHED:
                rec.state = _RUNNING_STATE
                rec.updated = now
                rec.transitions.append(("RUNNING", now, rec.agent))
                self._dirty[job_id] = rec  # _touch: a flush is already due (set at dispatch)
                if self._flusher is None:
                    self._flusher = self._loop.call_later(DIRTY_FLUSH_S, self._flush_dirty)
                if self._listening():
                    self._publish("job_running", {"id": rec.id, "agent": rec.agent})
        elif kind == _REPLY:
            rec.result = frames[2] if len(frames) > 2 else b""
            rec.result_flags = fields[3] & 0x0F00
            self._finish(rec, _SUCCEEDED, now)
        elif kind == _ERROR:
            code = fields[4]
            message = frames[2].decode(errors="replace") if len(frames) > 2 else ""
            error_type = _error_type(frames)
            self._on_error(rec, code, message, error_type, now)

    def _late(self, job_id: int, kind: int, lease: int, now: float) -> None:
        """An answer from a delivery that is no longer current: recorded, never applied."""
        if kind == Kind.RUNNING:
            return
        rec = self._live.get(job_id) or self._recent.get(job_id)
        if rec is None:
            return
        rec.transitions.append((f"LATE_{Kind(kind).name}", now, f"lease {lease}"))
        self._touch(rec)

    def _on_error(self, rec: JobRecord, code: int, message: str, error_type: str, now: float) -> None:
        rec.error_code, rec.error, rec.error_type = code, message, error_type
        mem = self._mem[rec.id]
        if code == ErrorCode.CANCELLED:
            self._finish(rec, JobState.CANCELLED, now)
        elif code in _WAIT_CODES:
            # Nobody could take it (yet): try again without using an attempt, for a while.
            rec.attempts -= 1
            mem.waiting_since = mem.waiting_since or now
            mem.wait_rounds += 1
            if now - mem.waiting_since >= self.dispatch_window_s:
                self._finish(rec, JobState.FAILED, now)
            else:
                self._retry(rec, now, delay=min(1.0, 0.02 * 2 ** min(mem.wait_rounds, 6)))
        elif code == ErrorCode.AGENT_LOST:
            if rec.attempts < rec.max_attempts:
                self._retry(rec, now)
            else:
                self._finish(rec, JobState.LOST, now)
        elif code in _FINAL_CODES or error_type in rec.non_retryable or _short(error_type) in rec.non_retryable:
            self._finish(rec, JobState.FAILED, now)
        elif rec.attempts < rec.max_attempts:
            self._retry(rec, now)
        else:
            self._finish(rec, JobState.FAILED, now)

    def _retry(self, rec: JobRecord, now: float, delay: float | None = None) -> None:
        """PENDING again after ``delay`` (default: the job's backoff). A backoff retry chooses
        its agent anew (unless the route names one); a "no agent now" retry keeps it."""
        if delay is None:
            top = min(rec.retry_max, rec.retry_initial * 2 ** max(0, rec.attempts - 1))
            delay = random.uniform(top / 2, top) if top > 0 else 0.0
            if rec.route[:1] != _NAME_ROUTE:
                rec.agent = ""
        rec.run_at = now + delay
        mem = self._mem.get(rec.id)
        if mem is not None and not rec.agent:
            mem.held = False
        if mem is not None and mem.sent_to is not None:
            self._release(mem)
        self._transition(rec, JobState.PENDING, now, f"retry in {delay:.3f}s")
        self._touch(rec)
        self._schedule(rec, rec.run_at)

    def _timed_out(self, job_id: int, lease: int) -> None:
        rec = self._live.get(job_id)
        if rec is None or rec.lease != lease:
            return
        self._mem[job_id].timer = None
        self._cancel_delivery(rec)
        rec.error_code, rec.error = ErrorCode.TIMEOUT, f"job timed out after {rec.timeout} s"
        self._finish(rec, JobState.TIMED_OUT, time.time())

    def _cancel_delivery(self, rec: JobRecord) -> None:
        if rec.state in (JobState.DISPATCHED, JobState.RUNNING):
            # An empty route: the data plane finds the delivery by (JOBS_RID, corr = job id),
            # in flight or still queued.
            cancel = header(Kind.CANCEL, corr=rec.id, job=rec.id, aux=rec.lease)
            self._send([self._op["SIGNAL"], JOBS_RID, cancel, b""])

    def _finish(self, rec: JobRecord, state: JobState, now: float) -> None:
        job_id = rec.id
        mem = self._mem.pop(job_id, None) or _Live()
        if mem.parked is not None:
            self._unpark(job_id, mem)
        if mem.backlogged is not None:
            self._drop_backlogged(job_id, mem)
        if mem.sent_to is not None:
            self._release(mem)
        if mem.timer is not None:
            mem.timer.cancel()
        self._live.pop(job_id, None)
        self._delivered.pop(job_id, None)
        rec.lease_expires = 0.0
        rec.state = state
        rec.updated = now
        rec.transitions.append((_VALUE[state], now, rec.agent))
        self._recent[job_id] = rec
        if self._dirty:
            self._dirty.pop(job_id, None)
        # Whoever waits hears the outcome once it is in the log: what a client saw can be
        # fetched again by id, even after a crash.
        self.log.append(rec, lambda err: self._finished(rec, mem, err))
        if self._listening():
            self._publish("job_finished", {"id": job_id, "state": _VALUE[state], "agent": rec.agent})

    def _finished(self, rec: JobRecord, mem: _Live, err: BaseException | None) -> None:
        if self._recent.get(rec.id) is rec:
            del self._recent[rec.id]  # the store has it now
        key = rec.idempotency_key
        if key and self._by_key.get(key) == rec.id:
            # Live jobs only: the store's key index answers for it from now on (and forgets the
            # key with the job when retention compacts it, instead of pointing at nothing).
            del self._by_key[key]
        if err is not None:
            log.error("job %d finished as %s but could not be logged: %s", rec.id, rec.state.value, err)
        self._answer(rec, mem.waiters)
        for rid, corr, watcher in mem.watchers:
            watcher(rec, rid, corr)

    def _answer(self, rec: JobRecord, waiters: list[tuple[bytes, int]]) -> None:
        for rid, corr in waiters:
            if rec.state is _SUCCEEDED:
                hdr = _pack_header(b"OM", 1, _REPLY, rec.result_flags, 0, 0, 0, corr, rec.id, 0)
                self._to_peer(rid, [hdr, b"", rec.result or b""])
            else:
                code = rec.error_code or _STATE_CODES.get(rec.state, ErrorCode.HANDLER_ERROR)
                frames = error_message(code, corr, rec.error or rec.state.value, job=rec.id)
                if rec.error_type:
                    frames.append(msgpack.packb({"type": rec.error_type, "traceback": "", "agent": rec.agent}))
                self._to_peer(rid, frames)

    def _touch(self, rec: JobRecord) -> None:
        """A change that gates no answer (dispatched, running, a retry scheduled): written with
        the next flush of changed records, ``DIRTY_FLUSH_S`` at most later. A job that ends
        meanwhile is written once, with every transition in it."""
        self._dirty[rec.id] = rec
        if self._flusher is None:
            self._flusher = self._loop.call_later(DIRTY_FLUSH_S, self._flush_dirty)

    def flush_changes(self) -> None:
        """Queue every changed record now (before a query that reads the store)."""
        if self._flusher is not None:
            self._flusher.cancel()
        self._flush_dirty()

    def _flush_dirty(self) -> None:
        self._flusher = None
        if self._fast is not None:
            self._fast.flush_dirty()
        dirty, self._dirty = self._dirty, {}
        for rec in dirty.values():
            self.log.append(rec)

    @staticmethod
    def _transition(rec: JobRecord, state: JobState, now: float, note: str) -> None:
        rec.state = state
        rec.updated = now
        rec.transitions.append((_VALUE[state], now, note))

    # ------------------------------------------------------------- queries

    def get(self, job_id: int) -> JobRecord | None:
        """The freshest record: live, recently finished, or from the store."""
        rec = self._live.get(job_id)
        if rec is None and self._fast is not None:
            rec = self._fast.peek(job_id)
        return rec or self._recent.get(job_id) or self.store.get(job_id)

    def cancel(self, job_id: int) -> JobRecord | None:
        """Cancel a job durably; a running handler is cancelled too. Terminal jobs are left as they are."""
        self._take(job_id)
        rec = self._live.get(job_id)
        if rec is None:
            return self.get(job_id)
        self._cancel_delivery(rec)
        rec.error_code, rec.error = ErrorCode.CANCELLED, "cancelled by request"
        self._finish(rec, JobState.CANCELLED, time.time())
        return rec

    def wait(self, job_id: int, rid: bytes, corr: int, answer: Watcher) -> bool:
        """Call ``answer(record, rid, corr)`` when the job ends; False if it already has."""
        self._take(job_id)
        if job_id in self._live:
            self._mem[job_id].watchers.append((rid, corr, answer))
            return True
        return False

    def _take(self, job_id: int) -> None:
        """A live job on the fast path becomes JobManager's (a finishing one stays: it has ended)."""
        fast = self._fast
        if fast is not None and job_id in fast.jobs and fast.jobs[job_id].phase != FINISHING:
            fast.take(job_id)

    def forget_waiter(self, job_id: int, rid: bytes, corr: int) -> bool:
        """Drop a ``wait``; False if it was answered already."""
        mem = self._mem.get(job_id)
        if mem is None:
            return False
        for i, (r, c, _) in enumerate(mem.watchers):
            if r == rid and c == corr:
                del mem.watchers[i]
                return True
        return False

    # --------------------------------------------------------------- sweep

    def _sweep(self) -> None:
        """Every second: expired leases are redelivered; old terminal jobs are compacted."""
        now = time.time()
        try:
            # Only delivered jobs hold a lease: the sweep's cost follows the jobs in flight, not
            # every unfinished job (up to max_live_jobs may wait for an agent).
            if self._fast is not None:
                self._fast.expire(now)  # its expired ones join _delivered, handled below
            delivered = self._delivered
            for job_id in list(delivered):
                rec = self._live.get(job_id)
                if rec is None or rec.state not in (JobState.DISPATCHED, JobState.RUNNING):
                    del delivered[job_id]  # ended or back to PENDING since
                elif 0 < rec.lease_expires < now:
                    self._cancel_delivery(rec)
                    rec.error_code, rec.error = ErrorCode.AGENT_LOST, "lease expired"
                    if rec.attempts < rec.max_attempts:
                        self._retry(rec, now)
                    else:
                        self._finish(rec, JobState.LOST, now)
            self._compact(now)
        except Exception:
            log.exception("job sweep failed")
        finally:
            self._sweeper = self._loop.call_later(1.0, self._sweep)

    def _compact(self, now: float) -> None:
        if self.log.pending > 10_000:
            return  # the writer is behind; compaction can wait
        old = self.store.terminal_before(now - self.retention_age_s, 10_000)
        counts = self.store.counts()
        terminal = sum(n for state, n in counts.items() if state.terminal)
        excess = terminal - len(old) - self.retention_count
        if excess > 0:
            extra = self.store.terminal_before(now + 1.0, len(old) + min(excess, 10_000))
            old = list(dict.fromkeys(old + extra))
        if old:
            for job_id in old:
                self._recent.pop(job_id, None)
            self.log.delete(old)

    def stats(self) -> dict[str, int]:
        fast = self._fast
        return {
            "jobs_live": len(self._live) + (fast.live if fast is not None else 0),
            "jobs_fast_path": fast.taken if fast is not None else 0,
            "jobs_handed_over": fast.handed_over if fast is not None else 0,
            "jobs_waiting_for_agent": sum(map(len, self._awaiting.values())) + sum(map(len, self._parked_any.values())),
            "jobs_refused_full": self.refused_full,
            "jobs_backlogged": sum(map(len, self._backlog.values())),
            "jobs_recovered": self.recovered,
            "joblog_batches": self.log.batches,
            "joblog_records": self.log.records,
            "joblog_pending": self.log.pending,
            "joblog_refused": self.log.refused,  # records not written: the log is down
        }


_STATE_CODES = {
    JobState.CANCELLED: ErrorCode.CANCELLED,
    JobState.TIMED_OUT: ErrorCode.TIMEOUT,
    JobState.LOST: ErrorCode.AGENT_LOST,
}


def _error_type(frames: list[bytes]) -> str:
    if len(frames) > 3:
        try:
            details = msgpack.unpackb(frames[3], raw=False)
            if isinstance(details, dict):
                return str(details.get("type", ""))
        except Exception:
            return ""
    return ""


def _short(error_type: str) -> str:
    return error_type.rsplit(".", 1)[-1]


__all__ = ["JOBS_RID", "JobManager", "JobOptions"]
