"""Crash tests with real processes and SIGKILL: a broker killed at random moments while
10,000 durable jobs are in flight, an agent killed mid-job, and a broker started on a
damaged or foreign data directory.

Every child process runs with ``subprocess_env()`` (the same orbitmesh as this test run), is
killed and reaped in ``finally``, and exits by itself after a bounded lifetime; every wait is
bounded. Helper processes: ``tests/crash_proc.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import lmdb
import pytest

import orbitmesh as om
from orbitmesh import ErrorCode, JobState
from orbitmesh.storage import JobRecord, LmdbStore, MemoryStore

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CRASH_PROC = Path(__file__).resolve().with_name("crash_proc.py")
HEARTBEAT, LIVENESS = 0.2, 4  # the brokers here declare a silent peer lost after 0.8 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """A child process whose stdout and stderr go to a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for_line(self, needle: str, timeout: float = 30.0) -> None:
        """Until ``needle`` is in the log; fails if the process exits or time runs out."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name}: exited with {self.proc.returncode} before {needle!r}:\n{self.tail()}")
            if loop.time() >= end:
                pytest.fail(f"{self.log.name}: no {needle!r} within {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.02)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def broker_argv(endpoint: str, store: str) -> list[str]:
    return [
        sys.executable, "-m", "orbitmesh", "broker", endpoint,
        "--store", store, "--durability", "sync",
        "--heartbeat", str(HEARTBEAT), "--liveness", str(LIVENESS),
    ]  # fmt: skip


def agent_argv(endpoint: str, name: str, effects: Path, capability: str, lifetime: float = 300.0) -> list[str]:
    return [
        sys.executable, str(CRASH_PROC), "agent", endpoint, name,
        "--effects", str(effects), "--capability", capability, "--lifetime", str(lifetime),
    ]  # fmt: skip


async def start_broker(endpoint: str, store: str, log: Path) -> Child:
    broker = Child(broker_argv(endpoint, store), log)
    await broker.wait_for_line(f"on {endpoint}")
    return broker


async def stop_all(client: om.MeshClient, children: list[Child]) -> None:
    """Close the client, SIGKILL and reap every child."""
    await client.close()
    for child in children:
        child.kill()
    await asyncio.sleep(0)


def consume(job: om.Job) -> None:
    """Results here are read with ``wait`` once everything is over; a job's own future may fail
    with NotConnectedError when the broker dies, and nobody reads that."""
    job._fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def effect_lines(path: Path) -> Counter[str]:
    return Counter(line for line in path.read_text().splitlines() if line)


async def settle_all(
    client: om.MeshClient, job_ids: list[int], timeout: float, concurrency: int = 128
) -> dict[int, om.JobInfo | None]:
    """Each job's final record (``wait``, asked again across reconnects), its current record once
    ``timeout`` has run out, or None if the broker has no such job."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    final: dict[int, om.JobInfo | None] = {}
    feed = iter(job_ids)

    async def one(job_id: int) -> None:
        while True:
            left = end - loop.time()
            try:
                if left <= 0:
                    final[job_id] = await client.get_job(job_id)
                else:
                    final[job_id] = await client.wait(job_id, timeout=min(10.0, left))
                return
            except (om.NotConnectedError, om.TimeoutError):
                await asyncio.sleep(0.05)
            except om.RoutingError as exc:
                if exc.code != ErrorCode.NO_SUCH_JOB:
                    raise
                final[job_id] = None
                return

    async def worker() -> None:
        for job_id in feed:
            await one(job_id)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return final


# ------------------------------------------------- 1. the broker SIGKILLed under load

