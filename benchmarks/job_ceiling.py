"""What bounds durable jobs/s: the ``jobs`` workload with the broker's job path cut down in
steps, next to invoke, measured in one run. An experiment, run by hand (pytest does not
collect it)::

    python benchmarks/job_ceiling.py [--duration 6] [--durability sync] [--rounds 2]

Each variant is the same 1 client / 1 agent pipeline (window 1000, 64-byte payloads) as
``orbitmesh bench``'s ``jobs`` workload, against a fresh broker child:

* ``invoke``   -- untracked round trips: the baseline of the ratio;
* ``full``     -- durable jobs as shipped (``JobManager`` over the LMDB job log);
* ``lean+log`` -- the broker's job bookkeeping cut to a dict of waiters, each job's record still
  built, encoded and written (new, then finished) through the real ``JobLog`` and LMDB store, in
  the chosen durability: what the job path would cost with its bookkeeping near zero;
* ``lean``     -- the same with no job log: ACCEPTED at once, the protocol's messages only.

The lean variants are patched into the broker child by a generated ``sitecustomize`` (only
there: the agent and this client run as shipped). They answer only this workload's jobs, with
none of a job's guarantees, and exist to measure, never to serve. Findings are in
``docs/performance.md`` ("What bounds durable jobs").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("invoke", "full", "lean+log", "lean")
_SITE = """\
import os, sys
if os.environ.get("ORBITMESH_CEILING") and "broker" in sys.argv:
    sys.path.insert(0, {here!r})
    import job_ceiling
    job_ceiling.patch_broker(os.environ["ORBITMESH_CEILING"])
