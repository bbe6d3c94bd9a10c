"""The common-path job table (``_core.jobfast.FastJobs``, both twins) against ``JobManager``'s
general path: the same scenario through two job managers over real LMDB logs, one with the fast
path and one without, must write the same records and send the same messages, step by step --
the happy path, and every hand-over (an agent's error, cancel, wait, a lease that expires, a late
answer, an agent that is full or gone when the job is to be sent). And the hand-overs under load,
over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from orbitmesh import jobs as jobs_module
from orbitmesh._core import dataplane, load
from orbitmesh._wire import HDR
from orbitmesh.errors import ErrorCode, OrbitMeshError
from orbitmesh.jobs import JobManager
from orbitmesh.protocol import F_TRACKED, Kind, Route
from orbitmesh.storage import LmdbStore
from orbitmesh.storage.base import JobRecord

CLIENT = b"client-1"


def _route(name: str) -> bytes:
    return bytes((Route.NAME, 0)) + name.encode()


def _norm(value: Any, steps: dict[float, str]) -> Any:
    """Times (unix seconds) as the transition they are the time of ("T0" for the first), else
    "T": two runs compare, and a record's ``created`` / ``updated`` still say which step they are."""
    if isinstance(value, float) and value > 1e9:
        return steps.get(value, "T")
    if isinstance(value, (list, tuple)):
        return type(value)(_norm(v, steps) for v in value)
    return value


def _record(rec: JobRecord | None) -> Any:
    if rec is None:
        return None
    steps: dict[float, str] = {}
    for i, (_, at, _) in enumerate(rec.transitions):
        steps.setdefault(at, f"T{i}")
    return {k: _norm(v, steps) for k, v in rec.__dict__.items()}


def _message(frames: list[bytes]) -> list[Any]:
    """A message with its header decoded (a data-plane op: [op, rid, hdr, ...])."""
    i = 0 if len(frames[0]) == HDR.size else 2
    return [*frames[:i], HDR.unpack(frames[i]), *frames[i + 1 :]]


class _Harness:
    """One JobManager over its own LMDB log, driven by hand: what it sends is recorded."""

    def __init__(self, directory: Path, fast: bool, capacity: int = 64) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = LmdbStore(directory / ("fast" if fast else "general"), "sync")
        self.store.open()
        self.sessions = {"w1": 7}
        self.capacity = capacity
        self.ops: list[list[Any]] = []
        self.answers: list[tuple[bytes, list[Any]]] = []
        self.other: list[list[bytes]] = []  # events the table's dispatch left to the broker
        self.jobs = JobManager(
            self.store,
            self.loop,
            op=dataplane.OP,
            send=lambda frames: self.ops.append(_message(frames)),
            to_peer=lambda rid, frames: self.answers.append((rid, _message(frames))),
            publish=lambda topic, data: None,
            choose=self._choose,
            agent_session=self.sessions.get,
            listening=lambda: False,
            agent_capacity=lambda name: self.capacity,
            lease_s=0.2,
            fast_path=fast,
        )
        self.jobs.start()
        assert self.jobs._sweeper is not None
        self.jobs._sweeper.cancel()  # swept by hand, at the same step in both runs

    def _choose(self, route: bytes, command: str, free: Any) -> str | OrbitMeshError:
        name = route[2:].decode()
        if name in self.sessions:
            return name
        return OrbitMeshError(f"no agent named '{name}'", code=ErrorCode.NO_SUCH_AGENT)

    def settle(self) -> None:
        """Until everything queued for the log is written and its callbacks have run."""
        done = self.loop.create_future()
        self.jobs.log.barrier(lambda err: done.set_result(err))
        self.loop.run_until_complete(asyncio.wait_for(done, 10))
        self.loop.run_until_complete(asyncio.sleep(0.001))  # what those callbacks scheduled

    def _up(self, event: list[bytes]) -> None:
        """An event from the data plane, as the broker hands it on: to the table's dispatch when
        there is one (the fast path), else to JobManager as the broker's own dispatch would."""
        dispatch = self.jobs.dispatch_events
        if dispatch is not None:
            dispatch([event], {}, self.other.append)
        elif event[0] == b"\x01":
            self.jobs.submit(event[1], HDR.unpack(event[2]), event[2:])
        else:
            self.jobs.on_event(event[1], event[2:])

    def submit(self, corr: int, agent: str = "w1") -> None:
        hdr = HDR.pack(b"OM", 1, int(Kind.REQUEST), F_TRACKED | 0x100, 0, 0, 0, corr, 0, 0)
        self._up([b"\x01", CLIENT, hdr, _route(agent), b"square", b"\x91\x07"])

    def answer(self, job: int, kind: Kind, lease: int = 1, code: int = 0, frames: tuple[bytes, ...] = ()) -> None:
        hdr = HDR.pack(b"OM", 1, int(kind), F_TRACKED | 0x100, code, lease, 0, job, job, 0)
        self._up([b"\x03", b"agent-rid", hdr, b"", *frames])

    def close(self) -> None:
        self.jobs.stop()
        self.jobs.close()
        self.loop.close()