N_JOBS = 10_000
WINDOW = 256  # execute() calls in flight at once
EXECUTE_TIMEOUT = 10.0
DEADLINE = 120.0  # the whole run, submission to the last terminal job


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("loop_kind", ["asyncio"])
@pytest.mark.parametrize("agents", [1, 2], ids=["one-agent", "two-agents"])
@pytest.mark.parametrize("seed", [7, 22, 33])  # 7: the second SIGKILL comes once all are accepted
def test_broker_sigkilled_with_durable_jobs_in_flight(arun, ctx, tmp_path, seed, agents):
    rng = random.Random(seed)
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    store = f"lmdb://{tmp_path / 'store'}"
    effects = tmp_path / "effects"
    effects.touch()
    # The plan: a SIGKILL after 1,000..8,000 accepted jobs, and once more later: after more
    # accepts, or once every job is accepted while the agents are still working through them.
    first = rng.randint(1000, 8000)
    second = rng.randint(first + 500, N_JOBS + 2000)
    plan = [first, second]
    down = [rng.uniform(0.0, 0.5) for _ in plan]  # how long the broker stays dead
    keys = [f"s{seed}-k{i:05d}-{rng.getrandbits(32):08x}" for i in range(N_JOBS)]
    target: Any = "fx-0" if agents == 1 else om.Select(capability="fx")

    ids_by_key: dict[str, set[int]] = defaultdict(set)
    retries: Counter[str] = Counter()
    kills: list[tuple[int, float]] = []
    stats: dict[str, float] = {}
    stored: list[om.JobInfo] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        children: list[Child] = []
        broker = await start_broker(endpoint, store, tmp_path / "broker-0.log")
        children.append(broker)
        client = om.MeshClient(endpoint, context=ctx, timeout=EXECUTE_TIMEOUT)
        try:
            agent_procs = [
                Child(agent_argv(endpoint, f"fx-{i}", effects, "fx"), tmp_path / f"agent-{i}.log")
                for i in range(agents)
            ]
            children += agent_procs
            for i, proc in enumerate(agent_procs):
                await proc.wait_for_line(f"ready fx-{i}")
            await client.connect()
            accepted = 0

            async def submit(key: str) -> None:
                nonlocal accepted
                # Given a job with a unique idempotency key, resubmitted (same key) until accepted
                while True:
                    assert loop.time() - t0 < DEADLINE, f"{key} not accepted within {DEADLINE} s"
                    try:
                        job = await client.execute(target, "effect", {"key": key}, idempotency_key=key, max_attempts=3)
                    except (om.NotConnectedError, om.TimeoutError) as exc:
                        retries[type(exc).__name__] += 1
                        await asyncio.sleep(0.05)
                        continue
                    consume(job)
                    ids_by_key[key].add(job.id)
                    accepted += 1
                    return

            feed = iter(keys)

            async def submitter() -> None:
                for key in feed:
                    await submit(key)

            async def killer() -> None:
                nonlocal broker
                for n, (at, gap) in enumerate(zip(plan, down, strict=True), 1):
                    # When the broker is SIGKILLed at a random moment ...
                    while accepted < min(at, N_JOBS):
                        await asyncio.sleep(0.001)
                    if at > N_JOBS:
                        await asyncio.sleep(rng.uniform(0.0, 0.3))  # while the agents work through the tail
                    else:
                        await asyncio.sleep(rng.uniform(0.0, 0.02))
                    broker.kill()
                    kills.append((accepted, round(loop.time() - t0, 2)))
                    await asyncio.sleep(gap)
                    # ... and restarted on the same store and port (the agents are left alone)
                    broker = await start_broker(endpoint, store, tmp_path / f"broker-{n}.log")
                    children.append(broker)

            kill_task = asyncio.ensure_future(killer())
            try:
                await asyncio.gather(*(submitter() for _ in range(WINDOW)))
                stats["submitted_s"] = loop.time() - t0
                await asyncio.wait_for(asyncio.shield(kill_task), max(1.0, DEADLINE - (loop.time() - t0)))
            finally:
                if not kill_task.done():
                    kill_task.cancel()
                    await asyncio.gather(kill_task, return_exceptions=True)
            kill_task.result()

            # Then every accepted job reaches a final state (bounded)
            job_ids = sorted({i for ids in ids_by_key.values() for i in ids})
            final = await settle_all(client, job_ids, DEADLINE - (loop.time() - t0))
            cursor = None
            while True:  # and the job log holds nothing else: no second job for a resubmitted key
                page = await client.list_jobs(limit=10_000, cursor=cursor)
                stored.extend(page)
                if len(page) < 10_000:
                    break
                cursor = page[-1].id
            stats["settled_s"] = loop.time() - t0
        finally:
            await stop_all(client, children)

        counts = effect_lines(effects)
        logs = "\n".join(f"--- {c.log.name}\n{c.tail(15)}" for c in children)
        report = (
            f"seed {seed}, {agents} agent(s): kills at (accepted, s) {kills}, retries {dict(retries)}, "
            f"submitted in {stats['submitted_s']:.1f} s ({N_JOBS / stats['submitted_s']:.0f} jobs/s), "
            f"all final at {stats['settled_s']:.1f} s ({N_JOBS / stats['settled_s']:.0f} jobs/s end to end)"
        )
        print(report)
        # Expect the plan to have run: two SIGKILLs, each followed by a restart
        assert len(kills) == 2, report
        # Expect every key accepted, and one key to be one job, however often it was resubmitted
        assert len(ids_by_key) == N_JOBS, report
        split = {k: sorted(v) for k, v in ids_by_key.items() if len(v) > 1}
        assert not split, f"an idempotency key gave more than one job: {list(split.items())[:5]}\n{report}"
        owners = Counter(i for ids in ids_by_key.values() for i in ids)
        shared = [i for i, n in owners.items() if n > 1]
        assert not shared, f"one job id accepted for several keys: {shared[:5]}\n{report}"
        extra = sorted({j.id for j in stored} - set(final))
        assert not extra, (
            f"jobs nobody was told ACCEPTED for: {[(j.id, j.idempotency_key) for j in stored if j.id in extra][:5]}"
        )
        # Expect every accepted job to exist and to have SUCCEEDED: none lost, none stuck
        missing = sorted(i for i, info in final.items() if info is None)
        assert not missing, f"{len(missing)} ACCEPTED jobs do not exist, e.g. {missing[:10]}\n{report}\n{logs}"
        infos = {i: info for i, info in final.items() if info is not None}
        bad = {i: info for i, info in infos.items() if info.state != JobState.SUCCEEDED}
        assert not bad, (
            f"{len(bad)} accepted jobs did not succeed, by state "
            f"{dict(Counter(info.state.value for info in bad.values()))}; first: "
            f"{[(i, info.state.value, info.idempotency_key, info.transitions) for i, info in list(bad.items())[:3]]}"
            f"\n{report}\n{logs}"
        )
        key_of = {next(iter(v)): k for k, v in ids_by_key.items()}
        assert all(infos[i].idempotency_key == key_of[i] for i in infos), report
        # Expect no effect applied twice, and every succeeded job's effect applied exactly once
        twice = {k: n for k, n in counts.items() if n > 1}
        assert not twice, (
            f"{len(twice)} idempotency keys applied more than once, e.g. "
            f"{[(k, n, ids_by_key[k]) for k, n in list(twice.items())[:5]]}; the first one's record: "
            f"{infos[next(iter(ids_by_key[next(iter(twice))]))].transitions}\n{report}"
        )
        never = [key_of[i] for i, info in infos.items() if info.state == JobState.SUCCEEDED and not counts[key_of[i]]]
        assert not never, f"{len(never)} SUCCEEDED jobs whose effect never ran, e.g. {never[:5]}\n{report}"
        assert set(counts) <= set(keys), f"effects for unknown keys: {sorted(set(counts) - set(keys))[:5]}"

    arun(main(), timeout=DEADLINE + 60)


