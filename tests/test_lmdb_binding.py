"""The job store's LMDB binding: the compiled one (the system's liblmdb) against its twin,
py-lmdb, on the calls the store makes; and the compiled one's queued writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orbitmesh._core import lmdbapi, load

IMPLS = ["c", "py"]


def _binding(impl: str) -> Any:
    try:
        return load("_lmdb", impl)
    except ImportError as exc:  # built without liblmdb's headers: the store runs on py-lmdb
        pytest.fail(f"the compiled LMDB binding is not built ({exc}); install liblmdb-dev and rebuild")


def _open(b: Any, path: Path) -> tuple[Any, Any, Any]:
    env = b.open(str(path), map_size=1 << 20, max_dbs=4)
    return env, env.open_db(b"jobs"), env.open_db(b"by_state", dupsort=True)


def _dump(env: Any, db: Any) -> list[tuple[bytes, bytes]]:
    with env.begin() as txn:
        return list(txn.cursor(db).iternext())


def test_the_default_binding_is_the_compiled_one() -> None:
    # Expect the store on liblmdb where it was built (as CI and the wheels build it)
    assert lmdbapi.BINDING.startswith("liblmdb ") and not lmdbapi.STAND_IN


@pytest.mark.parametrize("impl", IMPLS)
def test_the_twins_agree_on_what_the_store_writes_and_reads(impl: str, tmp_path: Path) -> None:
    b = _binding(impl)
    env, jobs, states = _open(b, tmp_path / "e")
    try:
        with env.begin(write=True) as txn:
            assert txn.put(b"k1", b"v1", db=jobs) and txn.put(b"k2", b"v2", db=jobs)
            assert not txn.put(b"k1", b"other", db=jobs, overwrite=False)
            cur = txn.cursor(states)
            assert cur.put(b"\x01", b"a") and cur.put(b"\x01", b"b") and cur.put(b"\x02", b"c")
        with env.begin(write=True) as txn:
            assert txn.get(b"k1", db=jobs) == b"v1" and txn.get(b"nope", db=jobs) is None
            assert txn.pop(b"k2", db=jobs) == b"v2" and txn.pop(b"k2", db=jobs) is None
            assert txn.delete(b"\x01", b"a", db=states) and not txn.delete(b"\x01", b"a", db=states)
        assert _dump(env, jobs) == [(b"k1", b"v1")]
        assert _dump(env, states) == [(b"\x01", b"b"), (b"\x02", b"c")]
        # A transaction that fails leaves nothing
        with pytest.raises(RuntimeError), env.begin(write=True) as txn:
            txn.put(b"k3", b"v3", db=jobs)
            raise RuntimeError("abort")
        assert _dump(env, jobs) == [(b"k1", b"v1")]
    finally:
        env.close()


def test_queued_writes_are_made_in_order_before_any_read_and_with_the_commit(tmp_path: Path) -> None:
    b = _binding("c")
    env, jobs, states = _open(b, tmp_path / "e")
    try:
        txn = env.begin(write=True)
        put_state = txn.later(states).put
        put_state(b"\x01", b"r1")
        txn.put_later(b"k1", b"v1", db=jobs)
        txn.delete_later(b"\x01", b"r1", db=states)  # after its put: gone
        put_state(b"\x02", b"r1")
        txn.delete_later(b"never", db=jobs)  # not there: no error
        assert txn.queued == 5
        # a read through the transaction sees them (they are made first)
        assert txn.get(b"k1", db=jobs) == b"v1" and txn.queued == 0
        txn.put_later(b"k2", b"v2", db=jobs)
        assert list(txn.cursor(jobs).iternext()) == [(b"k1", b"v1"), (b"k2", b"v2")]
        txn.put_later(b"k3", b"v3", db=jobs)
        txn.commit()
        assert _dump(env, jobs) == [(b"k1", b"v1"), (b"k2", b"v2"), (b"k3", b"v3")]
        assert _dump(env, states) == [(b"\x02", b"r1")]
        # An abort drops what was queued; a read-only transaction queues nothing
        txn = env.begin(write=True)
        txn.put_later(b"k4", b"v4", db=jobs)
        txn.abort()
        assert _dump(env, jobs)[-1] == (b"k3", b"v3")
        with env.begin() as ro, pytest.raises(b.ReadonlyError):
            ro.put_later(b"k5", b"v5", db=jobs)
        with pytest.raises(b.Error, match="ended"):
            txn.put_later(b"k6", b"v6", db=jobs)
        with pytest.raises(TypeError, match="bytes"):
            env.begin(write=True).put_later("text", b"v", db=jobs)
    finally:
        env.close()


def test_a_queued_write_that_fails_fails_the_commit_and_writes_nothing(tmp_path: Path) -> None:
    b = _binding("c")
    env, jobs, _ = _open(b, tmp_path / "e")
    try:
        txn = env.begin(write=True)
        txn.put_later(b"small", b"ok", db=jobs)
        for i in range(64):  # ~4 MiB into a 1 MiB map
            txn.put_later(b"big%d" % i, b"x" * 65536, db=jobs)
        with pytest.raises(b.MapFullError, match="mdb_put"):
            txn.commit()
        assert _dump(env, jobs) == []
        txn.abort()  # already ended: no error
        # and after growing the map, the same writes go through
        env.set_mapsize(16 << 20)
        with env.begin(write=True) as txn:
            for i in range(64):
                txn.put_later(b"big%d" % i, b"x" * 65536, db=jobs)
        assert len(_dump(env, jobs)) == 64
    finally:
        env.close()


def _store_dump(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every database of a job store's environment, read through py-lmdb."""
    from orbitmesh.storage import lmdb_store

    b = load("_lmdb", "py")
    env = b.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        names = [*lmdb_store._DB_FLAGS]
        out = {}
        for name in names:
            db = env.open_db(name, create=False, **lmdb_store._DB_FLAGS[name])
            out[name] = _dump(env, db)
        return out
    finally:
        env.close()