def _scenario(h: _Harness) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def look(step: str, *jobs: int) -> None:
        seen.append((step, [_record(h.jobs.get(j)) for j in jobs], h.jobs.stats()["jobs_live"]))

    for corr in (11, 12, 13):
        h.submit(corr)
    look("submitted: new records not yet written", 1, 2, 3)
    h.settle()
    look("accepted and dispatched", 1, 2, 3)
    h.answer(1, Kind.RUNNING)
    h.answer(1, Kind.RUNNING)  # a progress heartbeat: the lease only
    look("job 1 running", 1)
    h.answer(1, Kind.REPLY, frames=(b"\x31",))
    look("job 1 answered, its record being written", 1)
    h.settle()
    look("job 1 done", 1)
    details = msgpack.packb({"type": "ValueError", "traceback": "", "agent": "w1"})
    h.answer(2, Kind.ERROR, code=int(ErrorCode.HANDLER_ERROR), frames=(b"boom", details))
    h.settle()
    look("job 2 failed by its handler", 2)
    h.jobs.cancel(3)
    h.settle()
    look("job 3 cancelled while dispatched", 3)
    h.submit(14)  # job 4: a wait while it runs
    h.settle()
    watched: list[Any] = []
    assert h.jobs.wait(4, b"client-2", 99, lambda rec, rid, corr: watched.append((rec.state, rid, corr)))
    h.answer(4, Kind.REPLY, frames=(b"\x34",))
    h.settle()
    seen.append(("job 4 watched", watched))
    h.submit(15)  # job 5: a late answer after it finished
    h.settle()
    h.answer(5, Kind.REPLY, frames=(b"\x35",))
    h.answer(5, Kind.REPLY, frames=(b"\x35",))
    h.answer(5, Kind.RUNNING)
    h.settle()
    h.jobs.flush_changes()
    h.settle()
    look("job 5 with its late answer recorded", 5)
    h.submit(16)  # job 6: its lease expires (one attempt: LOST)
    h.settle()
    time.sleep(0.3)
    h.jobs._sweep()
    h.settle()
    look("job 6 lost", 6)
    h.submit(17)  # job 7: a stale answer from an older lease while it runs
    h.settle()
    h.answer(7, Kind.REPLY, lease=9, frames=(b"\x37",))
    h.answer(7, Kind.REPLY, frames=(b"\x37",))
    h.settle()
    look("job 7 answered after a stale answer", 7)
    h.capacity = 0  # a window of 64 when the capacity is unknown: fill it
    for corr in range(100, 166):
        h.submit(corr)
    h.settle()
    look("jobs 8-73: the agent's window full, the rest backlogged", 8, 72, 73)
    for job in range(8, 74):
        h.answer(job, Kind.REPLY, lease=1, frames=(b"\x38",))
    h.settle()
    h.loop.run_until_complete(asyncio.sleep(0.01))
    h.settle()
    look("jobs 8-73 done, the backlog fed", 8, 72, 73)
    del h.sessions["w1"]
    h.submit(200)  # job 74: its agent gone before it is sent
    h.settle()
    look("job 74 waiting for its agent", 74)
    h.jobs.flush_changes()
    h.settle()
    seen.append(("ops to the data plane", h.ops))
    seen.append(("answers to clients", h.answers))
    seen.append(("the log", [_record(r) for r in h.store.query(limit=1000)[0]]))
    seen.append(("events left to the broker", h.other))
    return seen


