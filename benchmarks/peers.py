"""OrbitMesh next to Celery + Redis and Ray on the same two workloads, on this machine, in one run.

* ``batch``: N no-op tasks (64-byte payload, echoed) submitted at once, end to end until every
  result is back: tasks/s.
* ``sequential``: one task at a time, submit to result: p50 / p99 latency.

OrbitMesh runs as ``orbitmesh bench`` does (broker and agent in their own processes, client here):
``invoke`` (request/reply) and durable ``execute`` (LMDB job log, sync durability), 1000 in flight,
sent with the pipelining primitives ``submit`` / ``submit_job`` (futures and done-callbacks, as
Ray's ``.remote()`` and Celery's ``.delay()`` hand back futures), and again with the coroutine API
(``invoke()`` / ``execute()`` + ``Job.result()``, one coroutine per task). Sequential: the
coroutine API, one in flight. Celery: a worker process (its default prefork pool, concurrency =
CPUs) on a Redis broker + result backend (a redis-server started here on a free port, stopped by PID,
unless ``--redis-url``). Ray: ``ray.init`` on this machine (num_cpus = CPUs), remote functions, and an
actor method for the sequential case too.

Needs the ``peers`` extra (``pip install 'orbitmesh[peers]'``); not part of the test suite. A peer
that is not installed is reported as skipped. Run::

    python benchmarks/peers.py --tasks 10000 --json peers.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

PAYLOAD = bytes(range(64))
START_TIMEOUT = 120.0
TASK_TIMEOUT = 300.0


def percentile_ms(samples: list[float], q: float) -> float:
    """Nearest-rank quantile of samples in seconds, in ms."""
    s = sorted(samples)
    return 1000 * s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))] if s else 0.0


def sequential(call: Callable[[], Any], samples: int, budget: float) -> dict[str, float]:
    """``samples`` calls one at a time (at most ``budget`` s); p50 / p99 in ms."""
    out: list[float] = []
    end = time.perf_counter() + budget
    while len(out) < samples and time.perf_counter() < end:
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return {"p50_ms": percentile_ms(out, 0.5), "p99_ms": percentile_ms(out, 0.99), "samples": len(out)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ OrbitMesh


def run_orbitmesh(tasks: int, samples: int, budget: float) -> dict[str, Any]:
    from orbitmesh import bench as b
    from orbitmesh.client import MeshClient
    from orbitmesh.runtime import run

    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        top = tempfile.mkdtemp(prefix="orbitmesh-peers-")
        stack.callback(shutil.rmtree, top, ignore_errors=True)
        broker, info = b._start(stack, "broker", core=b.core_impl(), store=f"lmdb://{top}/jobs", durability="sync")
        b._start(stack, "agent", endpoint=info["endpoint"], capacity=1000)

        async def session() -> None:
            client = MeshClient(info["endpoint"], timeout=60.0)
            await client.connect(START_TIMEOUT)
            try:
                sem = asyncio.Semaphore(1000)

                async def one_invoke() -> None:
                    async with sem:
                        await client.invoke(b.AGENT_NAME, b.COMMAND, PAYLOAD)

                async def one_job() -> None:
                    async with sem:
                        job = await client.execute(b.AGENT_NAME, b.COMMAND, PAYLOAD)
                        await job.result()

                async def batch_of(name: str, n: int) -> float:
                    """Seconds for ``n`` tasks, 1,000 in flight: with the primitives (submit /
                    submit_job and done-callbacks: futures, as Ray's .remote() and Celery's .delay()
                    return) or with the coroutine API (one coroutine each)."""
                    t = time.perf_counter()
                    if name in ("invoke", "execute"):
                        calls = b._invokes(client, PAYLOAD) if name == "invoke" else b._jobs(client, PAYLOAD)
                        done, _ = await b._Pipeline(calls, 1000, 3600.0, n, "a task").run()
                        assert done == n
                    else:
                        one = one_invoke if name == "invoke_coroutines" else one_job
                        await asyncio.gather(*(one() for _ in range(n)))
                    return time.perf_counter() - t

                for name in ("invoke", "execute", "invoke_coroutines", "execute_coroutines"):
                    await batch_of(name, min(tasks, 1000))  # warm-up
                    elapsed = await batch_of(name, tasks)
                    out[name] = {"tasks": tasks, "batch_seconds": elapsed, "tasks_per_s": tasks / elapsed}
                    if name in ("invoke", "execute"):  # one at a time: the coroutine API (one in flight)
                        one = one_invoke if name == "invoke" else one_job
                        lat: list[float] = []
                        end = time.perf_counter() + budget
                        while len(lat) < samples and time.perf_counter() < end:
                            t = time.perf_counter()
                            await one()
                            lat.append(time.perf_counter() - t)
                        p50, p99 = percentile_ms(lat, 0.5), percentile_ms(lat, 0.99)
                        out[name].update(p50_ms=p50, p99_ms=p99, samples=len(lat))
            finally:
                await client.close()

        run(session())
    return out


# ------------------------------------------------------------------ Celery + Redis


CELERY_TASKS = """
from celery import Celery
import os
app = Celery("peer_tasks", broker=os.environ["PEERS_REDIS"], backend=os.environ["PEERS_REDIS"])
app.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack"],
                worker_prefetch_multiplier=64, broker_connection_retry_on_startup=True)

