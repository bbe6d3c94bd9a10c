"""The job store interface every storage plugin implements, and the record it stores.

A store is used from one writer thread for writes (``write`` is one atomic
transaction: records and every secondary index together) and may be read from
other threads. Durability modes:

* ``sync``  — ``write`` returns only once the transaction is on disk (fsync).
* ``batch`` — ``write`` returns once committed in memory / the OS; ``flush``
  (called every few ms by the broker) makes it durable. A process crash loses
  nothing; an OS crash may lose the last few ms.
* ``none``  — no durability effort at all (tests, throwaway work).
"""

from __future__ import annotations

import dataclasses
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .._core.record import FieldPacker
from ..errors import ErrorCode, StorageError
from ..models import JobState

DURABILITY_MODES = ("sync", "batch", "none")
FORMAT_VERSION = 1


@dataclass
class JobRecord:
    """One tracked job, as the job log keeps it."""

    id: int
    command: str
    route: bytes = b""  # the request's route frame (target or selector), as sent
    params: bytes = b""  # the request's payload bytes, as sent
    flags: int = 0  # the request's header flags (serializer bits)
    state: JobState = JobState.PENDING
    attempts: int = 0  # deliveries so far
    max_attempts: int = 1
    created: float = 0.0  # unix seconds
    updated: float = 0.0
    run_at: float = 0.0  # not before this time (delayed start, retry backoff); 0 = now
    timeout: float = 0.0  # per attempt, seconds; 0 = none
    agent: str = ""  # agent of the current / last delivery
    session: int = 0  # that agent's session epoch
    lease: int = 0  # token of the current delivery; a late answer from an older one is ignored
    lease_expires: float = 0.0  # unix seconds; 0 = no lease
    idempotency_key: str = ""
    retry_initial: float = 0.5  # backoff: initial delay, seconds
    retry_max: float = 30.0  # backoff: cap, seconds
    non_retryable: tuple[str, ...] = ()  # remote error types never retried
    result: bytes | None = None  # the reply payload, as the agent sent it
    result_flags: int = 0  # its header flags (serializer bits)
    error_code: int = 0
    error: str = ""
    error_type: str = ""
    transitions: list[tuple[str, float, str]] = field(default_factory=list)  # (state, time, agent)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def to_bytes(self) -> bytes:
        """Compact encoding (msgpack array in field order; the store's format version covers it).
        ``state`` packs as its string value (JobState is a str enum) and the ``non_retryable``
        tuple as an array, as ``from_bytes`` reads them. The compiled core packs the values of
        the instance dict, in field order, in one call (``_core.record.FieldPacker``: the bytes
        msgpack would make, at half its cost); a field missing from the dict is read as an
        attribute (its class default, if any)."""
        data = _PACK_FIELDS(self.__dict__)
        return _PACK(_GET_ALL(self)) if data is None else data

    def copy(self) -> JobRecord:
        """A snapshot: a shallow copy with its own transitions list (the rest is immutable)."""
        clone = object.__new__(JobRecord)
        clone.__dict__ = self.__dict__.copy()
        clone.transitions = self.transitions.copy()
        return clone

    @classmethod
    def from_bytes(cls, data: bytes) -> JobRecord:
        """Decode ``to_bytes`` output; raises StorageError(STORAGE_CORRUPT) on anything else."""
        try:
            values = msgpack.unpackb(data, raw=False, use_list=True)
            if not isinstance(values, list) or len(values) != len(_FIELDS):
                raise ValueError(f"expected {len(_FIELDS)} fields")
            values[_STATE_INDEX] = JobState(values[_STATE_INDEX])
            values[_NON_RETRYABLE_INDEX] = tuple(values[_NON_RETRYABLE_INDEX])
            values[_TRANSITIONS_INDEX] = [tuple(t) for t in values[_TRANSITIONS_INDEX]]
            return cls(*values)
        except Exception as exc:
            raise StorageError(f"undecodable job record: {exc}", code=ErrorCode.STORAGE_CORRUPT) from exc


_FIELDS = dataclasses.fields(JobRecord)
_GET_ALL = operator.attrgetter(*(f.name for f in _FIELDS))
_PACK = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_NAMES = [f.name for f in _FIELDS]
_PACK_FIELDS = FieldPacker(_NAMES).pack
_STATE_INDEX = _NAMES.index("state")
_NON_RETRYABLE_INDEX = _NAMES.index("non_retryable")
_TRANSITIONS_INDEX = _NAMES.index("transitions")


class JobStore(ABC):
    """Where tracked jobs live. Implementations: LMDB (default), SQLite, Redis, memory.

    All methods raise :class:`StorageError` with a STORAGE_* code on failure;
    none loses or half-writes a record.
    """

    durability: str = "sync"

    @abstractmethod
    def open(self) -> None:
        """Open (creating if absent); raises StorageError(STORAGE_CORRUPT / STORAGE_VERSION)
        for a damaged or foreign store, and never overwrites one."""

    @abstractmethod
    def close(self) -> None:
        """Flush and close; idempotent."""

    @abstractmethod
    def write(self, records: Sequence[JobRecord], delete: Sequence[int] = ()) -> None:
        """Insert or replace ``records`` and delete ``delete`` ids, with every index, atomically."""

    @abstractmethod
    def get(self, job_id: int) -> JobRecord | None:
        """One record by id."""

    @abstractmethod
    def find_key(self, key: str) -> int | None:
        """The id of the job holding idempotency ``key``, if any."""

    @abstractmethod
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
        """Records matching every filter given, newest (highest id) first, at most ``limit``;
        ``since``: created at or after; ``cursor``: only ids below it. Returns the page and
        the cursor for the next page (None at the end)."""

    @abstractmethod
    def unfinished(self) -> list[JobRecord]:
        """Every non-terminal record, oldest first (recovery after a restart)."""

    @abstractmethod
    def terminal_before(self, updated_before: float, limit: int) -> list[int]:
        """Ids of terminal records last updated before the time, oldest first (retention)."""

    @abstractmethod
    def counts(self) -> dict[JobState, int]:
        """How many records are in each state."""

    @abstractmethod
    def max_id(self) -> int:
        """The highest id ever stored (0 if none): ids are never reused."""

    def prepare(self, record: JobRecord) -> Any:
        """A snapshot of ``record`` for ``write_prepared``, taken when the record is handed to
        the job log (later changes to the record do not reach it). Default: a copy."""
        return record.copy()

    def prepare_encoded(
        self, job_id: int, state: JobState, agent: str, command: str, created: float, updated: float, data: bytes
    ) -> Any:
        """``prepare`` for a record given as its encoding (``data``: ``JobRecord.to_bytes``'s bytes)
        and the fields its indexes read, with no idempotency key: how the common-path job table
        hands its records over, built without a ``JobRecord``. Default: decoded, then ``prepare``."""
        return self.prepare(JobRecord.from_bytes(data))

    def write_prepared(self, items: Sequence[Any], delete: Sequence[int] = ()) -> None:
        """``write`` for ``prepare`` output (the job log's writer calls this)."""
        self.write(items, delete)

    def flush(self) -> None:  # noqa: B027 - optional: only batch-mode stores need it
        """Make everything written durable now (``batch`` mode); a no-op elsewhere."""

    def __enter__(self) -> JobStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_durability(mode: str) -> str:
    if mode not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {mode!r}")
    return mode
