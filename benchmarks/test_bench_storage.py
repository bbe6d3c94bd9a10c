"""Job store write throughput: batches of 1,000 records per transaction (the broker's group
commit), per store and durability mode. Each result also reports records/s
(``extra_info["records_per_s"]``, and printed with ``-s``).

Redis runs against ``ORBITMESH_TEST_REDIS_URL`` (default redis://127.0.0.1:6379/0); its ``sync``
mode needs that server at ``appendonly yes`` + ``appendfsync always``, as ``.ci/run`` starts it.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orbitmesh.models import JobState
from orbitmesh.storage import DURABILITY_MODES, JobRecord, JobStore, LmdbStore, MemoryStore, SqliteStore

pytestmark = pytest.mark.benchmark(group="storage")

BATCH = 1000
ROUNDS = 15
REDIS_URL = os.environ.get("ORBITMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CASES = [(kind, mode) for kind in ("lmdb", "sqlite", "redis") for mode in DURABILITY_MODES] + [("memory", "none")]


def _record(job_id: int, now: float) -> JobRecord:
    """About 200 bytes encoded, like a small tracked job; one in ten has an idempotency key."""
    return JobRecord(
        id=job_id,
        command="resize_image",
        route=b"\x01\x00worker-3",
        params=b"p" * 64,
        state=JobState.PENDING,
        created=now,
        updated=now,
        agent=f"worker-{job_id % 8}",
        idempotency_key=f"req-{job_id}" if job_id % 10 == 0 else "",
        transitions=[("PENDING", now, "")],
    )


def _make(kind: str, mode: str, tmp_path: Path, prefix: str) -> JobStore:
    if kind == "lmdb":
        return LmdbStore(tmp_path / "jobs.lmdb", mode)
    if kind == "sqlite":
        return SqliteStore(tmp_path / "jobs.db", mode)
    if kind == "redis":
        from orbitmesh.storage.redis_store import RedisStore

        return RedisStore(REDIS_URL, prefix, mode)
    return MemoryStore(mode)


@pytest.mark.parametrize(("kind", "mode"), CASES, ids=[f"{k}-{m}" for k, m in CASES])
def test_write_batches(benchmark: Any, kind: str, mode: str, tmp_path: Path) -> None:
    # Given an open store, When batches of 1,000 new records are written, Expect them all stored
    prefix = f"orbitmesh-bench:{uuid.uuid4().hex}:"
    store = _make(kind, mode, tmp_path, prefix)
    store.open()
    ids = itertools.count(1)
    try:

        def batch() -> tuple[tuple[list[JobRecord]], dict[str, Any]]:
            now = time.time()
            return ([_record(next(ids), now) for _ in range(BATCH)],), {}

        benchmark.pedantic(store.write, setup=batch, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        written = next(ids) - 1
        assert store.max_id() == written and store.counts()[JobState.PENDING] == written
        if benchmark.stats is not None:
            rate = BATCH / benchmark.stats.stats.median
            benchmark.extra_info["records_per_s"] = round(rate)
            print(f"\n{kind:>6} {mode:<5}: {rate:>12,.0f} records/s (median of {ROUNDS} batches of {BATCH})")
    finally:
        store.close()
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