@app.task
def noop(x):
    return x
"""


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """``url``, or a fresh redis-server on a free port (no persistence), stopped by PID after."""
    if url:
        yield url
        return
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install it or pass --redis-url")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > end:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_celery(tasks: int, samples: int, budget: float, redis_url: str | None) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(redis_url))
        workdir = tempfile.mkdtemp(prefix="orbitmesh-peers-celery-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        Path(workdir, "peer_tasks.py").write_text(textwrap.dedent(CELERY_TASKS))
        env = dict(os.environ, PEERS_REDIS=url, PYTHONPATH=workdir)
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "peer_tasks", "worker", "--loglevel=WARNING", "-c", str(cpus)]
            + ["--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop_worker() -> None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

        stack.callback(stop_worker)
        os.environ["PEERS_REDIS"] = url
        sys.path.insert(0, workdir)
        try:
            import peer_tasks  # type: ignore[import-not-found]
        finally:
            sys.path.remove(workdir)
        noop = peer_tasks.noop
        noop.delay(PAYLOAD).get(timeout=START_TIMEOUT)  # the worker is up
        for r in [noop.delay(PAYLOAD) for _ in range(min(tasks, 500))]:  # warm-up
            r.get(timeout=TASK_TIMEOUT)
        t = time.perf_counter()
        results = [noop.delay(PAYLOAD) for _ in range(tasks)]
        for r in results:
            r.get(timeout=TASK_TIMEOUT)
        elapsed = time.perf_counter() - t
        seq = sequential(lambda: noop.delay(PAYLOAD).get(timeout=TASK_TIMEOUT), samples, budget)
        peer_tasks.app.close()
    return {
        "tasks": {"tasks": tasks, "batch_seconds": elapsed, "tasks_per_s": tasks / elapsed, **seq},
        "config": f"celery prefork -c {cpus}, redis broker + result backend, msgpack",
    }


# ------------------------------------------------------------------ Ray


def run_ray(tasks: int, samples: int, budget: float) -> dict[str, Any]:
    import ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:

        @ray.remote
        def noop(x: bytes) -> bytes:
            return x

        @ray.remote
        class Echo:
            def noop(self, x: bytes) -> bytes:
                return x

        ray.get([noop.remote(PAYLOAD) for _ in range(min(tasks, 1000))])  # warm-up (workers start)
        t = time.perf_counter()
        ray.get([noop.remote(PAYLOAD) for _ in range(tasks)])
        elapsed = time.perf_counter() - t
        seq = sequential(lambda: ray.get(noop.remote(PAYLOAD)), samples, budget)
        actor = Echo.remote()  # type: ignore[attr-defined]
        ray.get(actor.noop.remote(PAYLOAD))
        actor_seq = sequential(lambda: ray.get(actor.noop.remote(PAYLOAD)), samples, budget)
        version = ray.__version__
    finally:
        ray.shutdown()
    return {
        "tasks": {"tasks": tasks, "batch_seconds": elapsed, "tasks_per_s": tasks / elapsed, **seq},
        "actor": actor_seq,
        "config": f"ray {version}, num_cpus={cpus}, remote functions; actor method for 'actor'",
    }


# ------------------------------------------------------------------ report


def table(results: dict[str, Any]) -> str:
    """One line per system: batch tasks/s and sequential p50 / p99."""
    lines = [f"{'system':38}  {'batch tasks/s':>13}  {'seq p50 ms':>10}  {'seq p99 ms':>10}"]
    lines.append("-" * len(lines[0]))
    rows: list[tuple[str, dict[str, Any]]] = []
    om = results.get("orbitmesh", {})
    labels = {
        "invoke": "OrbitMesh invoke (submit)",
        "execute": "OrbitMesh execute (submit_job, sync)",
        "invoke_coroutines": "OrbitMesh invoke() coroutines",
        "execute_coroutines": "OrbitMesh execute() coroutines",
    }
    for name, label in labels.items():
        if name in om:
            rows.append((label, om[name]))
    if "tasks" in results.get("celery", {}):
        rows.append(("Celery + Redis", results["celery"]["tasks"]))
    if "tasks" in results.get("ray", {}):
        rows.append(("Ray tasks", results["ray"]["tasks"]))
        rows.append(("Ray actor method (sequential only)", {"tasks_per_s": 0.0, **results["ray"]["actor"]}))
    for name, r in rows:
        rate = f"{r['tasks_per_s']:,.0f}" if r.get("tasks_per_s") else "-"
        p50 = f"{r['p50_ms']:.2f}" if "p50_ms" in r else "-"
        p99 = f"{r['p99_ms']:.2f}" if "p99_ms" in r else "-"
        lines.append(f"{name:38}  {rate:>13}  {p50:>10}  {p99:>10}")
    ours = om.get("invoke", {}).get("tasks_per_s")
    for peer, key in (("celery", "Celery + Redis"), ("ray", "Ray tasks")):
        theirs = results.get(peer, {}).get("tasks", {}).get("tasks_per_s")
        if ours and theirs:
            lines.append(f"OrbitMesh invoke / {key}: {ours / theirs:,.1f}x")
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name}: skipped ({r['skipped']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=10_000, help="tasks in the batch workload")
    p.add_argument("--samples", type=int, default=1000, help="sequential calls per system")
    p.add_argument("--budget", type=float, default=20.0, help="max seconds for the sequential calls")
    p.add_argument("--peers", default="orbitmesh,celery,ray", help="which systems, comma-separated")
    p.add_argument("--redis-url", help="an existing Redis for Celery (default: start one here)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    from orbitmesh.bench import machine_info

    results: dict[str, Any] = {}
    for name in [n.strip() for n in args.peers.split(",") if n.strip()]:
        need = {"orbitmesh": "zmq", "celery": "celery", "ray": "ray"}.get(name)
        if need is None:
            p.error(f"unknown system {name!r}")
        if importlib.util.find_spec(need) is None:
            results[name] = {"skipped": f"{need} is not installed (pip install 'orbitmesh[peers]')"}
            continue
        print(f"peers: running {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            if name == "orbitmesh":
                results[name] = run_orbitmesh(args.tasks, args.samples, args.budget)
            elif name == "celery":
                results[name] = run_celery(args.tasks, args.samples, args.budget, args.redis_url)
            else:
                results[name] = run_ray(args.tasks, args.samples, args.budget)
        except Exception as exc:  # a peer that fails to run is reported, the others still run
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        results.setdefault(name, {})["wall_seconds"] = time.perf_counter() - t
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine_info(), "tasks": args.tasks, "results": results}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