"""


def patch_broker(variant: str) -> None:
    """In the broker child: replace ``JobManager.submit`` / ``on_event`` with the lean path."""
    from orbitmesh import jobs
    from orbitmesh._wire import HDR
    from orbitmesh.bench import AGENT_NAME
    from orbitmesh.protocol import F_TRACKED
    from orbitmesh.storage.base import JobRecord

    pack, unpack = HDR.pack, HDR.unpack
    waiting: dict[int, tuple[bytes, int]] = {}
    log_it = variant == "lean+log"
    new_record = object.__new__

    def record(job_id: int, now: float, **fields: Any) -> JobRecord:
        rec = new_record(JobRecord)
        rec.__dict__ = values = jobs._RECORD_DEFAULTS.copy()
        values.update(id=job_id, command="noop", agent=AGENT_NAME, created=now, updated=now, **fields)
        return rec

    def accepted(self: Any, rid: bytes, corr: int, job_id: int, frames: list[bytes], flags: int, err: Any) -> None:
        self._to_peer(rid, [pack(b"OM", 1, jobs._ACCEPTED, 0, 0, 0, 0, corr, job_id, 0), b""])
        hdr = pack(b"OM", 1, jobs._REQUEST, (flags & 0x0F00) | F_TRACKED, 0, 1, 0, job_id, job_id, 0)
        self._send([self._op_inject, jobs.JOBS_RID, hdr, frames[1], frames[2], frames[3]])

    def answered(self: Any, rid: bytes, corr: int, job_id: int, flags: int, result: bytes, err: Any) -> None:
        self._to_peer(rid, [pack(b"OM", 1, jobs._REPLY, flags & 0x0F00, 0, 0, 0, corr, job_id, 0), b"", result])

    def submit(self: Any, rid: bytes, fields: tuple[Any, ...], frames: list[bytes]) -> None:
        corr, job_id = fields[7], self._next_id
        self._next_id = job_id + 1
        waiting[job_id] = (rid, corr)
        done = functools.partial(accepted, self, rid, corr, job_id, frames, fields[3])
        if log_it:
            now = time.time()
            rec = record(job_id, now, params=frames[3], transitions=[("PENDING", now, "")])
            self.log.append(rec, done)
        else:
            done(None)

    def on_event(self: Any, agent_rid: bytes, frames: list[bytes]) -> None:
        fields = unpack(frames[0])
        job_id = fields[8]
        rid, corr = waiting.pop(job_id)
        done = functools.partial(answered, self, rid, corr, job_id, fields[3], frames[2])
        if log_it:
            now = time.time()
            steps = [("PENDING", now, ""), ("DISPATCHED", now, AGENT_NAME), ("SUCCEEDED", now, AGENT_NAME)]
            rec = record(job_id, now, state=jobs._SUCCEEDED, result=frames[2], transitions=steps)
            self.log.append(rec, done)
        else:
            done(None)

    init = jobs.JobManager.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.dispatch_events = None  # the broker's events to submit / on_event below, not the table

    jobs.JobManager.__init__ = __init__  # type: ignore[method-assign]
    jobs.JobManager.submit = submit  # type: ignore[method-assign]
    jobs.JobManager.on_event = on_event  # type: ignore[method-assign]


async def _drive(variant: str, endpoint: str, broker: Any, agent: Any, duration: float) -> dict[str, float]:
    from orbitmesh import bench
    from orbitmesh.client import MeshClient

    client = MeshClient(endpoint)
    await client.connect()
    try:
        payload = b"\x00" * 64
        call = bench._invokes(client, payload) if variant == "invoke" else bench._jobs(client, payload)
        await bench._Pipeline(call, 1000, 1.0, 10**9, variant).run()  # warm up
        b0, a0, c0 = broker.cpu(), agent.cpu_ns(), time.process_time()
        count, elapsed = await bench._Pipeline(call, 1000, duration, 10**9, variant).run()
        b1, a1, c1 = broker.cpu(), agent.cpu_ns(), time.process_time()
        taken = (await client.stats()).get("jobs_fast_path", 0)  # by the broker's common-path table
    finally:
        await client.close()
    per = 1 / (1000.0 * count)  # ns in all -> us per call
    out = {
        "rate": count / elapsed,
        "broker": (b1[0] - b0[0]) * per,
        "agent": (a1 - a0) * per,
        "client": (c1 - c0) * 1e6 / count,
        "table": float(taken),
    }
    for role, ns in b1[1].items():
        out["broker." + role] = (ns - b0[1].get(role, 0)) * per
    return out


def run(variant: str, durability: str, duration: float) -> dict[str, float]:
    """One variant against a fresh broker and agent; its rate and CPU per call."""
    from orbitmesh import bench

    with tempfile.TemporaryDirectory(prefix="om-ceiling-") as tmp, contextlib.ExitStack() as stack:
        os.environ["ORBITMESH_CEILING"] = variant if variant.startswith("lean") else ""
        store = f"lmdb://{tmp}/jobs" if variant != "invoke" else None
        broker = bench.Child("broker", core="c", store=store, durability=durability)
        stack.callback(broker.stop)
        endpoint = broker.ready()["endpoint"]
        agent = bench.Child("agent", endpoint=endpoint, capacity=1000)
        stack.callback(agent.stop)
        agent.ready()
        return asyncio.run(_drive(variant, endpoint, broker, agent, duration))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per variant and round")
    parser.add_argument("--durability", default="sync", choices=("sync", "batch", "none"))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every variant, interleaved")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="om-ceiling-site-") as site:
        Path(site, "sitecustomize.py").write_text(_SITE.format(here=str(Path(__file__).resolve().parent)))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
        results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                results[variant].append(run(variant, args.durability, args.duration))
    print(f"durability {args.durability}, {args.rounds} rounds of {args.duration:g} s; ratio to the round's invoke")
    print("CPU in us per call (a job, or an invoke round trip); table: whether the broker's common-path")
    print("job table took the jobs (the lean variants replace it)")
    columns = ("calls/s", "vs invoke", "broker", "control", "joblog", "dataplane", "agent", "client", "table")
    widths = (9, 9, 7, 8, 7, 9, 6, 6, 5)
    print(f"{'variant':10} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for variant in VARIANTS:
        for r, base in zip(results[variant], results["invoke"], strict=True):
            print(
                f"{variant:10} {r['rate']:9,.0f} {r['rate'] / base['rate']:9.2f} {r['broker']:7.1f} "
                f"{r.get('broker.control', 0):8.1f} {r.get('broker.joblog', 0):7.1f} "
                f"{r.get('broker.dataplane', 0):9.1f} {r['agent']:6.1f} {r['client']:6.1f} "
                f"{'yes' if r['table'] else 'no':>5}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
