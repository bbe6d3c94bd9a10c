"""In-memory job store (tests, throwaway work).

MemoryStore is the reference for the semantics all stores follow (one conformance suite checks
them): ``write`` applies ``records`` in order, then ``delete``; an idempotency key may be held by
one live job at a time (a second holder fails the whole write); ids are 1 .. 2**63-1;
``unfinished`` is oldest (lowest id) first; ``terminal_before`` is ordered by ``updated`` then id.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..models import JobState
from .base import JobRecord, JobStore, check_durability
from .common import (
    check_id,
    check_query,
    duplicate_key,
    encode_record,
    matches,
    not_open,
    take_page,
)


class MemoryStore(JobStore):
    """Records in dicts, gone with the process; ``durability`` is accepted and ignored.

    Records are kept encoded, so a caller mutating a record it wrote or read never changes the
    store. Thread-safe (one lock).
    """

    def __init__(self, durability: str = "none") -> None:
        self.durability = check_durability(durability)
        self._lock = threading.Lock()
        self._open = False
        self._jobs: dict[int, bytes] = {}
        self._keys: dict[str, int] = {}  # idempotency key -> id
        self._max_id = 0

    def __repr__(self) -> str:
        return f"MemoryStore(durability={self.durability!r})"

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def _check_open(self) -> None:
        if not self._open:
            raise not_open(repr(self))

    def write(self, records: Sequence[JobRecord], delete: Sequence[int] = ()) -> None:
        deletes = [check_id(i) for i in delete]
        with self._lock:
            self._check_open()
            # Work on copies and swap them in at the end: a failure midway leaves nothing behind.
            jobs = dict(self._jobs)
            keys = dict(self._keys)
            max_id = self._max_id
            for rec in records:
                data = encode_record(rec)
                old = jobs.get(rec.id)
                if old is not None:
                    old_key = JobRecord.from_bytes(old).idempotency_key
                    if old_key and keys.get(old_key) == rec.id:
                        del keys[old_key]
                if rec.idempotency_key:
                    holder = keys.get(rec.idempotency_key)
                    if holder is not None and holder != rec.id:
                        raise duplicate_key(rec.idempotency_key, holder, rec.id)
                    keys[rec.idempotency_key] = rec.id
                jobs[rec.id] = data
                max_id = max(max_id, rec.id)
            for job_id in deletes:
                old = jobs.pop(job_id, None)
                if old is not None:
                    old_key = JobRecord.from_bytes(old).idempotency_key
                    if old_key and keys.get(old_key) == job_id:
                        del keys[old_key]
            self._jobs, self._keys, self._max_id = jobs, keys, max_id

    def get(self, job_id: int) -> JobRecord | None:
        with self._lock:
            self._check_open()
            data = self._jobs.get(job_id)
        return None if data is None else JobRecord.from_bytes(data)

    def find_key(self, key: str) -> int | None:
        with self._lock:
            self._check_open()
            return self._keys.get(key) if key else None

    def _records(self) -> list[JobRecord]:
        with self._lock:
            self._check_open()
            items = sorted(self._jobs.items())
        return [JobRecord.from_bytes(data) for _, data in items]

    def query(
        self,
        *,
        state: JobState | None = None,
        agent: str | None = None,
        command: str | None = None,
        since: float | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        check_query(limit, cursor)
        found = (
            rec
            for rec in reversed(self._records())
            if (cursor is None or rec.id < cursor) and matches(rec, state, agent, command, since)
        )
        return take_page(found, limit)

    def unfinished(self) -> list[JobRecord]:
        return [rec for rec in self._records() if not rec.terminal]

    def terminal_before(self, updated_before: float, limit: int) -> list[int]:
        done = sorted((rec.updated, rec.id) for rec in self._records() if rec.terminal and rec.updated < updated_before)
        return [job_id for _, job_id in done[: max(limit, 0)]]

    def counts(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for rec in self._records():
            counts[rec.state] += 1
        return counts

    def max_id(self) -> int:
        with self._lock:
            self._check_open()
            return self._max_id
