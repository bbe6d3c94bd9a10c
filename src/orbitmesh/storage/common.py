"""Checks and helpers every job store shares (one set of rules, one conformance suite)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import StorageError
from ..models import JobState
from .base import JobRecord

MAX_ID = 2**63 - 1  # SQLite's signed 64-bit INTEGER bounds every store
UNFINISHED_STATES = tuple(s for s in JobState if not s.terminal)
_isnan = math.isnan


def check_id(job_id: int) -> int:
    """``job_id`` if it is a valid id, else ValueError."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_ID:
        raise ValueError(f"job id must be an int in 1..{MAX_ID}, not {job_id!r}")
    return job_id


def encode_record(rec: JobRecord) -> bytes:
    """Validate ``rec`` (id, times that compare) and encode it; raises before a store writes anything."""
    job_id = rec.id
    if job_id.__class__ is not int or not 0 < job_id <= MAX_ID:
        check_id(job_id)  # an int subclass may pass; anything else raises
    if _isnan(rec.created) or _isnan(rec.updated):
        raise ValueError(f"job {rec.id}: created / updated must not be NaN")
    return rec.to_bytes()


def check_query(limit: int, cursor: int | None) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, not {limit!r}")
    if cursor is not None and (isinstance(cursor, bool) or not isinstance(cursor, int)):
        raise ValueError(f"cursor must be an int or None, not {cursor!r}")


def matches(
    rec: JobRecord,
    state: JobState | None,
    agent: str | None,
    command: str | None,
    since: float | None,
) -> bool:
    return (
        (state is None or rec.state == state)
        and (agent is None or rec.agent == agent)
        and (command is None or rec.command == command)
        and (since is None or rec.created >= since)
    )


def take_page(candidates: Iterable[JobRecord], limit: int) -> tuple[list[JobRecord], int | None]:
    """The first ``limit`` of ``candidates`` (already filtered, highest id first) and the next cursor."""
    page: list[JobRecord] = []
    for rec in candidates:
        if len(page) == limit:
            return page, page[-1].id  # one more exists: there is a next page
        page.append(rec)
    return page, None


def duplicate_key(key: str, holder: int, job_id: int) -> StorageError:
    return StorageError(f"idempotency key {key!r} is held by job {holder}; job {job_id} cannot take it")


def not_open(what: str) -> StorageError:
    return StorageError(f"{what} is not open")
