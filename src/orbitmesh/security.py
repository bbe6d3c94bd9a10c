"""CURVE encryption and key-based admission (ZAP) for the broker.

A broker with security has a keypair and a key store: a directory of peers'
public keys by state (``accepted/``, ``pending/``, ``rejected/``,
``revoked/``). A peer connects with its own keypair and the broker's public
key; libzmq's CURVE handshake asks the broker's ZAP handler, which admits only
accepted keys. An unknown key is refused and recorded as pending, for an
operator to accept (``orbitmesh keys accept``); the store is read at every
handshake, so accepting or revoking needs no broker restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .acl import Policy
from .errors import ErrorCode, OrbitMeshError

log = logging.getLogger("orbitmesh.security")

ZAP_DOMAIN = "orbitmesh"
STATES = ("accepted", "pending", "rejected", "revoked")
DEFAULT_POLICY = Policy("agent")


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, both halves Z85-encoded (40 bytes); ``secret`` may be empty."""

    public: bytes
    secret: bytes = b""

    @classmethod
    def generate(cls) -> Keypair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keypair:
        """Read a key file written by :meth:`save` (or pyzmq's certificate files)."""
        try:
            public, secret = zmq.auth.load_certificate(os.fspath(path))
        except (OSError, ValueError) as exc:
            raise OrbitMeshError(f"cannot read key file {path}: {exc}", code=ErrorCode.BAD_HELLO) from exc
        return cls(public, secret or b"")

    def save(self, directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
        """Write ``name.key`` (public) and ``name.key_secret`` (mode 0600) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
        public_file.write_text(_cert(self.public, None))
        if self.secret:
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_cert(self.public, self.secret))
        return public_file, secret_file


def _cert(public: bytes, secret: bytes | None) -> str:
    lines = ["metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def key_id(public: bytes) -> str:
    """A file-name-safe id for a Z85 public key: its 32 bytes in hex."""
    return z85.decode(public).hex()


class KeyStore:
    """Peers' public keys by state, one file each under ``root/<state>/<key id>``, and each
    key's :class:`~orbitmesh.acl.Policy` under ``root/policy/<key id>`` (JSON).

    Reads for admission go through :meth:`snapshot`, which lists the directories only when
    one of them changed (so the broker's per-heartbeat sweep costs a few ``stat`` calls, not
    one per session). A key with no policy file has the least privilege that still runs a
    fleet: role ``agent``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for state in (*STATES, "policy"):
            (self.root / state).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sig: tuple[int, ...] = ()
        self._trusted = False
        self._snap: _Snapshot = _Snapshot({}, {})

    def state(self, public: bytes) -> str | None:
        """The state of a key, or None if it was never seen (read from disk now)."""
        kid = key_id(public)
        for state in STATES:
            if (self.root / state / kid).exists():
                return state
        return None

    def policy(self, public: bytes) -> Policy:
        """A key's policy (read from disk now)."""
        return self._read_policy(self.root / "policy" / key_id(public))

    @staticmethod
    def _read_policy(path: Path) -> Policy:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return DEFAULT_POLICY
        try:
            return Policy.loads(text)
        except ValueError as exc:
            # A damaged policy grants nothing beyond the default; say so loudly.
            log.error("policy file %s is invalid (%s): using role agent", path, exc)
            return DEFAULT_POLICY

    def _signature(self) -> tuple[int, ...]:
        return tuple(os.stat(self.root / d).st_mtime_ns for d in (*STATES, "policy"))

    def snapshot(self) -> _Snapshot:
        """States and policies of every key, re-read only when a directory changed.

        A directory changed less than a second ago may change again within the file
        system's timestamp granularity without its mtime moving (the "racy" case, as in
        git's index), so such a signature is not trusted: the store is read again next time.
        """
        now = time.time()
        sig = self._signature()
        with self._lock:
            if sig == self._sig and self._trusted:
                return self._snap
            states: dict[str, str] = {}
            for state in STATES:
                for p in (self.root / state).iterdir():
                    states[p.name] = state
            policies = {p.name: self._read_policy(p) for p in (self.root / "policy").iterdir() if "." not in p.name}
            self._snap = _Snapshot(states, policies)
            self._sig = sig
            self._trusted = now - max(sig) / 1e9 > 1.0
            return self._snap

    def _set(self, public: bytes, state: str, note: str = "") -> None:
        kid = key_id(public)
        for other in STATES:
            (self.root / other / kid).unlink(missing_ok=True)
        (self.root / state / kid).write_text(f"{public.decode()}\n{time.time():.3f} {note}\n")

    def set_policy(self, key: str | bytes, policy: Policy) -> None:
        """Write a key's policy (atomically: a reader sees the old or the new one)."""
        kid = key_id(self._find(key) if isinstance(key, str) else key)
        final = self.root / "policy" / kid
        tmp = self.root / "policy" / f"{kid}.tmp"
        tmp.write_text(policy.dumps() + "\n")
        os.replace(tmp, final)

    def _find(self, key: str) -> bytes:
        """A key by its Z85 text, its hex id, or a unique prefix of the id."""
        if len(key) == 40:
            return key.encode()
        matches = [p for s in STATES for p in (self.root / s).iterdir() if p.name.startswith(key)]
        if len(matches) != 1:
            raise OrbitMeshError(f"{len(matches)} keys match {key!r}", code=ErrorCode.BAD_QUERY)
        return matches[0].read_text().split("\n", 1)[0].encode()

    def accept(self, key: str | bytes, policy: Policy | None = None) -> None:
        """Accept a key with ``policy`` (default: role agent); the policy is written first."""
        public = self._find(key) if isinstance(key, str) else key
        self.set_policy(public, policy or DEFAULT_POLICY)
        self._set(public, "accepted", "accepted")

    def reject(self, key: str | bytes) -> None:
        self._set(self._find(key) if isinstance(key, str) else key, "rejected", "rejected")

    def revoke(self, key: str | bytes) -> None:
        self._set(self._find(key) if isinstance(key, str) else key, "revoked", "revoked")

    def bind_name(self, name: str, public: bytes) -> bytes | None:
        """Bind an agent name to a key on first use; returns the key it is bound to if that
        is another one (the caller refuses), else None."""
        names = self.root / "names"
        names.mkdir(exist_ok=True)
        path = names / name.encode().hex()
        try:
            bound = path.read_text().strip().encode()
        except FileNotFoundError:
            path.write_text(public.decode() + "\n")
            return None
        return None if bound == public else bound

    max_pending = 1000  # unknown keys recorded at most: fresh keypairs cost an attacker nothing

    def note_pending(self, public: bytes, note: str) -> bool:
        """Record an unknown key that tried to connect (never demotes a known one); False if
        the pending list is full (the key is refused all the same, just not recorded)."""
        if self.state(public) is not None:
            return True
        if sum(1 for _ in (self.root / "pending").iterdir()) >= self.max_pending:
            return False
        self._set(public, "pending", note)
        return True

    def list(self) -> dict[str, list[tuple[str, str, str]]]:
        """Per state: (key id, Z85 public key, note) for every key."""
        out: dict[str, list[tuple[str, str, str]]] = {}
        for state in STATES:
            rows = []
            for p in sorted((self.root / state).iterdir()):
                public, _, note = p.read_text().partition("\n")
                rows.append((p.name, public, note.strip()))
            out[state] = rows
        return out


@dataclass(frozen=True)
class _Snapshot:
    """The key store as of one read: state and policy by key id."""

    states: dict[str, str]
    policies: dict[str, Policy]

    def state(self, public: bytes) -> str | None:
        return self.states.get(key_id(public))

    def policy(self, public: bytes) -> Policy:
        return self.policies.get(key_id(public), DEFAULT_POLICY)


class CurveAdmission:
    """The broker side: its keypair, the key store, and the ZAP handler that consults it."""

    def __init__(self, keys_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(keys_dir)
        secret = self.dir / "broker.key_secret"
        if secret.exists():
            self.keys = Keypair.load(secret)
        else:
            self.keys = Keypair.generate()
            self.keys.save(self.dir, "broker")
            log.info("generated the broker keypair in %s", self.dir)
        self.store = KeyStore(self.dir / "peers")
        self._auth: ThreadAuthenticator | None = None
        self.refused = 0
        self._logged_at = -1.0

    def start(self, context: zmq.Context[Any]) -> None:
        """Start the ZAP handler on ``context`` (the broker's)."""
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("orbitmesh.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` (the ROUTER) a CURVE server in our ZAP domain."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())

    def callback(self, domain: str, public: bytes) -> bool:
        """ZAP: admit accepted keys only; remember unknown ones as pending."""
        try:
            state = self.store.snapshot().state(public)
            if state == "accepted":
                return True
            self.refused += 1
            recorded = state is not None or self.store.note_pending(public, "first seen")
            now = time.monotonic()
            if now - self._logged_at >= 1.0:  # a flood of refusals is one line a second, not one each
                self._logged_at = now
                what = state or ("unknown, now pending" if recorded else "unknown; pending keys full, not recorded")
                log.warning("refused CURVE key %s (%s); %d refused so far", key_id(public)[:16], what, self.refused)
        except OSError as exc:  # a key store we cannot read admits no one
            log.error("key store unreadable: %s", exc)
        return False


@dataclass(frozen=True)
class PeerKeys:
    """What an agent or client needs to reach a secured broker."""

    keys: Keypair
    server_public: bytes

    def socket_options(self) -> dict[int, Any]:
        return {
            zmq.CURVE_SERVERKEY: self.server_public,
            zmq.CURVE_PUBLICKEY: self.keys.public,
            zmq.CURVE_SECRETKEY: self.keys.secret,
        }


def is_loopback(endpoint: str) -> bool:
    """True for inproc/ipc endpoints and tcp on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("inproc", "ipc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["CurveAdmission", "KeyStore", "Keypair", "PeerKeys", "ZAP_DOMAIN", "is_loopback", "key_id"]
