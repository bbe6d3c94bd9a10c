"""Job stores: one conformance suite run on every store (LMDB, SQLite, Redis, memory), then
each store's own failure modes (damaged, foreign, truncated data; a full disk; map growth).

LMDB and SQLite live in ``tmp_path``; Redis is a real redis-server (``.ci/run`` starts one and
exports ``ORBITMESH_TEST_REDIS_URL``); each test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from orbitmesh import _core
from orbitmesh.errors import ErrorCode, StorageError
from orbitmesh.models import JobState
from orbitmesh.storage import (
    DURABILITY_MODES,
    JobRecord,
    JobStore,
    LmdbStore,
    MemoryStore,
    SqliteStore,
    open_store,
)
from orbitmesh.storage.redis_store import RedisStore

from .conftest import subprocess_env

REDIS_URL = os.environ.get("ORBITMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# "lmdb" runs on the default binding (the system's liblmdb, compiled, where it was built);
# "lmdb-py" on its twin, py-lmdb, as a build without liblmdb's headers does.
KINDS = ["lmdb", "lmdb-py", "sqlite", "redis", "memory"]
PERSISTENT = ["lmdb", "lmdb-py", "sqlite", "redis"]
DONE, PENDING, RUNNING = JobState.SUCCEEDED, JobState.PENDING, JobState.RUNNING


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis server's URL; no server is a failure, never a skip."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(
            f"no Redis server at {REDIS_URL} ({exc}). The Redis store tests need a real one: .ci/run starts it; "
            "locally run `redis-server --port 6379 --save '' --appendonly yes --appendfsync always` "
            "or set ORBITMESH_TEST_REDIS_URL",
            pytrace=False,
        )
    finally:
        client.close()
    return REDIS_URL


class Stores:
    """Makes stores of one kind; the same ``name`` reaches the same data (to reopen it)."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.made: list[JobStore] = []
        self.prefixes: set[str] = set()
        self._run = uuid.uuid4().hex[:12]

    def location(self, name: str) -> str:
        if self.kind.startswith("lmdb"):
            return str(self.tmp_path / f"{name}.lmdb")
        if self.kind == "sqlite":
            return str(self.tmp_path / f"{name}.db")
        return f"orbitmesh-test:{self._run}:{name}:"

    def make(self, name: str = "main", durability: str = "none", **kwargs: Any) -> JobStore:
        """A new, unopened store."""
        store: JobStore
        if self.kind == "lmdb":
            store = LmdbStore(self.location(name), durability, **kwargs)
        elif self.kind == "lmdb-py":
            store = LmdbStore(self.location(name), durability, binding=_core.load("_lmdb", "py"), **kwargs)
        elif self.kind == "sqlite":
            store = SqliteStore(self.location(name), durability, **kwargs)
        elif self.kind == "redis":
            assert self.redis_url is not None
            self.prefixes.add(self.location(name))
            store = RedisStore(self.redis_url, self.location(name), durability, **kwargs)
        else:
            store = MemoryStore(durability)
        self.made.append(store)
        return store

    def opened(self, name: str = "main", durability: str = "none", **kwargs: Any) -> JobStore:
        store = self.make(name, durability, **kwargs)
        store.open()
        return store

    def cleanup(self) -> None:
        for store in self.made:
            store.close()
        if self.prefixes:
            import redis

            assert self.redis_url is not None
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            try:
                for prefix in self.prefixes:
                    keys = list(client.scan_iter(match=prefix + "*", count=1000))
                    if keys:
                        client.delete(*keys)
            finally:
                client.close()


def _stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    kind = request.param
    url = request.getfixturevalue("redis_url") if kind == "redis" else None
    stores = Stores(kind, tmp_path, url)
    try:
        yield stores
    finally:
        stores.cleanup()


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    yield from _stores(request, tmp_path)


@pytest.fixture(params=PERSISTENT)
def persistent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    yield from _stores(request, tmp_path)


@pytest.fixture
def store(stores: Stores) -> JobStore:
    """An open store of each kind (durability ``none``: the modes have their own tests)."""
    return stores.opened()


# -- helpers ----------------------------------------------------------------------------------


def job(job_id: int, **fields: Any) -> JobRecord:
    fields.setdefault("command", "square")
    fields.setdefault("created", float(job_id))
    fields.setdefault("updated", float(job_id))
    return JobRecord(id=job_id, **fields)


def full_record(job_id: int) -> JobRecord:
    """A record with every field away from its default."""
    return JobRecord(
        id=job_id,
        command="résumé/ünïcode",
        route=b"\x01\x00worker-1\x00",
        params=bytes(range(256)),
        flags=0x0102,
        state=JobState.FAILED,
        attempts=3,
        max_attempts=5,
        created=1_700_000_000.125,
        updated=1_700_000_009.5,
        run_at=1_700_000_001.25,
        timeout=2.5,
        agent="agent-π",
        session=7,
        lease=99,
        lease_expires=1_700_000_010.0,
        idempotency_key="order-42",
        retry_initial=0.25,
        retry_max=8.0,
        non_retryable=("ValueError", "KeyError"),
        result=b"\x00\xffresult",
        result_flags=3,
        error_code=301,
        error="boom",
        error_type="RuntimeError",
        transitions=[("PENDING", 1.0, ""), ("RUNNING", 2.0, "agent-π"), ("FAILED", 3.0, "agent-π")],
    )