def test_the_compiled_record_loop_writes_what_the_stores_own_loop_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orbitmesh.models import JobState
    from orbitmesh.storage import LmdbStore
    from orbitmesh.storage.base import JobRecord
    from orbitmesh.storage.lmdb_store import _STATE_CODE

    def rec(job_id: int, state: JobState, **kw: Any) -> JobRecord:
        base = {"command": "square", "agent": "w1", "created": 1000.0 + job_id, "updated": 2000.0 + job_id}
        return JobRecord(id=job_id, state=state, **{**base, **kw})

    # Given the same writes through the compiled binding (its loop: queue_records) and py-lmdb
    # (the store's own), covering what the compiled loop takes and what it hands back
    batches: list[tuple[list[JobRecord], list[int]]] = [
        ([rec(i, JobState.PENDING) for i in range(1, 6)], []),  # new
        ([rec(1, JobState.DISPATCHED), rec(2, JobState.RUNNING, agent="w2"), rec(3, JobState.SUCCEEDED)], []),
        ([rec(4, JobState.PENDING, command="cube", created=5.5), rec(6, JobState.PENDING, idempotency_key="k6")], []),
        ([rec(6, JobState.FAILED, idempotency_key="k6"), rec(7, JobState.PENDING), rec(7, JobState.CANCELLED)], []),
        ([rec(3, JobState.SUCCEEDED, updated=9999.0), rec(2, JobState.SUCCEEDED, agent="w2")], [5]),  # stored, not live
        ([rec(8, JobState.PENDING, idempotency_key="k8"), rec(1, JobState.LOST, agent="")], [4, 99]),
    ]
    handed_back: list[int] = []
    own_loop = LmdbStore._apply_items

    def spy(self: LmdbStore, txn: Any, writers: Any, cache: Any, items: Any, top: int) -> int:
        handed_back.extend(item[0] for item in items)
        return own_loop(self, txn, writers, cache, items, top)

    monkeypatch.setattr(LmdbStore, "_apply_items", spy)
    dumps = []
    for impl in ("c", "py"):
        handed_back.clear()
        store = LmdbStore(tmp_path / impl, "sync", binding=load("_lmdb", impl))
        store.open()
        try:
            for records, deletes in batches:
                store.write_prepared([store.prepare(r) for r in records], deletes)
            # a record prepared from its parts, as the common-path job table hands them over
            r = rec(9, JobState.PENDING)
            item = store.prepare_encoded(9, r.state, "w1", "square", r.created, r.updated, r.to_bytes())
            store.write_prepared([item])
            with pytest.raises(ValueError):  # a hand-made item with a bad id: refused, nothing written
                store.write_prepared([(0, _STATE_CODE[JobState.PENDING], "w1", "square", 1.0, "", b"", b"x")])
            assert store.get(3).updated == 2003.0 + 7996.0 and store.find_key("k6") == 6 and store.get(5) is None
        finally:
            store.close()
        dumps.append(_store_dump(tmp_path / impl))
        if impl == "c":  # the compiled loop took all but the keyed, the stored-not-live and the bad
            assert handed_back == [6, 6, 3, 8, 0], handed_back
    # Expect every database, every index entry, byte for byte the same
    compiled, python = dumps
    assert compiled.keys() == python.keys()
    for name in compiled:
        assert compiled[name] == python[name], name
    assert len(compiled[b"jobs"]) == 7 and len(compiled[b"by_done"]) == 5
