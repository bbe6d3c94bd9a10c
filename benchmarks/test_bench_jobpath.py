"""The broker's per-job Python cost: ``JobManager`` over a real LMDB job log (its writer thread
included), driven through the whole path of a short job with no sockets: submit -> logged ->
ACCEPTED + dispatch -> the agent's REPLY -> logged -> the answer to the client.

What it prints (``-s``): CPU per job of the control plane (this thread) and of the whole process
(the writer thread too), in microseconds. This is the part of a durable job that no socket, no
agent and no client adds to; ``orbitmesh bench --workloads invoke,jobs`` measures the rest.
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path
from typing import Any

import pytest

from orbitmesh._core import dataplane
from orbitmesh._wire import HDR
from orbitmesh.jobs import JobManager
from orbitmesh.protocol import F_TRACKED, Kind, Route
from orbitmesh.storage import LmdbStore

pytestmark = pytest.mark.benchmark(group="jobpath")

JOBS = 2000
AGENT = "worker-1"
ROUTE = bytes((Route.NAME, 0)) + AGENT.encode()
PARAMS = b"\x91\x07"  # msgpack [7]


_REPLY = int(Kind.REPLY)


def _request(corr: int) -> tuple[tuple[Any, ...], list[bytes]]:
    hdr = HDR.pack(b"OM", 1, int(Kind.REQUEST), F_TRACKED | 0x100, 0, 0, 0, corr, 0, 0)
    return HDR.unpack(hdr), [hdr, ROUTE, b"square", PARAMS]


class _Path:
    """One JobManager, its store and loop; ``run(n)`` pushes ``n`` jobs through and returns
    (control-plane CPU s, process CPU s)."""

    def __init__(self, directory: Path, durability: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = LmdbStore(directory / "jobs", durability)
        self.store.open()
        self.answers: list[list[bytes]] = []
        self.replies: list[list[bytes]] = []
        self._inject = dataplane.OP["INJECT"]
        self.jobs = JobManager(
            self.store,
            self.loop,
            op=dataplane.OP,
            send=self._send,
            to_peer=self._to_peer,
            publish=lambda topic, data: None,
            choose=lambda route, command, free: AGENT,
            agent_session=lambda name: 7,
            listening=lambda: False,
            agent_capacity=lambda name: JOBS,  # room for a whole round: no backlog (as the bench's agent)
        )
        self.jobs.start()
        self._want = 0
        self._done: asyncio.Future[None] | None = None
        self.corr = 0

    def _send(self, frames: list[bytes]) -> None:
        """The data plane's end: the agent answers every dispatch at once; the answers of one
        loop turn come back together in the next (as the broker drains its socket)."""
        if frames[0] == self._inject:
            fields = HDR.unpack(frames[2])
            job, lease = fields[8], fields[5]
            reply = HDR.pack(b"OM", 1, _REPLY, F_TRACKED | 0x100, 0, lease, 0, job, job, 0)
            self.replies.append([reply, b"", b"\x31"])
            if len(self.replies) == 1:
                self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        replies, self.replies = self.replies, []
        for frames in replies:
            self.jobs.on_event(b"agent-1", frames)

    def _to_peer(self, rid: bytes, frames: list[bytes]) -> None:
        fields = HDR.unpack(frames[0])
        if fields[2] == Kind.REPLY:
            self.answers.append(frames)
            if len(self.answers) == self._want and self._done is not None:
                self._done.set_result(None)

    async def _drive(self, n: int) -> None:
        self._done = self.loop.create_future()
        self._want = n
        self.answers.clear()
        for _ in range(n):
            self.corr += 1
            fields, frames = _request(self.corr)
            self.jobs.submit(b"client-1", fields, frames)
        await asyncio.wait_for(self._done, 30)

    def run(self, n: int) -> tuple[float, float]:
        t0, p0 = time.thread_time(), time.process_time()
        self.loop.run_until_complete(self._drive(n))
        return time.thread_time() - t0, time.process_time() - p0

    def close(self) -> None:
        self.jobs.stop()
        self.jobs.close()
        self.loop.close()


@pytest.mark.parametrize("durability", ["sync", "none"])
def test_job_path(benchmark: Any, durability: str, tmp_path: Path) -> None:
    path = _Path(tmp_path, durability)
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, *thresholds[1:])  # as ``orbitmesh broker`` runs (runtime.tune_gc_for_server)
    try:
        path.run(200)  # warm: caches, the map, the writer
        cpu: list[tuple[float, float]] = []
        benchmark.pedantic(lambda: cpu.append(path.run(JOBS)), rounds=5, iterations=1)
        control, total = (min(c[i] for c in cpu) * 1e6 / JOBS for i in (0, 1))
        benchmark.extra_info.update(control_us_per_job=control, process_us_per_job=total)
        print(f"\njob path ({durability}): control plane {control:.1f} us/job, process {total:.1f} us/job")
        # Expect every job answered with its result, each under its own job id
        assert len(path.answers) == JOBS
        assert len({HDR.unpack(a[0])[8] for a in path.answers}) == JOBS
        assert all(a[2] == b"\x31" for a in path.answers)
    finally:
        gc.set_threshold(*thresholds)
        path.close()