FAST_JOBS = 3_000


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("loop_kind", ["asyncio"])
@pytest.mark.parametrize("seed", [5, 41])
def test_common_path_jobs_survive_a_broker_sigkill(arun, ctx, tmp_path, seed):
    """Jobs with no options take the broker's common-path table (jobfast): the same log, so the
    same recovery. Given 3,000 of them in flight to one agent, When the broker is SIGKILLed at a
    random moment and restarted, Expect every job told ACCEPTED to succeed, its effect applied
    exactly once (the agent dedups a redelivery by job id), and none run twice."""
    rng = random.Random(seed)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    store = f"lmdb://{tmp_path / 'store'}"
    effects = tmp_path / "effects"
    effects.touch()
    kill_at = rng.randint(500, FAST_JOBS - 500)
    key_of: dict[int, str] = {}  # accepted job id -> its effect key
    fast_before: list[int] = []

    async def main() -> None:
        children: list[Child] = [await start_broker(endpoint, store, tmp_path / "broker-0.log")]
        client = om.MeshClient(endpoint, context=ctx, timeout=EXECUTE_TIMEOUT)
        try:
            agent = Child(agent_argv(endpoint, "fx-0", effects, "fx"), tmp_path / "agent.log")
            children.append(agent)
            await agent.wait_for_line("ready fx-0")
            await client.connect()
            feed = iter(range(FAST_JOBS))

            async def submitter() -> None:
                for n in feed:
                    key = f"f{seed}-{n:05d}"
                    try:  # no options: the common path
                        job = await client.execute("fx-0", "effect", {"key": key})
                    except (om.NotConnectedError, om.TimeoutError):
                        continue  # never told ACCEPTED: may run or not, never twice (checked below)
                    consume(job)
                    key_of[job.id] = key
                    if len(key_of) == kill_at:
                        fast_before.append((await client.stats())["jobs_fast_path"])
                        children[0].kill()  # When the broker is SIGKILLed ...
                        await asyncio.sleep(rng.uniform(0.0, 0.3))
                        children.insert(0, await start_broker(endpoint, store, tmp_path / "broker-1.log"))

            await asyncio.wait_for(asyncio.gather(*(submitter() for _ in range(128))), DEADLINE)
            final = await settle_all(client, sorted(key_of), DEADLINE - 30)
        finally:
            await stop_all(client, children)
        counts = effect_lines(effects)
        # Expect the killed broker to have held the jobs on the common path
        assert fast_before and fast_before[0] > 0, fast_before
        # Expect every accepted job to have succeeded, its effect applied exactly once
        bad = {
            i: (info.state.value if info else None)
            for i, info in final.items()
            if info is None or info.state != JobState.SUCCEEDED
        }
        assert not bad, f"{len(bad)} accepted jobs did not succeed: {list(bad.items())[:5]}"
        assert all(counts[key_of[i]] == 1 for i in final), [
            (key_of[i], counts[key_of[i]]) for i in final if counts[key_of[i]] != 1
        ][:5]
        # Expect no effect twice, even for a submission the client was never told about
        assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
        assert len(key_of) > FAST_JOBS - 500, len(key_of)

    arun(main(), timeout=DEADLINE + 60)


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_jobs_running_when_the_broker_is_sigkilled_do_not_run_again_elsewhere(arun, ctx, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    store = f"lmdb://{tmp_path / 'store'}"
    effects = tmp_path / "effects"
    effects.touch()
    keys = [f"run-{i:02d}" for i in range(16)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        children: list[Child] = []
        broker = await start_broker(endpoint, store, tmp_path / "broker-0.log")
        children.append(broker)
        client = om.MeshClient(endpoint, context=ctx, timeout=10.0)
        try:
            # Given two agent processes with the same capability, and 16 durable jobs (unique
            # idempotency keys) running on both of them, each agent picked at random
            for name in ("fx-a", "fx-b"):
                children.append(
                    Child(agent_argv(endpoint, name, effects, "fx", lifetime=60.0), tmp_path / f"{name}.log")
                )
            for child, name in zip(children[1:], ("fx-a", "fx-b"), strict=True):
                await child.wait_for_line(f"ready {name}")
            await client.connect()
            jobs = []
            for key in keys:
                job = await client.execute(
                    om.Select(capability="fx", strategy="random"), "slow_effect", {"key": key, "seconds": 3.0},
                    idempotency_key=key, max_attempts=3,
                )  # fmt: skip
                consume(job)
                jobs.append(job)
            end = loop.time() + 5.0
            while True:
                infos = [await client.get_job(job.id) for job in jobs]
                if all(i.state == JobState.RUNNING for i in infos) and set(effect_lines(effects)) == set(keys):
                    break
                assert loop.time() < end, [(i.id, i.state.value) for i in infos]
                await asyncio.sleep(0.05)
            before = {i.idempotency_key: i.agent for i in infos}
            assert set(before.values()) == {"fx-a", "fx-b"}, before
            # When the broker is SIGKILLed mid-job and restarted on the same store and port
            broker.kill()
            broker = await start_broker(endpoint, store, tmp_path / "broker-1.log")
            children.append(broker)
            # Expect every job to succeed, each effect applied once: a redelivery is answered
            # by the agent that ran the job (it remembers it), never run again by the other
            final = await settle_all(client, [job.id for job in jobs], 20.0)
            assert all(i is not None and i.state == JobState.SUCCEEDED for i in final.values()), final
            after = {i.idempotency_key: i.agent for i in final.values() if i is not None}
            counts = effect_lines(effects)
            twice = {k: (before[k], after[k]) for k in keys if counts[k] != 1}
            assert not twice, (
                f"{len(twice)} of {len(keys)} jobs ran twice after the restart, (first agent, second agent): {twice}"
            )
        finally:
            await client.close()
            for child in children:
                child.kill()

    arun(main(), timeout=60)


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_accepted_resubmission_survives_a_sigkill(arun, ctx, tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    data = tmp_path / "store"

    async def main() -> None:
        children: list[Child] = []
        # Given a broker whose job log is slow to write one job (its writer is held in the store)
        held = Child(
            [sys.executable, str(CRASH_PROC), "broker", endpoint, "--store", str(data), "--hold-key", "held"],
            tmp_path / "held-broker.log",
        )
        children.append(held)
        await held.wait_for_line(f"ready {endpoint}")
        first = om.MeshClient(endpoint, context=ctx, timeout=10.0)
        second = om.MeshClient(endpoint, context=ctx, timeout=10.0)
        try:
            await first.connect()
            await second.connect()
            # And a job submitted with key "held": not yet written, so not yet ACCEPTED
            pending = asyncio.ensure_future(first.execute("nobody", "effect", {"key": "held"}, idempotency_key="held"))
            await asyncio.sleep(0.3)
            assert not pending.done()
            # When the same key is submitted again
            try:
                job = await second.execute("nobody", "effect", {"key": "held"}, idempotency_key="held", timeout=1.5)
            except om.TimeoutError:
                accepted = None  # right: nothing is ACCEPTED before it is written
            else:
                accepted = job.id
                consume(job)
            # And the broker is SIGKILLed, then restarted on the same store
            held.kill()
            assert isinstance((await asyncio.gather(pending, return_exceptions=True))[0], om.NotConnectedError)
            children.append(await start_broker(endpoint, f"lmdb://{data}", tmp_path / "broker.log"))
            # Expect a job the second submitter was told ACCEPTED to exist
            if accepted is not None:
                try:
                    info = await second.get_job(accepted)
                except om.RoutingError as exc:
                    pytest.fail(
                        f"job {accepted} was ACCEPTED (idempotency key 'held' submitted again while its first "
                        f"record was still being written) but is gone after a SIGKILL: {exc}"
                    )
                assert info.idempotency_key == "held"
        finally:
            await first.close()
            await second.close()
            for child in children:
                child.kill()

    arun(main(), timeout=60)


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_execute_timeout_does_not_drop_another_calls_acceptance(arun, ctx):
    """Not a crash: the client half of resubmitting after a timeout, as the submitters above do."""

    class GatedStore(MemoryStore):
        gate = threading.Event()

        def write(self, records, delete=()):  # type: ignore[no-untyped-def]
            if any(r.idempotency_key == "slow" for r in records):
                self.gate.wait(10.0)
            super().write(records, delete)

    async def main() -> None:
        store = GatedStore("sync")
        broker = om.Broker("tcp://127.0.0.1:0", context=ctx, store=store)
        await broker.start()
        client = om.MeshClient(broker.endpoints[0], context=ctx, timeout=10.0)
        try:
            await client.connect()
            # Given a job whose record is slow to write, submitted with a short timeout
            slow = asyncio.ensure_future(client.execute("nobody", "x", idempotency_key="slow", timeout=0.5))
            await asyncio.sleep(0.1)
            # And a second job from the same client, with a long timeout
            other = asyncio.ensure_future(client.execute("nobody", "x", idempotency_key="other", timeout=5.0))
            # When the first times out and then the writes go through
            with pytest.raises(om.TimeoutError):
                await slow
            store.gate.set()
            # Expect the second call to get its ACCEPTED (its job is recorded)
            done = await asyncio.gather(other, return_exceptions=True)
            rows = await client.list_jobs()
            assert sorted(r.idempotency_key for r in rows) == ["other", "slow"]
            assert isinstance(done[0], om.Job), (
                f"execute() of a recorded job failed with {done[0]!r}: the timed-out call dropped its pending entry"
            )
            consume(done[0])
        finally:
            store.gate.set()
            await client.close()
            await broker.stop()

    arun(main())


# ----------------------------------------------------- 2. an agent SIGKILLed mid-job


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_sigkilled_agent_mid_job_is_redelivered_to_the_other(arun, ctx, core_impl, tmp_path):
    effects = tmp_path / "effects"
    effects.touch()
    sleep_s = 2.0

    async def main() -> None:
        broker = om.Broker(
            "tcp://127.0.0.1:0", core=core_impl, context=ctx, heartbeat_interval=HEARTBEAT, liveness=LIVENESS
        )
        await broker.start()
        endpoint = broker.endpoints[0]
        client = om.MeshClient(endpoint, context=ctx, timeout=10.0)
        agents: dict[str, Child] = {}
        loop = asyncio.get_running_loop()
        try:
            # Given two agent processes with the same capability
            for name in ("w-a", "w-b"):
                agents[name] = Child(
                    agent_argv(endpoint, name, effects, "work", lifetime=60.0), tmp_path / f"{name}.log"
                )
            for name, proc in agents.items():
                await proc.wait_for_line(f"ready {name}")
            await client.connect()
            # And a job (two attempts) whose handler sleeps, running on one of them
            job = await client.execute(
                om.Select(capability="work"), "sleep", {"seconds": sleep_s}, max_attempts=2, timeout=5.0
            )
            consume(job)
            end = loop.time() + 5.0
            while True:
                info = await client.get_job(job.id)
                if info.state == JobState.RUNNING and f"sleep {info.agent}" in effects.read_text():
                    break
                assert loop.time() < end, f"job never started: {info}"
                await asyncio.sleep(0.02)
            first = info.agent
            other = next(name for name in agents if name != first)
            # When that agent's process is SIGKILLed mid-job
            agents[first].kill()
            killed_at = loop.time()
            # Expect the job redelivered to the other agent within the liveness window, the
            # first attempt's retry backoff (retry_initial 0.5 s) and a margin
            window = HEARTBEAT * LIVENESS + 0.5 + 1.0
            while True:
                info = await client.get_job(job.id)
                if info.agent == other and info.state in (JobState.DISPATCHED, JobState.RUNNING, JobState.SUCCEEDED):
                    break
                assert info.state in (JobState.RUNNING, JobState.DISPATCHED, JobState.PENDING), info
                assert loop.time() - killed_at < window, f"not redelivered within {window} s: {info.transitions}"
                await asyncio.sleep(0.02)
            redelivered = loop.time() - killed_at
            # And SUCCEEDED there, after one more run of the handler
            info = await client.wait(job.id, timeout=sleep_s + 3.0)
            assert info.state == JobState.SUCCEEDED, info
            assert client.job_result(info) == other and info.agent == other
            assert info.attempts == 2
            assert loop.time() - killed_at < window + sleep_s + 1.0
            assert effect_lines(effects) == Counter({f"sleep {first}": 1, f"sleep {other}": 1})
            assert redelivered < window
        finally:
            for proc in agents.values():
                proc.kill()
            await client.close()
            await broker.stop()

    arun(main())


# ---------------------------------------- 3. a damaged or foreign data directory


def _job_log(path: Path) -> None:
    """A real job log with some jobs in it."""
    store = LmdbStore(path, "sync")
    store.open()
    try:
        store.write(
            [JobRecord(id=i, command="effect", params=b"x" * 2000, idempotency_key=f"k{i}") for i in range(1, 200)]
        )
    finally:
        store.close()


def _truncated_few_bytes(d: Path) -> None:
    _job_log(d)
    with open(d / "data.mdb", "r+b") as f:
        f.truncate(16)


def _truncated_pages(d: Path) -> None:
    _job_log(d)
    size = (d / "data.mdb").stat().st_size
    with open(d / "data.mdb", "r+b") as f:
        f.truncate(min(3 * 4096, size // 2))  # the meta pages survive, the data pages do not


def _garbage(d: Path) -> None:
    d.mkdir()
    (d / "data.mdb").write_bytes(random.Random(7).randbytes(64 * 1024))


def _foreign_lmdb(d: Path) -> None:
    env = lmdb.open(str(d), max_dbs=4, map_size=1 << 20)
    try:
        other = env.open_db(b"inventory")
        with env.begin(write=True) as txn:
            txn.put(b"widget", b"42", db=other)
    finally:
        env.close()


def _sqlite_garbage(f: Path) -> None:
    f.write_bytes(random.Random(8).randbytes(16 * 1024))


def _snapshot(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize(
    "scheme, make",
    [
        ("lmdb", _truncated_few_bytes),
        ("lmdb", _truncated_pages),
        ("lmdb", _garbage),
        ("lmdb", _foreign_lmdb),
        ("sqlite", _sqlite_garbage),
    ],
    ids=["lmdb-truncated-16-bytes", "lmdb-truncated-pages", "lmdb-garbage", "lmdb-foreign-env", "sqlite-garbage"],
)
def test_broker_refuses_a_damaged_data_directory(tmp_path, scheme, make):
    # Given a data directory (file, for SQLite) that is damaged or not a job log
    path = tmp_path / ("data" if scheme == "lmdb" else "jobs.db")
    make(path)
    before = _snapshot(path)
    # When a broker is started on it
    started = time.monotonic()
    proc = subprocess.Popen(
        broker_argv(f"tcp://127.0.0.1:{free_port()}", f"{scheme}://{path}"),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    took = time.monotonic() - started
    # Expect it to exit non-zero, promptly, with one line naming the problem and the path
    assert proc.returncode not in (0, None), (proc.returncode, out, err)
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}: {err}"
    assert took < 10.0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"orbitmesh: error: [{ErrorCode.STORAGE_CORRUPT.name}] "), err
    assert str(path) in lines[0]
    assert "Traceback" not in out + err and "orbitmesh broker" not in out
    # And the directory byte-identical: no file changed, none added (not even lock.mdb)
    assert _snapshot(path) == before