@pytest.mark.parametrize("impl", ["c", "py"])
def test_fast_path_writes_and_sends_what_the_general_path_does(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_module, "FastJobs", load("_jobfast", impl).FastJobs)
    runs = []
    for fast in (False, True):
        h = _Harness(tmp_path, fast)
        try:
            runs.append(_scenario(h))
            stats = h.jobs.stats()
        finally:
            h.close()
        # Expect the fast path to have taken the option-less jobs, and handed some over
        if fast:
            assert stats["jobs_fast_path"] >= 70 and stats["jobs_handed_over"] >= 4, stats
        else:
            assert stats["jobs_fast_path"] == 0
    general, fast_run = runs
    assert fast_run[-1] == ("events left to the broker", [])
    assert [step for step, *_ in general] == [step for step, *_ in fast_run]
    for a, b in zip(general, fast_run, strict=True):
        assert a == b, a[0]
    # The scenario meant what it says: every ending, and the late answer, are in the log
    final = {r["id"]: r for r in general[-2][1]}
    assert final[1]["state"].value == "SUCCEEDED" and final[1]["result"] == b"\x31"
    assert final[2]["state"].value == "FAILED" and final[3]["state"].value == "CANCELLED"
    assert final[6]["state"].value == "LOST" and final[7]["state"].value == "SUCCEEDED"
    assert any(t[0] == "LATE_REPLY" for t in final[5]["transitions"])
    assert any(t[0] == "LATE_REPLY" for t in final[7]["transitions"])
    assert final[74]["state"].value == "PENDING"


