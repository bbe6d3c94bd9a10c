"""The job log's hand-off to its writer thread (``_core.handoff``), both twins: the queue's order,
limits, waits and refusals, under real threads; a batch's split; the live index's merge."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orbitmesh._core import load

IMPLS = ["c", "py"]


def _queue(impl: str) -> Any:
    return load("_handoff", impl).RecordQueue()


@pytest.mark.parametrize("impl", IMPLS)
def test_take_returns_what_was_put_oldest_first_up_to_most(impl: str) -> None:
    q = _queue(impl)
    assert q.take(10, 0) == [] and len(q) == 0
    for i in range(5):
        q.put((i, b"x", None))
    assert len(q) == 5
    assert q.take(2) == [(0, b"x", None), (1, b"x", None)]
    assert q.take(10, 0) == [(2, b"x", None), (3, b"x", None), (4, b"x", None)]
    assert len(q) == 0
    with pytest.raises(ValueError, match="most must be at least 1"):
        q.take(0)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_take_with_nothing_queued_waits_for_its_timeout_or_a_put(impl: str) -> None:
    q = _queue(impl)
    start = time.monotonic()
    assert q.take(10, 0.05) == []
    assert 0.04 <= time.monotonic() - start < 2.0
    got: list[Any] = []
    taker = threading.Thread(target=lambda: got.append(q.take(10)))  # no timeout: until a put
    taker.start()
    time.sleep(0.05)
    assert taker.is_alive() and got == []
    q.put("wake")
    taker.join(5)
    assert not taker.is_alive() and got == [["wake"]]
    for _ in range(50):  # a wait that timed out leaves the next one working
        assert q.take(10, 0.0005) == []
        q.put("next")
        assert q.take(10, 1) == ["next"]


@pytest.mark.parametrize("impl", IMPLS)
def test_a_queue_that_is_down_refuses_offers_but_takes_puts(impl: str) -> None:
    q = _queue(impl)
    assert q.offer("a") is True
    q.down = True
    assert q.offer("b") is False
    q.put("barrier")
    q.down = False
    assert q.offer("c") is True
    assert q.take(10) == ["a", "barrier", "c"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wait", [0.5, 0.0001])  # 0.1 ms: puts race the waits' timeouts
def test_many_threads_put_and_one_takes_every_item_once_in_each_threads_order(impl: str, wait: float) -> None:
    q = _queue(impl)
    producers, per = 4, 5_000
    taken: list[Any] = []

    def produce(p: int) -> None:
        for i in range(per):
            (q.offer if i % 2 else q.put)((p, i))
            if i % 500 == 0:
                time.sleep(0.001)  # and let the taker find it empty, and wait

    def consume() -> None:
        deadline = time.monotonic() + 30
        while len(taken) < producers * per and time.monotonic() < deadline:
            taken.extend(q.take(256, wait))

    consumer = threading.Thread(target=consume)
    consumer.start()
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    consumer.join(35)
    assert not consumer.is_alive()
    assert len(taken) == producers * per
    for p in range(producers):
        assert [i for who, i in taken if who == p] == list(range(per))


def _done(tag: str) -> Any:
    def done(err: BaseException | None) -> None:
        pass

    done.__name__ = tag
    return done


items = st.tuples(
    st.integers(0, 5),
    st.one_of(st.none(), st.binary(max_size=3)),
    st.one_of(st.none(), st.sampled_from(["a", "b", "c"])),
)


@given(st.lists(items, max_size=30))
def test_split_batch_twins_agree_with_what_a_batch_means(raw: list[tuple[int, Any, Any]]) -> None:
    """Each job's latest snapshot, in the order the jobs first appear; a delete (a job id with no
    snapshot) drops what came before it; a barrier (id 0, no snapshot) writes nothing; every
    callback in order."""
    callbacks = {tag: _done(tag) for tag in "abc"}
    batch = [(job, snap, callbacks[cb] if cb else None) for job, snap, cb in raw]
    expect_latest: dict[int, Any] = {}
    expect_deletes = []
    for job, snap, _ in batch:
        if snap is not None:
            expect_latest[job] = snap
        elif job:
            expect_latest.pop(job, None)
            expect_deletes.append(job)
    expect = (list(expect_latest.values()), expect_deletes, [cb for _, _, cb in batch if cb is not None])
    for impl in IMPLS:
        assert load("_handoff", impl).split_batch(batch) == expect


@pytest.mark.parametrize("impl", IMPLS)
def test_split_batch_refuses_an_item_that_is_not_a_triple(impl: str) -> None:
    with pytest.raises((TypeError, ValueError)):
        load("_handoff", impl).split_batch([(1, b"x")])


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_sets_values_and_removes_keys_whose_update_is_none(impl: str) -> None:
    live = {1: "a", 2: "b", 3: "c"}
    load("_handoff", impl).merge(live, {2: None, 4: "d", 1: "A", 9: None})
    assert live == {1: "A", 3: "c", 4: "d"}


@pytest.mark.parametrize("impl", IMPLS)
def test_run_callbacks_calls_each_in_order_and_logs_one_that_raises(
    impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[Any] = []
    error = OSError("disk gone")

    def broken(err: BaseException | None) -> None:
        heard.append(("broken", err))
        raise RuntimeError("a bug in a callback")

    callbacks = [lambda err: heard.append(("first", err)), broken, lambda err: heard.append(("last", err))]
    with caplog.at_level("ERROR", logger="orbitmesh.joblog"):
        load("_handoff", impl).run_callbacks(callbacks, error)
    assert heard == [("first", error), ("broken", error), ("last", error)]
    assert "job log callback failed" in caplog.text and "a bug in a callback" in caplog.text