def all_pages(store: JobStore, limit: int = 3, **filters: Any) -> list[int]:
    """Every id a query matches, page by page (checks each page's size and cursor)."""
    ids: list[int] = []
    cursor: int | None = None
    for _ in range(10_000):
        page, cursor = store.query(limit=limit, cursor=cursor, **filters)
        assert len(page) <= limit
        ids.extend(r.id for r in page)
        if cursor is None:
            return ids
        assert len(page) == limit and cursor == page[-1].id
    raise AssertionError("paging did not end")


def snapshot(store: JobStore, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything a store answers, to compare before / after."""
    return {
        "records": [r for r in store.query(limit=10_000)[0]],
        "states": {s: all_pages(store, state=s) for s in JobState},
        "unfinished": [r.id for r in store.unfinished()],
        "terminal": store.terminal_before(float("inf"), 10_000),
        "counts": store.counts(),
        "max_id": store.max_id(),
        "keys": {k: store.find_key(k) for k in keys},
    }


class Boom(Exception):
    pass


class Unencodable(JobRecord):
    """A record whose encoding fails: a write must leave nothing of its batch behind."""

    def to_bytes(self) -> bytes:
        raise Boom("cannot encode")


# -- conformance: every store -----------------------------------------------------------------


def test_round_trip_every_field(store: JobStore) -> None:
    # Given a record with every field set, When written and read back, Expect it equal
    rec = full_record(5)
    store.write([rec])
    assert store.get(5) == rec
    assert store.find_key("order-42") == 5
    assert store.get(6) is None and store.find_key("nope") is None and store.find_key("") is None


def test_returned_records_are_copies(store: JobStore) -> None:
    # Given a written record, When the caller mutates it and what it read, Expect the store unchanged
    rec = job(1, transitions=[("PENDING", 1.0, "")])
    store.write([rec])
    rec.transitions.append(("RUNNING", 2.0, "a"))
    got = store.get(1)
    assert got is not None
    got.transitions.clear()
    assert store.get(1) == job(1, transitions=[("PENDING", 1.0, "")])


def test_replace_updates_every_index(store: JobStore) -> None:
    # Given a pending job of agent a, command x, key k1
    store.write([job(1, agent="a", command="x", idempotency_key="k1", created=10.0)])
    store.write([job(2, agent="a", command="x")])
    # When it is replaced: finished, by agent b, command y, key k2, created later
    store.write([job(1, state=DONE, agent="b", command="y", idempotency_key="k2", created=20.0, updated=30.0)])
    # Expect every query to see it only where it now belongs
    assert all_pages(store, state=PENDING) == [2] and all_pages(store, state=DONE) == [1]
    assert all_pages(store, agent="a") == [2] and all_pages(store, agent="b") == [1]
    assert all_pages(store, command="x") == [2] and all_pages(store, command="y") == [1]
    assert all_pages(store, since=15.0) == [1]
    assert store.find_key("k1") is None and store.find_key("k2") == 1
    assert [r.id for r in store.unfinished()] == [2]
    assert store.terminal_before(31.0, 10) == [1] and store.terminal_before(30.0, 10) == []
    assert store.counts()[PENDING] == 1 and store.counts()[DONE] == 1
    # When it goes back to running, Expect it out of the retention index again
    store.write([job(1, state=RUNNING, updated=40.0)])
    assert store.terminal_before(100.0, 10) == [] and [r.id for r in store.unfinished()] == [1, 2]


def test_delete_removes_from_every_query(store: JobStore) -> None:
    # Given two finished jobs and one pending, all with keys
    store.write(
        [
            job(1, state=DONE, agent="a", command="x", idempotency_key="k1"),
            job(2, state=DONE, agent="a", command="x", idempotency_key="k2"),
            job(3, agent="a", command="x", idempotency_key="k3"),
        ]
    )
    # When 1 and 3 are deleted (and a missing id too)
    store.write([], delete=[1, 3, 99])
    # Expect them gone from every query, 2 untouched
    assert store.get(1) is None and store.get(3) is None and store.get(2) is not None
    assert all_pages(store) == [2] and all_pages(store, agent="a") == [2] and all_pages(store, command="x") == [2]
    assert all_pages(store, state=DONE) == [2] and all_pages(store, state=PENDING) == []
    assert all_pages(store, since=0.0) == [2]
    assert store.find_key("k1") is None and store.find_key("k3") is None and store.find_key("k2") == 2
    assert store.unfinished() == [] and store.terminal_before(1e9, 10) == [2]
    assert store.counts() == {**dict.fromkeys(JobState, 0), DONE: 1}


def test_idempotency_key(store: JobStore) -> None:
    # Given a job holding a key
    store.write([job(1, idempotency_key="order-1")])
    assert store.find_key("order-1") == 1
    # When another job asks for the same key, Expect StorageError and nothing of that batch written
    with pytest.raises(StorageError, match="order-1"):
        store.write([job(2), job(3, idempotency_key="order-1")])
    assert store.get(2) is None and store.max_id() == 1 and store.find_key("order-1") == 1
    # When the holder is rewritten with the same key, Expect it kept
    store.write([job(1, idempotency_key="order-1", attempts=2)])
    assert store.find_key("order-1") == 1
    # When the holder is deleted, Expect the key free for another job
    store.write([], delete=[1])
    assert store.find_key("order-1") is None
    store.write([job(2, idempotency_key="order-1")])
    assert store.find_key("order-1") == 2


def test_key_moves_within_one_batch(store: JobStore) -> None:
    # Given job 1 holding k; When one batch moves k from 1 to 2, Expect 2 to hold it
    store.write([job(1, idempotency_key="k")])
    store.write([job(1), job(2, idempotency_key="k")])
    assert store.find_key("k") == 2


def test_long_names_and_keys(store: JobStore) -> None:
    # Given names and keys longer than LMDB's 511-byte key limit, Expect them indexed like any other
    long_agent, long_cmd, long_key = "a" * 2000, "c" * 600, "k" * 5000
    store.write([job(1, agent=long_agent, command=long_cmd, idempotency_key=long_key), job(2, agent="a" * 1999)])
    assert all_pages(store, agent=long_agent) == [1] and all_pages(store, command=long_cmd) == [1]
    assert store.find_key(long_key) == 1 and store.find_key("k" * 4999) is None


def test_query_filters(store: JobStore) -> None:
    # Given jobs across states, agents and commands
    store.write(
        [
            job(1, state=PENDING, agent="a", command="x"),
            job(2, state=RUNNING, agent="a", command="y"),
            job(3, state=DONE, agent="b", command="x"),
            job(4, state=DONE, agent="a", command="x"),
            job(5, state=RUNNING, agent="b", command="y"),
        ]
    )
    # When filtered alone and combined, Expect exactly the matches, newest first
    assert all_pages(store) == [5, 4, 3, 2, 1]
    assert all_pages(store, state=DONE) == [4, 3]
    assert all_pages(store, agent="a") == [4, 2, 1]
    assert all_pages(store, command="y") == [5, 2]
    assert all_pages(store, state=DONE, agent="a") == [4]
    assert all_pages(store, agent="b", command="y") == [5]
    assert all_pages(store, state=RUNNING, agent="a", command="y", since=2.0) == [2]
    assert all_pages(store, state=JobState.LOST) == [] and all_pages(store, agent="nobody") == []
    assert all_pages(store, agent="") == []


def test_query_paging(store: JobStore) -> None:
    # Given 23 jobs, 12 of them of agent a
    store.write([job(i, agent="a" if i % 2 else "b") for i in range(1, 24)])
    # When paged 5 at a time, Expect every id once, newest first, and no cursor after the last page
    assert all_pages(store, limit=5) == list(range(23, 0, -1))
    assert all_pages(store, limit=4, agent="a") == list(range(23, 0, -2))
    assert all_pages(store, limit=1, since=20.0) == [23, 22, 21, 20]
    # When a page ends exactly at the last match, Expect no further cursor
    page, cursor = store.query(limit=12, agent="a")
    assert len(page) == 12 and cursor is None
    # When a cursor is given, Expect only ids below it
    page, cursor = store.query(limit=3, cursor=10)
    assert [r.id for r in page] == [9, 8, 7] and cursor == 7
    assert store.query(cursor=1) == ([], None) and store.query(cursor=0) == ([], None)
    assert [r.id for r in store.query(limit=2, cursor=10**30)[0]] == [23, 22]


def test_query_since(store: JobStore) -> None:
    # Given jobs created at distinct, equal, negative and fractional times
    times = {1: -5.0, 2: 0.0, 3: 1.5, 4: 1.5, 5: 1.5000001, 6: 1e12}
    store.write([job(i, created=t) for i, t in times.items()])
    # When queried since a time, Expect exactly those created at or after it
    for since in (-10.0, -5.0, -0.0, 0.0, 1.5, 1.50000005, 2.0, 1e12, 2e12):
        want = sorted((i for i, t in times.items() if t >= since), reverse=True)
        assert all_pages(store, since=since) == want, since
        assert all_pages(store, since=since, command="square") == want, since


def test_unfinished_oldest_first(store: JobStore) -> None:
    # Given jobs in every state, written out of order
    states = list(JobState)
    store.write([job(i, state=states[i % len(states)]) for i in (9, 3, 14, 1, 8, 2, 11)])
    # Expect the non-terminal ones, lowest id first
    got = store.unfinished()
    assert [r.id for r in got] == sorted(i for i in (9, 3, 14, 1, 8, 2, 11) if not states[i % len(states)].terminal)
    assert all(not r.terminal for r in got)


def test_terminal_before(store: JobStore) -> None:
    # Given finished jobs updated at various times (ties included) and unfinished old ones
    updated = {1: 50.0, 2: 10.0, 3: 10.0, 4: 30.0, 5: 5.0, 6: 70.0}
    store.write([job(i, state=JobState.FAILED if i % 2 else DONE, updated=u) for i, u in updated.items()])
    store.write([job(7, state=RUNNING, updated=1.0), job(8, updated=1.0)])
    # Expect terminal ids updated strictly before the time, oldest (updated, then id) first, limited
    assert store.terminal_before(50.0, 100) == [5, 2, 3, 4]
    assert store.terminal_before(50.0, 2) == [5, 2]
    assert store.terminal_before(1e9, 100) == [5, 2, 3, 4, 1, 6]
    assert store.terminal_before(5.0, 100) == [] and store.terminal_before(1e9, 0) == []


def test_counts(store: JobStore) -> None:
    # Given an empty store, Expect zero for every state
    assert store.counts() == dict.fromkeys(JobState, 0)
    # Given jobs in some states, Expect their counts and zero elsewhere
    store.write([job(1), job(2), job(3, state=DONE), job(4, state=JobState.LOST)])
    store.write([job(2, state=RUNNING)], delete=[4])
    assert store.counts() == {**dict.fromkeys(JobState, 0), PENDING: 1, RUNNING: 1, DONE: 1}


def test_max_id_never_decreases(store: JobStore) -> None:
    # Given an empty store, Expect 0
    assert store.max_id() == 0
    # When ids are written out of order and the highest deleted, Expect the highest ever seen
    store.write([job(7), job(3)])
    assert store.max_id() == 7
    store.write([], delete=[7, 3])
    assert store.max_id() == 7
    store.write([job(5)])
    assert store.max_id() == 7
    store.write([job(2**63 - 1)])
    assert store.max_id() == 2**63 - 1


def test_failed_write_leaves_nothing(store: JobStore) -> None:
    # Given some jobs with keys
    keys = ("k1", "k2", "k9")
    store.write([job(1, idempotency_key="k1"), job(2, state=DONE, agent="a"), job(3)])
    before = snapshot(store, keys)
    # When a batch replaces, inserts and deletes, but one record in the middle cannot be encoded
    batch = [
        job(1, state=DONE, idempotency_key="k9", agent="z"),
        job(10, idempotency_key="k2"),
        Unencodable(id=11, command="x"),
        job(12),
    ]
    with pytest.raises(Boom):
        store.write(batch, delete=[2, 3])
    # Expect nothing of it visible anywhere, and the store still writable
    assert snapshot(store, keys) == before
    store.write([job(12)])
    assert store.get(12) is not None and store.max_id() == 12


def test_invalid_arguments(store: JobStore) -> None:
    # Expect ValueError (and nothing written) for bad ids, NaN times and bad limits
    for bad in (0, -1, 2**63, True):
        with pytest.raises(ValueError):
            store.write([job(bad)])
        with pytest.raises(ValueError):
            store.write([], delete=[bad])
    with pytest.raises(ValueError):
        store.write([job(1), job(2, created=float("nan"))])
    with pytest.raises(ValueError):
        store.query(limit=0)
    assert store.max_id() == 0 and store.get(1) is None
    assert store.get(0) is None and store.get(-3) is None and store.get(2**70) is None


def test_prepare_takes_a_snapshot(store: JobStore) -> None:
    # Given a record handed to the job log (prepared) and then changed by the control plane
    rec = full_record(7)
    rec.state = JobState.RUNNING
    item = store.prepare(rec)
    before = full_record(7)
    before.state = JobState.RUNNING
    rec.state = JobState.SUCCEEDED
    rec.transitions.append(("SUCCEEDED", 99.0, "worker-2"))
    rec.agent = "worker-2"
    # When the prepared item is written, Expect the record as it was when prepared, indexes too
    store.write_prepared([item])
    assert store.get(7) == before
    assert [r.id for r in store.query(state=JobState.RUNNING)[0]] == [7]
    assert store.query(state=JobState.SUCCEEDED)[0] == [] and store.query(agent="worker-2")[0] == []
    # ... and the later change, prepared and written, replaces it in every index
    store.write_prepared([store.prepare(rec)])
    assert store.get(7) == rec and [r.id for r in store.query(agent="worker-2")[0]] == [7]
    assert store.query(state=JobState.RUNNING)[0] == []


@pytest.mark.parametrize("state", [JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED])
def test_a_record_prepared_from_its_encoding_is_written_as_prepare_writes_it(store: JobStore, state: JobState) -> None:
    # Given a record (no idempotency key: the common-path job table's) in a state, live or ended
    rec = full_record(8)
    rec.idempotency_key = ""
    rec.state = state
    # When it is prepared from its encoding and the fields its indexes read, and written
    item = store.prepare_encoded(rec.id, rec.state, rec.agent, rec.command, rec.created, rec.updated, rec.to_bytes())
    store.write_prepared([item])
    # Expect the record and every index as when the record itself is prepared and written
    assert store.get(8) == rec
    assert [r.id for r in store.query(state=state)[0]] == [8]
    assert [r.id for r in store.query(agent=rec.agent, command=rec.command, since=rec.created)[0]] == [8]
    assert [r.id for r in store.unfinished()] == ([] if state.terminal else [8])
    assert store.terminal_before(rec.updated + 1, 10) == ([8] if state.terminal else [])
    assert store.terminal_before(rec.updated, 10) == []  # by its updated time, not its created
    assert store.counts()[state] == 1 and store.max_id() == 8


def test_closed_store_refuses(stores: Stores) -> None:
    # Given a store not opened yet, or closed, Expect StorageError; close twice is fine
    s = stores.make()
    with pytest.raises(StorageError):
        s.get(1)
    s.open()
    s.open()  # idempotent
    s.close()
    s.close()
    with pytest.raises(StorageError):
        s.write([job(1)])


@pytest.mark.parametrize("mode", DURABILITY_MODES)
def test_durability_modes(persistent: Stores, mode: str) -> None:
    # Given a store in each mode, When written, flushed and closed, Expect a reopened one to see it
    s = persistent.make("d", durability=mode)
    s.open()
    assert s.durability == mode
    s.write([job(1), job(2, state=DONE)])
    s.flush()
    s.write([job(3)])
    s.close()
    again = persistent.opened("d")
    assert [r.id for r in again.query()[0]] == [3, 2, 1]


def test_bad_durability_mode(tmp_path: Path) -> None:
    # Expect ValueError for an unknown mode, from every constructor and from open_store
    for make in (
        lambda: LmdbStore(tmp_path / "l", "fast"),
        lambda: SqliteStore(tmp_path / "s.db", "fast"),
        lambda: RedisStore(REDIS_URL, durability="fast"),
        lambda: MemoryStore("fast"),
        lambda: open_store("memory://", "fast"),
    ):
        with pytest.raises(ValueError, match="durability"):
            make()
    assert not (tmp_path / "l").exists()


def test_reopen_sees_everything(persistent: Stores) -> None:
    # Given a store with jobs, keys, deletes and a history of ids
    s = persistent.opened("r")
    s.write([full_record(i) if i == 4 else job(i, state=DONE if i % 2 else PENDING) for i in range(1, 9)])
    s.write([job(2, state=RUNNING, agent="w")], delete=[8])
    before = snapshot(s, ("order-42",))
    s.close()
    # When it is closed and opened again, Expect every answer the same
    again = persistent.opened("r")
    assert snapshot(again, ("order-42",)) == before
    assert again.max_id() == 8 and again.get(4) == full_record(4)


# -- the same answers as a model, over random operations ---------------------------------------

IDS = st.integers(1, 10)
TIMES = st.sampled_from([-1.0, 0.0, 1.0, 2.5, 2.5, 7.0]) | st.floats(-10, 10, allow_nan=False)
RECORDS = st.builds(
    JobRecord,
    id=IDS,
    command=st.sampled_from(["x", "y"]),
    state=st.sampled_from(list(JobState)),
    agent=st.sampled_from(["", "a", "b"]),
    created=TIMES,
    updated=TIMES,
    idempotency_key=st.sampled_from(["", "", "k1", "k2", "k3"]),
    attempts=st.integers(0, 3),
)
FILTERS = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(list(JobState)),
        "agent": st.sampled_from(["", "a", "b", "c"]),
        "command": st.sampled_from(["x", "y"]),
        "since": TIMES,
    },
)


def model_write(model: dict[int, JobRecord], records: list[JobRecord], delete: list[int]) -> bool:
    """Apply a write to the model; False (model unchanged) if a key would get a second holder."""
    new = dict(model)
    for rec in records:
        new[rec.id] = rec
        key = rec.idempotency_key
        if key and any(r.idempotency_key == key for i, r in new.items() if i != rec.id):
            return False
    for i in delete:
        new.pop(i, None)
    model.clear()
    model.update(new)
    return True


def test_matches_model(stores: Stores) -> None:
    # Given random writes, deletes and queries, Expect each store to answer like a plain dict
    names = itertools.count()

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store = stores.opened(f"m{next(names)}")
            self.model: dict[int, JobRecord] = {}
            self.top = 0

        @rule(records=st.lists(RECORDS, max_size=4), delete=st.lists(IDS, max_size=3))
        def write(self, records: list[JobRecord], delete: list[int]) -> None:
            if model_write(self.model, records, delete):
                self.store.write(records, delete)
                self.top = max([self.top] + [r.id for r in records])
            else:
                with pytest.raises(StorageError):
                    self.store.write(records, delete)

        @rule(filters=FILTERS, limit=st.integers(1, 4))
        def query(self, filters: dict[str, Any], limit: int) -> None:
            want = [
                i
                for i, r in sorted(self.model.items(), reverse=True)
                if all(getattr(r, f) == v for f, v in filters.items() if f != "since")
                and ("since" not in filters or r.created >= filters["since"])
            ]
            assert all_pages(self.store, limit=limit, **filters) == want

        @rule(before=TIMES, limit=st.integers(0, 5))
        def retention(self, before: float, limit: int) -> None:
            done = sorted((r.updated, i) for i, r in self.model.items() if r.terminal and r.updated < before)
            assert self.store.terminal_before(before, limit) == [i for _, i in done[:limit]]

        @invariant()
        def same_answers(self) -> None:
            for i in range(1, 11):
                assert self.store.get(i) == self.model.get(i)
            for key in ("k1", "k2", "k3"):
                holders = [i for i, r in self.model.items() if r.idempotency_key == key]
                assert self.store.find_key(key) == (holders[0] if holders else None)
            assert [r.id for r in self.store.unfinished()] == sorted(i for i, r in self.model.items() if not r.terminal)
            want_counts = dict.fromkeys(JobState, 0)
            for r in self.model.values():
                want_counts[r.state] += 1
            assert self.store.counts() == want_counts
            assert self.store.max_id() == self.top

        def teardown(self) -> None:
            self.store.close()

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=20,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# -- concurrency ------------------------------------------------------------------------------


def _consistent(rec: JobRecord) -> None:
    """Every field of a record written by the writer below derives from one version number."""
    v = rec.attempts
    assert rec.command == f"c{v}" and rec.agent == f"a{v % 3}" and rec.error == f"v{v}", rec
    assert rec.params == bytes([v % 256]) * 300 and rec.updated == float(v), rec


def _version(job_id: int, v: int, **fields: Any) -> JobRecord:
    return JobRecord(
        id=job_id,
        command=f"c{v}",
        agent=f"a{v % 3}",
        error=f"v{v}",
        attempts=v,
        params=bytes([v % 256]) * 300,
        updated=float(v),
        state=DONE if v % 2 else RUNNING,
        **fields,
    )


def _run_readers(
    store: JobStore, readers: int, read: Callable[[random.Random], None], writer: Callable[[], None]
) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stop.is_set():
                read(rnd)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(readers)]
    for t in threads:
        t.start()
    try:
        writer()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]


def test_reads_during_writes(store: JobStore) -> None:
    # Given a writer thread rewriting 20 jobs batch after batch
    n_jobs, versions = 20, 150
    store.write([_version(i, 0) for i in range(1, n_jobs + 1)])
    reads = itertools.count()

    def read(rnd: random.Random) -> None:
        rec = store.get(rnd.randint(1, n_jobs))
        assert rec is not None
        _consistent(rec)
        page, _ = store.query(limit=5, state=rnd.choice([DONE, RUNNING]))
        for r in page:
            _consistent(r)
        assert sum(store.counts().values()) == n_jobs
        next(reads)

    def writer() -> None:
        for v in range(1, versions):
            store.write([_version(i, v) for i in range(1, n_jobs + 1)])

    # When other threads read all the while, Expect no error and only whole records
    _run_readers(store, 3, read, writer)
    assert next(reads) > 0
    assert all(r.attempts == versions - 1 for r in store.query(limit=100)[0])


def test_lmdb_map_grows_under_readers(tmp_path: Path) -> None:
    # Given an LMDB store with a 64 KiB map and readers running, When a writer adds far more than that
    with LmdbStore(tmp_path / "g", "none", map_size=64 << 10) as store:
        store.write([_version(1, 0)])
        written = [1]

        def read(rnd: random.Random) -> None:
            rec = store.get(rnd.choice(written))
            assert rec is not None
            _consistent(rec)

        def writer() -> None:
            for batch in range(2, 400, 4):
                store.write([_version(i, i, result=b"r" * 2000) for i in range(batch, batch + 4)])
                written.extend(range(batch, batch + 4))

        _run_readers(store, 3, read, writer)
        # Expect the map grown and every record readable
        assert store._env.info()["map_size"] > 1 << 20
        for i in written:
            rec = store.get(i)
            assert rec is not None and rec.id == i


# -- LMDB: growth, full, damaged and foreign environments -------------------------------------


def test_lmdb_map_grows_by_itself(tmp_path: Path) -> None:
    # Given a 32 KiB initial map, When 5 MiB of records are written in batches, Expect every record back
    path = tmp_path / "grow"
    with LmdbStore(path, "none", map_size=32 << 10) as store:
        for start in range(1, 1001, 50):
            store.write([job(i, params=os.urandom(5000)[:8] * 625) for i in range(start, start + 50)])
        assert store.max_id() == 1000 and all_pages(store, limit=1000) == list(range(1000, 0, -1))
        assert all(len(r.params) == 5000 for r in store.query(limit=1000)[0])
    # Expect a reopen with the small initial size to read it all
    with LmdbStore(path, "none", map_size=32 << 10) as store:
        assert store.counts()[PENDING] == 1000


def test_lmdb_full_at_max_map_size(tmp_path: Path) -> None:
    # Given a map that may grow to 1 MiB only
    path = tmp_path / "full"
    with LmdbStore(path, "none", map_size=128 << 10, max_map_size=1 << 20) as store:
        store.write([job(1)])
        # When a batch needs more, Expect STORAGE_FULL with the path, and nothing of the batch written
        with pytest.raises(StorageError) as info:
            store.write([job(i, params=b"x" * 100_000) for i in range(2, 20)])
        assert info.value.code == ErrorCode.STORAGE_FULL and info.value.path == str(path)
        assert str(path) in str(info.value)
        assert store.max_id() == 1 and all_pages(store) == [1]
        store.write([job(2)])  # still writable


def test_lmdb_disk_full(tmp_path: Path) -> None:
    # Given a process that may not grow files past 1 MiB (RLIMIT_FSIZE: writes fail like a full disk)
    path = tmp_path / "disk"
    code = textwrap.dedent(
        f"""
        import json, resource, signal
        from orbitmesh.errors import StorageError
        from orbitmesh.storage import JobRecord, LmdbStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = LmdbStore({str(path)!r}, "sync")
        store.open()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        out = {{}}
        for i in range(1, 1000):
            try:
                store.write([JobRecord(id=i, command="x", params=b"p" * 20_000)])
            except StorageError as exc:
                out = {{"code": int(exc.code), "path": exc.path, "msg": str(exc), "i": i,
                        "failed_visible": store.get(i) is not None, "before": store.get(i - 1) is not None}}
                break
        store.close()
        print(json.dumps(out))
        """
    )
    # When a writer fills it, Expect STORAGE_FULL naming the path; earlier records kept, the failed one absent
    proc = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["code"] == ErrorCode.STORAGE_FULL, out
    assert out["path"] == str(path) and str(path) in out["msg"]
    assert out["i"] > 1 and out["before"] and not out["failed_visible"]


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _make_foreign_lmdb(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()


def _make_other_version_lmdb(path: Path) -> None:
    with LmdbStore(path, "none") as store:
        store.write([job(1)])
    env = lmdb.open(str(path), max_dbs=16)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"orbitmesh-joblog", (99).to_bytes(4, "big"))
    env.close()


def _make_truncated_lmdb(path: Path, keep: int) -> None:
    with LmdbStore(path, "none") as store:
        store.write([job(i, params=b"x" * 500) for i in range(1, 2000)])
    data = path / "data.mdb"
    data.write_bytes(data.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("case", "make", "code", "words"),
    [
        ("garbage", lambda p: (p.mkdir(), (p / "data.mdb").write_bytes(random.randbytes(64 << 10))), 511, "not"),
        ("garbage-truncated", lambda p: (p.mkdir(), (p / "data.mdb").write_bytes(b"\x13garbage")), 511, "not"),
        ("empty-data", lambda p: (p.mkdir(), (p / "data.mdb").write_bytes(b"")), 511, "empty"),
        ("truncated-head", lambda p: _make_truncated_lmdb(p, 10), 511, "not"),
        ("truncated-middle", lambda p: _make_truncated_lmdb(p, 40_000), 511, "truncated"),
        ("not-an-env", lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")), 511, "not an LMDB"),
        ("a-file", lambda p: p.write_text("x"), 511, "file"),
        ("foreign", _make_foreign_lmdb, 511, "foreign"),
        ("other-version", _make_other_version_lmdb, 513, "version 99"),
    ],
)
def test_lmdb_refuses_damaged_or_foreign(
    tmp_path: Path, case: str, make: Callable[[Path], Any], code: int, words: str
) -> None:
    # Given a directory that is not (this version's) job log
    path = tmp_path / case
    make(path)
    before = _tree(path) if path.is_dir() else {"": path.read_text()}
    # When opened, Expect StorageError with the right code, naming the path
    store = LmdbStore(path, "sync")
    with pytest.raises(StorageError) as info:
        store.open()
    assert info.value.code == code, info.value
    assert words in str(info.value) and str(path) in str(info.value) and info.value.path == str(path)
    # Expect every byte (and the file list: no lock file made) unchanged
    assert (_tree(path) if path.is_dir() else {"": path.read_text()}) == before
    store.close()


def test_lmdb_second_open_in_process(tmp_path: Path) -> None:
    # Given an open store, When another one opens the same directory, Expect STORAGE_ERROR, first unharmed
    with LmdbStore(tmp_path / "x", "none") as first:
        first.write([job(1)])
        with pytest.raises(StorageError, match="already open") as info:
            LmdbStore(tmp_path / "x", "none").open()
        assert info.value.code == ErrorCode.STORAGE_ERROR
        assert first.get(1) is not None


def test_lmdb_batch_flush_and_empty_env(tmp_path: Path) -> None:
    # Given an LMDB environment with no databases yet (created, never written), Expect it adopted
    lmdb.open(str(tmp_path / "e")).close()
    with LmdbStore(tmp_path / "e", "batch") as store:
        store.write([job(1)])
        store.flush()
    with LmdbStore(tmp_path / "e", "none") as store:
        assert store.get(1) is not None


# -- SQLite: damaged, foreign, full -----------------------------------------------------------


def _make_foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers VALUES (1, 'x')")
    conn.commit()
    conn.close()


def _make_other_version_sqlite(path: Path) -> None:
    with SqliteStore(path, "none") as store:
        store.write([job(1)])
    conn = sqlite3.connect(path)
    conn.execute("UPDATE orbitmesh_meta SET value = 99 WHERE key = 'orbitmesh-joblog'")
    conn.commit()
    conn.close()


def _make_truncated_sqlite(path: Path, keep: int) -> None:
    with SqliteStore(path, "none") as store:
        store.write([job(i, params=b"x" * 500) for i in range(1, 500)])
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("case", "make", "code", "words"),
    [
        ("garbage", lambda p: p.write_bytes(random.randbytes(64 << 10)), 511, "not an SQLite"),
        ("truncated-head", lambda p: _make_truncated_sqlite(p, 10), 511, "truncated"),
        ("truncated-middle", lambda p: _make_truncated_sqlite(p, 8192), 511, "truncated"),
        ("foreign", _make_foreign_sqlite, 511, "foreign"),
        ("other-version", _make_other_version_sqlite, 513, "version 99"),
    ],
)
def test_sqlite_refuses_damaged_or_foreign(
    tmp_path: Path, case: str, make: Callable[[Path], Any], code: int, words: str
) -> None:
    # Given a file that is not (this version's) job log
    path = tmp_path / f"{case}.db"
    make(path)
    before = _tree(tmp_path)
    # When opened, Expect StorageError with the right code, naming the path, and no byte changed
    store = SqliteStore(path, "sync")
    with pytest.raises(StorageError) as info:
        store.open()
    assert info.value.code == code, info.value
    assert words in str(info.value) and str(path) in str(info.value) and info.value.path == str(path)
    assert _tree(tmp_path) == before
    store.close()


def test_sqlite_full(tmp_path: Path) -> None:
    # Given a SQLite store that may not grow past its current pages (SQLITE_FULL, like a full disk)
    with SqliteStore(tmp_path / "f.db", "none") as store:
        store.write([job(1)])
        conn = store._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        # When a big batch is written, Expect STORAGE_FULL with the path and nothing of it kept
        with pytest.raises(StorageError) as info:
            store.write([job(i, params=b"x" * 50_000) for i in range(2, 10)])
        assert info.value.code == ErrorCode.STORAGE_FULL and info.value.path == str(tmp_path / "f.db")
        assert str(tmp_path / "f.db") in str(info.value)
        assert all_pages(store) == [1] and store.max_id() == 1


# -- Redis: server settings, reachability, foreign keys ---------------------------------------


@pytest.fixture
def redis_stores(redis_url: str, tmp_path: Path) -> Iterator[Stores]:
    stores = Stores("redis", tmp_path, redis_url)
    try:
        yield stores
    finally:
        stores.cleanup()


def test_redis_unreachable(tmp_path: Path) -> None:
    # Given a URL where nothing listens, When opened, Expect STORAGE_ERROR naming it, within seconds
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:secret@127.0.0.1:{port}/0"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        RedisStore(url, durability="none", socket_timeout=2).open()
    assert time.monotonic() - started < 10
    assert info.value.code == ErrorCode.STORAGE_ERROR and f"127.0.0.1:{port}" in str(info.value)
    assert "secret" not in str(info.value)


def test_redis_durability_follows_server(redis_stores: Stores) -> None:
    # Given the test server's persistence settings
    import redis

    client = redis.Redis.from_url(redis_stores.redis_url or REDIS_URL, decode_responses=True)
    try:
        saved = client.config_get("appendfsync")["appendfsync"]
        saved_aof = client.config_get("appendonly")["appendonly"]
        try:
            # When the server fsyncs every second only, Expect sync refused with a clear message
            client.config_set("appendonly", "yes")
            client.config_set("appendfsync", "everysec")
            with pytest.raises(StorageError, match="appendfsync always") as info:
                redis_stores.make("s", durability="sync").open()
            assert info.value.code == ErrorCode.STORAGE_ERROR
            # Expect batch accepted, and sync accepted when the caller vouches for the server
            redis_stores.opened("s", durability="batch").close()
            redis_stores.opened("s", durability="sync", trust_server_durability=True).close()
            # When the server fsyncs every write, Expect sync accepted
            client.config_set("appendfsync", "always")
            redis_stores.opened("s", durability="sync").close()
        finally:
            client.config_set("appendfsync", saved)
            client.config_set("appendonly", saved_aof)
    finally:
        client.close()


def test_redis_refuses_foreign_and_other_version(redis_stores: Stores) -> None:
    import redis

    client = redis.Redis.from_url(redis_stores.redis_url or REDIS_URL)
    try:
        # Given keys under the prefix without the job log marker, Expect STORAGE_CORRUPT, keys untouched
        foreign = redis_stores.make("f")
        prefix = redis_stores.location("f")
        client.set(prefix + "ids", "someone else's")
        with pytest.raises(StorageError, match="marker") as info:
            foreign.open()
        assert info.value.code == ErrorCode.STORAGE_CORRUPT
        assert client.get(prefix + "ids") == b"someone else's" and not client.exists(prefix + "meta")
        # Given a job log of another format version, Expect STORAGE_VERSION
        redis_stores.opened("v").close()
        client.hset(redis_stores.location("v") + "meta", "version", "99")
        with pytest.raises(StorageError, match="version 99") as info:
            redis_stores.make("v").open()
        assert info.value.code == ErrorCode.STORAGE_VERSION
    finally:
        client.close()


# -- open_store -------------------------------------------------------------------------------


def test_open_store_by_url(tmp_path: Path, redis_url: str) -> None:
    # Given a URL per store kind, Expect the matching store, opened, in the mode asked for
    cases: list[tuple[str, type[JobStore]]] = [
        (f"lmdb://{tmp_path}/a", LmdbStore),
        (str(tmp_path / "b"), LmdbStore),
        (f"sqlite://{tmp_path}/c.db", SqliteStore),
        ("memory://", MemoryStore),
    ]
    for url, kind in cases:
        store = open_store(url, durability="batch")
        try:
            assert type(store) is kind and store.durability == "batch"
            store.write([job(1)])
            assert store.get(1) is not None
        finally:
            store.close()
    assert (tmp_path / "a" / "data.mdb").exists() and (tmp_path / "c.db").exists()
    prefix = f"orbitmesh-test:{uuid.uuid4().hex}:"
    redis_store = open_store(f"{redis_url}?prefix={prefix}", durability="none")
    try:
        assert isinstance(redis_store, RedisStore) and redis_store.prefix == prefix
        assert redis_store.url == redis_url
    finally:
        redis_store.close()
        import redis

        client = redis.Redis.from_url(redis_url)
        client.delete(prefix + "meta")
        client.close()
    assert RedisStore().prefix == "orbitmesh:"
    # Expect ValueError for an unknown scheme or a missing path
    for bad in ("postgres://x/y", "lmdb://", "ftp://host"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_record_encoding_reads_every_field_by_name() -> None:
    """``to_bytes`` reads the fields from the instance dict by name: a record built by any path
    (init, copy, decode), with its attributes reassigned in any order or one deleted, encodes
    as reading each field as an attribute does, and decodes back to itself."""
    import operator

    import msgpack

    from orbitmesh.storage.base import JobRecord

    names = [f.name for f in dataclasses.fields(JobRecord)]
    by_name = operator.attrgetter(*names)
    now = time.time()
    rec = JobRecord(
        id=9,
        command="c",
        route=b"\x01\x00a",
        params=b"p",
        created=now,
        updated=now,
        transitions=[("PENDING", now, "")],
        non_retryable=("E",),
    )
    for variant in (rec, rec.copy(), JobRecord.from_bytes(rec.to_bytes())):
        assert variant.to_bytes() == msgpack.packb(list(by_name(variant)), use_bin_type=True)
    moved = rec.copy()
    del moved.agent  # the dict's order changes when it is set again
    moved.agent = "worker"
    del moved.error  # and a deleted field reads its class default, as an attribute would
    assert moved.to_bytes() == msgpack.packb(list(by_name(moved)), use_bin_type=True)
    back = JobRecord.from_bytes(moved.to_bytes())
    assert back.agent == "worker" and back.error == "" and back.id == 9 and back.non_retryable == ("E",)