@pytest.mark.parametrize("impl", ["c", "py"])
def test_dispatch_takes_a_jobs_messages_and_leaves_the_rest_to_the_broker(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``FastJobs.dispatch``: a tracked REQUEST from an unsecured client and a job's answer go to
    JobManager (the table first, then its general path); everything else, in order, to the
    broker's own dispatch; an event that raises there is logged and the others go on."""
    monkeypatch.setattr(jobs_module, "FastJobs", load("_jobfast", impl).FastJobs)
    h = _Harness(tmp_path, fast=True)
    try:
        tracked = HDR.pack(b"OM", 1, int(Kind.REQUEST), F_TRACKED, 0, 0, 0, 21, 0, 0)
        plain = HDR.pack(b"OM", 1, int(Kind.REQUEST), 0, 0, 0, 0, 22, 0, 0)
        options = msgpack.packb({"max_attempts": 2})
        left = [
            [b"\x01", CLIENT, plain, _route("w1"), b"square", b""],  # not a job: an invoke
            [b"\x01", b"secured", tracked, _route("w1"), b"square", b""],  # a secured session's
            [b"\x01", CLIENT, tracked[:-1], _route("w1"), b"square", b""],  # a short header
            [b"\x02", b"agent-rid"],  # an agent lost
            [],  # nothing the data plane sends: the broker's own dispatch says what is wrong
            [b"", CLIENT, tracked],
            (b"\x01", CLIENT, tracked, _route("w1"), b"square", b""),
        ]
        taken = [
            [b"\x01", CLIENT, tracked, _route("w1"), b"square", b"\x91\x07"],  # job 1: the table's
            [b"\x01", CLIENT, tracked, _route("w1"), b"square", b"", options],  # job 2: options
        ]
        unknown = HDR.pack(b"OM", 1, int(Kind.REPLY), F_TRACKED, 0, 1, 0, 99, 99, 0)
        late = [b"\x03", b"agent-rid", unknown, b""]
        events = [left[0], taken[0], left[1], left[2], taken[1], left[3], *left[4:], late]
        other: list[Any] = []
        h.jobs.dispatch_events(events, {b"secured": object()}, other.append)
        assert other == left
        assert 1 in h.jobs._fast.jobs and 2 in h.jobs._live and 2 not in h.jobs._fast.jobs
        assert 99 not in h.jobs._live and h.answers == []  # the unknown job's answer: dropped as late
        h.settle()
        assert [a[1][0][2] for a in h.answers] == [Kind.ACCEPTED, Kind.ACCEPTED]

        def broken(event: list[bytes]) -> None:
            raise RuntimeError("a bug in the broker")

        answer = HDR.pack(b"OM", 1, int(Kind.REPLY), F_TRACKED, 0, 1, 0, 1, 1, 0)
        with caplog.at_level("ERROR", logger="orbitmesh.jobs"):
            h.jobs.dispatch_events([left[3], [b"\x03", b"agent-rid", answer, b"", b"\x31"]], {}, broken)
        assert "control plane failed on event 2" in caplog.text
        assert h.jobs._fast.jobs[1].phase == load("_jobfast", impl).FINISHING  # the answer went on
    finally:
        h.close()


def _on_both_paths(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch, run: Callable[[_Harness], Any]
) -> tuple[Any, Any]:
    """What ``run(harness)`` returns on the general path and on the common path (twin ``impl``),
    each with a job log that ``run`` may take down (as a failed batch-mode flush does)."""
    monkeypatch.setattr(jobs_module, "FastJobs", load("_jobfast", impl).FastJobs)
    seen = []
    for fast in (False, True):
        h = _Harness(tmp_path / impl, fast)
        try:
            seen.append(run(h))
        finally:
            h.jobs.log._failed = None
            h.close()
    return seen[0], seen[1]


@pytest.mark.parametrize("impl", ["c", "py"])
def test_a_job_submitted_while_the_log_is_down_is_refused_at_once(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(h: _Harness) -> Any:
        # Given a job log that is down (every append is refused)
        h.jobs.log._failed = OSError("disk gone")
        # When a job is submitted, Expect STORAGE_ERROR to its caller now, and nothing kept
        h.submit(21)
        h.loop.run_until_complete(asyncio.sleep(0.001))
        assert h.jobs.stats()["jobs_live"] == 0 and h.jobs.get(1) is None
        return h.answers

    general, fast_path = _on_both_paths(tmp_path, impl, monkeypatch, run)
    assert general == fast_path
    [(rid, (hdr, _, message))] = general
    assert rid == CLIENT and hdr[2] == Kind.ERROR and hdr[4] == ErrorCode.STORAGE_ERROR and hdr[7] == 21
    assert message == b"job not recorded: [STORAGE_ERROR] job log is down: disk gone"


@pytest.mark.parametrize("impl", ["c", "py"])
def test_jobs_that_end_while_the_log_is_down_are_answered(
    tmp_path: Path, impl: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def run(h: _Harness) -> Any:
        # Given accepted, dispatched jobs (one running), then a job log that goes down
        for corr in (31, 32, 33):
            h.submit(corr)
        h.settle()
        h.answer(2, Kind.RUNNING)
        h.answers.clear()
        h.jobs.log._failed = OSError("disk gone")
        # When one succeeds, one fails in its handler and one is cancelled
        h.answer(1, Kind.REPLY, frames=(b"\x31",))
        details = msgpack.packb({"type": "ValueError", "traceback": "", "agent": "w1"})
        h.answer(2, Kind.ERROR, code=int(ErrorCode.HANDLER_ERROR), frames=(b"boom", details))
        h.jobs.cancel(3)
        h.jobs.flush_changes()  # records without a callback: dropped while the log is down
        h.loop.run_until_complete(asyncio.sleep(0.01))
        # Expect each caller answered as after a failed write (its outcome; the failure
        # logged), nothing left live, and the refused records counted
        assert h.jobs.stats()["jobs_live"] == 0
        assert h.jobs.stats()["joblog_refused"] >= 3
        return sorted(answer for _, answer in _answers(h))

    general, fast_path = _on_both_paths(tmp_path, impl, monkeypatch, run)
    assert general == fast_path
    assert [(corr, kind) for corr, kind, _, _ in general] == [(31, Kind.REPLY), (32, Kind.ERROR), (33, Kind.ERROR)]
    assert general[0][3] == b"\x31" and general[1][2] == ErrorCode.HANDLER_ERROR
    assert general[2][2] == ErrorCode.CANCELLED
    assert caplog.text.count("could not be logged") == 6  # 3 jobs, on each path


def _answers(h: _Harness) -> list[tuple[bytes, tuple[int, int, int, bytes]]]:
    """(rid, (corr, kind, error code, last frame)) of each answer sent to a client."""
    return [(rid, (hdr[7], hdr[2], hdr[4], frames[-1])) for rid, (hdr, *frames) in h.answers]


def test_hand_overs_under_load_end_every_job_once(arun, ctx, core_impl, tmp_path: Path) -> None:
    """Concurrency, over real sockets: 600 jobs on the common path while some fail in their
    handler, some are cancelled, waited on or looked up while they run. Expect every job to end
    once, in the state its handler or the cancel gave it, and the table to be empty after."""
    import orbitmesh as om
    from orbitmesh import JobState

    from .conftest import endpoint_for
    from .mesh import mesh

    def setup(agent: om.Agent) -> None:
        @agent.handler
        async def work(n: int) -> int:
            await asyncio.sleep(0.002 * (n % 7))
            if n % 5 == 0:
                raise ValueError(f"job {n} refuses")
            return n * n

    async def main() -> None:
        store = f"lmdb://{tmp_path / 'jobs'}"
        async with mesh(ctx, core_impl, endpoint_for("inproc"), setup=setup, broker_kw={"store": store}) as (
            broker,
            _,
            client,
        ):
            jobs = [await client.execute("agent-0", "work", [n]) for n in range(600)]
            cancelled = {j.id for j in jobs[3::11]}
            waits = [client.wait(j.id, timeout=20) for j in jobs[1::13]]
            for job_id in cancelled:
                await client.cancel(job_id)
            for j in jobs[2::17]:
                assert (await client.get_job(j.id)).id == j.id
            infos = await asyncio.gather(*(client.wait(j.id, timeout=20) for j in jobs))
            waited = await asyncio.gather(*waits)
            assert broker.jobs is not None
            stats = broker.jobs.stats()
            # Expect every job ended once, as its handler or the cancel decided
            for n, info in enumerate(infos):
                if info.id in cancelled and info.state == JobState.CANCELLED:
                    continue  # cancelled before it finished (else it finished first: below)
                want = JobState.FAILED if n % 5 == 0 else JobState.SUCCEEDED
                assert info.state == want, (n, info.state, info.transitions)
                assert [t[0] for t in info.transitions].count(want.value) == 1
            assert {w.id: w.state for w in waited} == {i.id: i.state for i in infos if i.id in {w.id for w in waited}}
            # ... on the common path, the rest handed over, and nothing left in the table
            assert stats["jobs_fast_path"] == 600 and stats["jobs_handed_over"] >= 120, stats
            assert stats["jobs_live"] == 0 and not broker.jobs._fast.jobs

    arun(main(), timeout=60)
