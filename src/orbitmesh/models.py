"""Plain data the API hands back: agents, jobs, events."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class AgentInfo:
    """A registered agent as the broker sees it."""

    name: str
    capabilities: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    commands: tuple[str, ...] = ()
    capacity: int = 0
    inflight: int = 0  # requests the broker has out with it
    state: str = "alive"  # alive | suspect | draining
    session: int = 0
    running: int = 0  # what the agent last reported running (its heartbeat's load): its own count,
    # which also holds work the broker does not track, e.g. jobs it kept on across a broker restart

    @property
    def load(self) -> float:
        """In-flight requests as a fraction of capacity."""
        return self.inflight / self.capacity if self.capacity else 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AgentInfo:
        return cls(
            name=d["name"],
            capabilities=tuple(d.get("capabilities", ())),
            groups=tuple(d.get("groups", ())),
            labels=dict(d.get("labels", {})),
            commands=tuple(d.get("commands", ())),
            capacity=int(d.get("capacity", 0)),
            inflight=int(d.get("inflight", 0)),
            state=str(d.get("state", "alive")),
            session=int(d.get("session", 0)),
            running=int(d.get("running", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capabilities": list(self.capabilities),
            "groups": list(self.groups),
            "labels": dict(self.labels),
            "commands": list(self.commands),
            "capacity": self.capacity,
            "inflight": self.inflight,
            "state": self.state,
            "session": self.session,
            "running": self.running,
        }


class JobState(str, Enum):
    """Lifecycle of a tracked job."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    LOST = "LOST"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset((JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT, JobState.LOST))


@dataclass(frozen=True)
class JobInfo:
    """A tracked job's record as the broker keeps it (``result`` is still encoded)."""

    id: int
    command: str
    state: JobState
    agent: str = ""
    created: float = 0.0
    updated: float = 0.0
    error_code: int = 0
    error: str = ""
    result: bytes | None = None
    serializer: int = 0
    attempts: int = 0
    max_attempts: int = 1
    idempotency_key: str = ""
    error_type: str = ""
    transitions: tuple[tuple[str, float, str], ...] = ()  # (state, unix time, note)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobInfo:
        return cls(
            id=int(d["id"]),
            command=str(d["command"]),
            state=JobState(d["state"]),
            agent=str(d.get("agent", "")),
            created=float(d.get("created", 0.0)),
            updated=float(d.get("updated", 0.0)),
            error_code=int(d.get("error_code", 0)),
            error=str(d.get("error", "")),
            result=d.get("result"),
            serializer=int(d.get("serializer", 0)),
            attempts=int(d.get("attempts", 0)),
            max_attempts=int(d.get("max_attempts", 1)),
            idempotency_key=str(d.get("idempotency_key", "")),
            error_type=str(d.get("error_type", "")),
            transitions=tuple((str(s), float(t), str(n)) for s, t, n in d.get("transitions", ())),
        )


@dataclass(frozen=True)
class Event:
    """Something that happened at the broker: ``type`` is e.g. "agent_joined", "agent_lost", "job"."""

    type: str
    data: dict[str, Any]
    time: float


__all__ = ["AgentInfo", "Event", "JobInfo", "JobState"]
