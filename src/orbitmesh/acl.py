"""Authorization: what a key may do once the broker has admitted it.

Every accepted key has a :class:`Policy` (``peers/policy/`` in the key store):

* ``role`` ``"agent"`` registers as an agent and serves requests; it may not
  send requests unless ``may_request`` is set. ``"client"`` sends requests and
  queries. ``"admin"`` may do everything, unrestricted.
* ``commands``: glob patterns of the commands a key may request (raw messages
  count as the command ``"@raw"``); empty means any.
* ``agents``: selectors of the agents a key's requests may reach; empty means
  any. A selector is a name glob (``edge-*``), ``group=NAME``,
  ``capability=NAME`` or ``label.KEY=GLOB``; an agent is in reach if it matches
  any of them.

The broker enforces a policy in two places. The data plane (compiled) refuses
requests from sessions that may send none and checks nothing else, so keys
without patterns or selectors keep the fast path; a session whose key has
patterns or selectors sends its requests through the control plane, which
checks the command and narrows the route to the agents in reach.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from ._core._dataplane_py import ACL_CHECKED, ACL_NO_REQUESTS
from .models import AgentInfo

ROLES = ("agent", "client", "admin")
RAW_COMMAND = "@raw"

# ACL_NO_REQUESTS / ACL_CHECKED: the session flags the control plane hands the data plane in
# OP_REG: refuse every REQUEST / RAW (FORBIDDEN), or send them up for a policy check.
_SELECTOR_KINDS = ("group", "capability")


def _check_selector(sel: str) -> None:
    if not sel:
        raise ValueError("an agent selector may not be empty")
    if "=" not in sel:
        return  # a name glob
    what, _, value = sel.partition("=")
    if not value:
        raise ValueError(f"agent selector {sel!r} has no value")
    if what in _SELECTOR_KINDS:
        return
    if what.startswith("label.") and len(what) > len("label."):
        return
    raise ValueError(f"agent selector {sel!r}: use NAME-GLOB, group=G, capability=C or label.KEY=GLOB")


def selector_matches(sel: str, info: AgentInfo) -> bool:
    """True if agent ``info`` matches one selector (see the module docstring)."""
    if "=" not in sel:
        return fnmatch.fnmatchcase(info.name, sel)
    what, _, value = sel.partition("=")
    if what == "group":
        return any(fnmatch.fnmatchcase(g, value) for g in info.groups)
    if what == "capability":
        return any(fnmatch.fnmatchcase(c, value) for c in info.capabilities)
    if what.startswith("label."):
        have = info.labels.get(what[len("label.") :])
        return have is not None and fnmatch.fnmatchcase(have, value)
    return False


def in_reach(selectors: list[list[str]] | tuple[tuple[str, ...], ...], info: AgentInfo) -> bool:
    """``selectors`` is a list of selector lists: the agent must match one of each list."""
    return all(any(selector_matches(s, info) for s in group) for group in selectors)


@dataclass(frozen=True)
class Policy:
    """What one key may do; see the module docstring."""

    role: str = "agent"
    commands: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    may_request: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        for pattern in self.commands:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("command patterns must be non-empty strings")
        for sel in self.agents:
            if not isinstance(sel, str):
                raise ValueError("agent selectors must be strings")
            _check_selector(sel)
        if self.role == "admin" and (self.commands or self.agents):
            raise ValueError("an admin key is unrestricted: give it no command patterns or agent selectors")

    # ----------------------------------------------------------- encoding

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "commands": list(self.commands),
            "agents": list(self.agents),
            "may_request": self.may_request,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """Build from :meth:`to_dict`'s form; ValueError names what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("a policy is a JSON object")
        unknown = set(d) - {"role", "commands", "agents", "may_request"}
        if unknown:
            raise ValueError(f"unknown policy fields: {', '.join(sorted(unknown))}")
        commands, agents = d.get("commands", []), d.get("agents", [])
        if not isinstance(commands, list) or not isinstance(agents, list):
            raise ValueError("commands and agents must be lists")
        may_request = d.get("may_request", False)
        if not isinstance(may_request, bool):
            raise ValueError("may_request must be true or false")
        return cls(str(d.get("role", "agent")), tuple(commands), tuple(agents), may_request)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> Policy:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"policy is not JSON: {exc}") from exc

    def describe(self) -> str:
        """One line for ``keys list``."""
        parts = [self.role]
        if self.may_request:
            parts.append("may-request")
        if self.commands:
            parts.append("commands=" + ",".join(self.commands))
        if self.agents:
            parts.append("agents=" + ",".join(self.agents))
        return " ".join(parts)

    # ----------------------------------------------------------- decisions

    def hello_refusal(self, hello_role: str) -> str | None:
        """Why a session of this key may not register as ``hello_role``, or None if it may."""
        if self.role == "admin" or self.role == hello_role:
            return None
        if self.role == "agent" and hello_role == "client" and self.may_request:
            return None
        return f"a key with role {self.role!r} may not connect as {hello_role!r}"

    def may_send(self, hello_role: str) -> bool:
        """Whether a session registered as ``hello_role`` may send requests."""
        return self.role != "agent" or self.may_request

    @property
    def restricted(self) -> bool:
        """True if requests need a check beyond the role (patterns or selectors)."""
        return bool(self.commands or self.agents)

    def session_flags(self, hello_role: str) -> int:
        """The data plane's ACL_* flags for a session of this key."""
        if not self.may_send(hello_role):
            return ACL_NO_REQUESTS
        return ACL_CHECKED if self.restricted else 0

    def command_allowed(self, command: str) -> bool:
        return not self.commands or any(fnmatch.fnmatchcase(command, p) for p in self.commands)

    def agent_allowed(self, info: AgentInfo) -> bool:
        return not self.agents or any(selector_matches(s, info) for s in self.agents)

    def name_in_reach(self, name: str) -> bool:
        """True if a name glob alone admits ``name`` (for an agent that is not connected)."""
        return not self.agents or any("=" not in s and fnmatch.fnmatchcase(name, s) for s in self.agents)


ADMIN = Policy("admin")

__all__ = ["ACL_CHECKED", "ACL_NO_REQUESTS", "ADMIN", "Policy", "RAW_COMMAND", "ROLES", "in_reach", "selector_matches"]
