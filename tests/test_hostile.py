"""Hostile peers against a CURVE broker in its own process, over tcp on 127.0.0.1, for a bounded
time, while a well-behaved client keeps invoking an agent.

The broker runs in a subprocess (tests/hostile_proc.py) so that its memory can be read from
/proc/<pid>/status. Hostile peers, each on its own thread until the soak deadline:

* garbage: a DEALER with an accepted key that never says HELLO sends random messages (random
  bytes, headers with a wrong magic / version / kind / reserved field, too many frames, frames
  over max_frame_bytes, REQUESTs before HELLO, malformed HELLO bodies); each batch must be
  answered one ERROR per message, with the code and corr docs/protocol.md prescribes;
* rogue: a registered (protocol 2) client sending random messages with valid headers, half of
  them in packed framing (and an impersonating HELLO as the good agent's name); every ERROR it
  gets must carry a known code;
* replay: a registered client re-sending the exact same REQUEST frames many times;
* bad keys: unknown, rejected and revoked keys, a wrong server key and plaintext: no answer ever;
* raw tcp: truncated ZMTP greetings, random bytes, stalled half-handshakes;
* oversized: frames over max_frame_bytes (FRAME_TOO_LARGE) and over ZMQ_MAXMSGSIZE (libzmq
  drops the connection; the broker never buffers the message).

Afterwards: the broker is alive and answers, its RSS stayed under a stated bound, the good client
had no failure (and made a minimum number of calls), and the broker's counters saw the abuse.

``ORBITMESH_SOAK_SECONDS`` sets the soak time (default 20 s); ``ORBITMESH_SOAK_CORES=c,py`` runs it
on the pure-Python data plane too (default: the compiled one only, to keep the suite short).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

import orbitmesh as om
from orbitmesh import ErrorCode
from orbitmesh._core._frame_py import is_packed, pack_parts, unpack_parts
from orbitmesh.acl import Policy
from orbitmesh.security import Keypair, KeyStore, PeerKeys

from .conftest import subprocess_env
from .mesh import HDR, expected_refusal, hdr

ROOT = Path(__file__).resolve().parent.parent
SOAK = float(os.environ.get("ORBITMESH_SOAK_SECONDS", "20"))
MAX_FRAME = 1 << 20  # the broker's max_frame_bytes; its ZMQ_MAXMSGSIZE is MAX_FRAME + 1024
MAXMSGSIZE = MAX_FRAME + 1024
# The bound on the broker's RSS (VmRSS sampled, and the peak VmHWM): its RSS once the mesh is up
# and warm, plus this. Measured (20 s soak, either core): baseline ~36 MiB, peak VmHWM ~41 MiB,
# so the soak adds ~5 MiB (the test prints its numbers with -s). 32 MiB is ~6x that, and below
# the 64 MiB message the oversized peer sends: a broker that buffered one would fail.
RSS_HEADROOM_MIB = 32
MIN_GOOD_CALLS = 200

HELLO, WELCOME, HEARTBEAT, REQUEST, REPLY, ERROR = 1, 2, 3, 4, 7, 10
ECHO_ROUTE = b"\x01\x00agent-0"  # Route.NAME, least-loaded, "agent-0"
KNOWN_CODES = {int(c) for c in ErrorCode}

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status"),
    pytest.mark.timeout(SOAK + 150),
]


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


# ---------------------------------------------------------------- processes


class Proc:
    """A helper process from tests/hostile_proc.py; ``ready`` is its first line's words."""

    def __init__(self, *args: str, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "hostile_proc.py"), *args, "--lifetime", str(SOAK + 120)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(b"ready "):
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""  # type: ignore[union-attr]
            raise AssertionError(f"{args[0]} did not start: {line!r} {err[-2000:]}")
        self.ready = line[0].decode().split()

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


# ------------------------------------------------------------------ peers


@dataclass
class Tally:
    """What one hostile peer did and saw; ``problems`` fails the test."""

    name: str
    sent: int = 0
    answered: int = 0
    malformed: int = 0  # messages the data plane must count as malformed
    codes: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)

    def error_code(self, frames: list[bytes]) -> int | None:
        """Record an ERROR's code (None if ``frames`` is not an ERROR); a code must be known."""
        if len(frames[0]) != 40 or frames[0][3] != ERROR:
            return None
        code = HDR.unpack(frames[0])[4]
        self.codes[code] += 1
        if code not in KNOWN_CODES:
            self.problems.append(f"{self.name}: ERROR with unknown code {code}")
        if len(frames) < 3 or not frames[2]:
            self.problems.append(f"{self.name}: ERROR {code} without a message")
        return int(code)


class Peer:
    """A DEALER with CURVE keys (or none), speaking the wire protocol by hand."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, keys: PeerKeys | None, reconnect_ms: int = 20) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ms)
        if keys is not None:
            for opt, value in keys.socket_options().items():
                self.sock.setsockopt(opt, value)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames, copy=len(frames) > 1 or len(frames[0]) < 65536)

    def recv(self, timeout: float) -> list[bytes] | None:
        """The next message that is not a HEARTBEAT, or None after ``timeout`` s."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if not self.sock.poll(max(0, int(left * 1000))):
                return None
            frames = self.sock.recv_multipart()
            if is_packed(frames[0]):
                frames = unpack_parts(frames)  # what a protocol-2 session gets (see hello)
            if len(frames[0]) == 40 and frames[0][3] == HEARTBEAT:
                continue
            return frames

    def hello(self, tally: Tally, name: str = "hostile", timeout: float = 10.0, protocol: int = 1) -> bool:
        body = {"role": "client", "name": name, "protocol": protocol}
        self.send([hdr(HELLO, aux=1, corr=1), b"", msgpack.packb(body)])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            frames = self.recv(end - time.monotonic())
            if frames is None:
                break
            if len(frames[0]) == 40 and frames[0][3] == WELCOME:
                return True
            tally.error_code(frames)
        tally.problems.append(f"{tally.name}: no WELCOME for a well-formed HELLO")
        return False


BAD_HELLO_BODIES = [
    b"\xc1",
    b"",
    msgpack.packb([1, 2]),
    msgpack.packb({"role": "admin"}),
    msgpack.packb({"role": "agent"}),
    msgpack.packb({"role": "agent", "name": "x\0y"}),
    msgpack.packb({"role": "agent", "name": "ok", "capacity": -1}),
    msgpack.packb({"role": "agent", "name": "ok", "groups": ["g"] * 300}),
]


def random_message(rng: random.Random) -> list[bytes]:
    """A hostile message: broken headers, wrong sizes, HELLO with broken bodies, ..."""
    style = rng.random()
    if style < 0.15:
        header = rng.randbytes(rng.choice([0, 1, 8, 39, 41, 100]))
    elif style < 0.25:
        header = rng.randbytes(40)
    else:
        kind = HELLO if style < 0.4 else rng.randint(1, 16)
        h = bytearray(hdr(kind, corr=rng.getrandbits(64), flags=rng.getrandbits(16), aux=rng.getrandbits(32)))
        mutation = rng.random()
        if mutation < 0.12:
            h[rng.randint(0, 1)] ^= rng.randint(1, 255)
        elif mutation < 0.24:
            h[2] = rng.choice([0, 2, 255])
        elif mutation < 0.36:
            h[3] = rng.choice([0, 17, 99, 255])
        elif mutation < 0.48:
            h[rng.randint(12, 15)] = rng.randint(1, 255)
        header = bytes(h)
        if kind == HELLO and rng.random() < 0.7:
            return [header, b"", rng.choice(BAD_HELLO_BODIES)]
    frames = [header]
    r = rng.random()
    if r < 0.03:
        frames += [b""] * rng.randint(63, 70)  # too many frames
    elif r < 0.05:
        frames += [ECHO_ROUTE, b"echo", rng.randbytes(MAX_FRAME + rng.randint(1, 512))]  # < MAXMSGSIZE
    else:
        frames += [rng.randbytes(rng.randint(0, 48)) for _ in range(rng.randint(0, 4))]
    return frames


class Soak:
    """The hostile peers' shared state: the deadline, the endpoint, the keys, the tallies."""

    def __init__(self, endpoint: str, server: bytes, keys: dict[str, Keypair], deadline: float) -> None:
        self.endpoint = endpoint
        self.server = server
        self.keys = keys
        self.deadline = deadline
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.tallies: list[Tally] = []
        self.threads: list[threading.Thread] = []

    def peer_keys(self, name: str, server: bytes | None = None) -> PeerKeys:
        return PeerKeys(self.keys[name], server or self.server)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def spawn(self, name: str, fn: Callable[[Tally], None]) -> Tally:
        tally = Tally(name)
        self.tallies.append(tally)

        def run() -> None:
            try:
                fn(tally)
            except Exception as exc:  # a peer that dies is a failure to report, not a silent stop
                tally.problems.append(f"{name}: {exc!r}")

        t = threading.Thread(target=run, name=f"hostile-{name}", daemon=True)
        self.threads.append(t)
        t.start()
        return tally

    def join(self, timeout: float) -> list[str]:
        end = time.monotonic() + timeout
        stuck = []
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                # Where it is stuck, for the failure message.
                frames = sys._current_frames()
                where = "".join(traceback.format_stack(frames[t.ident])[-4:]) if t.ident in frames else "?"
                stuck.append(f"{t.name} at\n{where}")
        return stuck

    # ------------------------------------------------------------ the peers

    def garbage(self, tally: Tally, seed: int) -> None:
        rng = random.Random(seed)
        peer = Peer(self.ctx, self.endpoint, self.peer_keys("hostile"))
        try:
            while self.running():
                batch = [random_message(rng) for _ in range(rng.randint(1, 20))]
                expected = [expected_refusal(m, MAX_FRAME) for m in batch]
                for m in batch:
                    peer.send(m)
                tally.sent += len(batch)
                tally.malformed += sum(1 for _, _, bad in expected if bad)
                got: list[tuple[int, int]] = []
                while len(got) < len(batch):
                    frames = peer.recv(10.0)
                    if frames is None:
                        break
                    code = tally.error_code(frames)
                    if code is None:
                        tally.problems.append(f"garbage: not an ERROR: {frames[:3]!r}")
                        continue
                    got.append((code, HDR.unpack(frames[0])[7]))
                tally.answered += len(got)
                want = Counter((int(c), corr) for c, corr, _ in expected)
                if Counter(got) != want:
                    tally.problems.append(f"garbage: answers {Counter(got) - want} instead of {want - Counter(got)}")
                    return
                time.sleep(0.005)
        finally:
            peer.close()

    def rogue(self, tally: Tally, seed: int) -> None:
        rng = random.Random(seed)
        peer = Peer(self.ctx, self.endpoint, self.peer_keys("rogue"))
        try:
            if not peer.hello(tally, "rogue", protocol=2):
                return
            # An impersonation: HELLO as the good agent's name with another (accepted) key
            peer.send([hdr(HELLO, aux=2, corr=7), b"", msgpack.packb({"role": "agent", "name": "agent-0"})])
            last_beat = 0.0
            while self.running():
                now = time.monotonic()
                if now - last_beat > 0.2:
                    peer.send([hdr(HEARTBEAT), b""])
                    last_beat = now
                kind = rng.randint(1, 16)
                frames = [hdr(kind, corr=rng.getrandbits(64), flags=rng.getrandbits(4), aux=rng.getrandbits(8))]
                frames += [
                    rng.choice([ECHO_ROUTE, b"\x04\x00", b"\x02\x01gpu", rng.randbytes(8), b"echo", b""])
                    for _ in range(rng.randint(0, 4))
                ]
                # Half of them in packed framing: the broker reads their parts in place
                peer.send(pack_parts(frames) if rng.random() < 0.5 else frames)
                tally.sent += 1
                while (got := peer.recv(0.0)) is not None:
                    tally.answered += 1
                    if tally.error_code(got) == ErrorCode.NOT_REGISTERED:
                        tally.notes["re-hello"] += 1  # it said BYE (or went quiet): register again
                        if not peer.hello(tally, "rogue", protocol=2):
                            return
                time.sleep(0.002)
            tally.notes["NAME_TAKEN"] = tally.codes[ErrorCode.NAME_TAKEN]
        finally:
            peer.close()

    def replay(self, tally: Tally, copies: int = 10) -> None:
        peer = Peer(self.ctx, self.endpoint, self.peer_keys("replayer"))
        try:
            if not peer.hello(tally, "replayer"):
                return
            corr = 1000
            while self.running():
                corr += 1
                frames = [hdr(REQUEST, corr=corr), ECHO_ROUTE, b"echo", msgpack.packb({"value": corr})]
                for _ in range(copies):
                    peer.send(frames)  # the exact same bytes each time
                tally.sent += copies
                answers = []
                while len(answers) < copies:
                    got = peer.recv(10.0)
                    if got is None:
                        break
                    if HDR.unpack(got[0])[7] != corr:
                        continue
                    if got[0][3] == REPLY:
                        if msgpack.unpackb(got[2]) != corr:
                            tally.problems.append(f"replay: wrong value {got[2]!r} for {corr}")
                        answers.append("reply")
                    elif tally.error_code(got) == ErrorCode.REPLAYED:
                        answers.append("REPLAYED")
                    else:
                        answers.append("other error")
                tally.answered += len(answers)
                tally.notes.update(answers)
                # The first copy runs (one REPLY); every other copy is refused as a replay, so the
                # agent never runs it twice.
                if sorted(answers) != ["REPLAYED"] * (copies - 1) + ["reply"]:
                    tally.problems.append(f"replay: answers {answers} to {copies} copies of corr {corr}")
                    return
                peer.send([hdr(HEARTBEAT), b""])
                time.sleep(0.05)
        finally:
            peer.close()

    def bad_keys(self, tally: Tally) -> None:
        wrong_server = Keypair.generate().public
        variants: list[tuple[str, PeerKeys | None]] = [
            ("unknown", self.peer_keys("stranger")),
            ("rejected", self.peer_keys("rejected")),
            ("revoked", self.peer_keys("revoked")),
            ("wrong-server-key", self.peer_keys("rogue", wrong_server)),
            ("plaintext", None),
        ]
        events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED
        events |= zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        names = {
            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no-detail",
            zmq.EVENT_HANDSHAKE_SUCCEEDED: "SUCCEEDED",
        }
        i = 0
        while self.running():
            what, keys = variants[i % len(variants)]
            i += 1
            # Few reconnects per peer: the monitor's events pile up in an inproc pipe that libzmq's
            # I/O thread blocks on when full, and disable_monitor() would then wait for it.
            peer = Peer(self.ctx, self.endpoint, keys, reconnect_ms=1000)
            # A refused handshake may drop the socket's only pipe before the first send, which then
            # waits for a connection that never comes: bounded, and counted as the refusal it is.
            peer.sock.setsockopt(zmq.SNDTIMEO, 2000)
            monitor = peer.sock.get_monitor_socket(events)
            try:
                try:
                    peer.send([hdr(HELLO, aux=1, corr=i), b"", msgpack.packb({"role": "client", "name": what})])
                except zmq.Again:
                    tally.notes[f"{what}: refused before its HELLO was sent"] += 1
                    continue
                tally.sent += 1
                # The first handshake's outcome, as the peer's socket monitor reports it
                outcome = "none"
                if monitor.poll(3000):
                    outcome = names.get(recv_monitor_message(monitor)["event"], "other")
                tally.notes[f"{what}: {outcome}"] += 1
                got = peer.recv(0.1)
                if got is not None or outcome == "SUCCEEDED":
                    tally.problems.append(f"bad keys: a {what} peer got in: {outcome}, {got and got[:3]!r}")
                tally.notes[what] += 1
            finally:
                while monitor.poll(0):  # drain what the I/O thread queued, so nothing waits on it
                    monitor.recv_multipart()
                peer.sock.disable_monitor()
                monitor.close(linger=0)
                peer.close()

    def raw_tcp(self, tally: Tally, seed: int) -> None:
        rng = random.Random(seed)
        host, port = self.endpoint.removeprefix("tcp://").rsplit(":", 1)
        signature = b"\xff" + b"\0" * 8 + b"\x7f"
        greeting = signature + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0" + b"\0" * 31
        stalled: list[tuple[float, socket.socket]] = []
        try:
            while self.running():
                now = time.monotonic()
                while stalled and (now - stalled[0][0] > 2.0 or len(stalled) > 20):
                    stalled.pop(0)[1].close()
                what = rng.choice(["close", "random", "partial", "null-greeting", "bad-curve-hello", "stall"])
                try:
                    s = socket.create_connection((host, int(port)), timeout=2.0)
                except OSError as exc:  # a full backlog on a loaded machine; the good client checks the broker
                    tally.notes[f"connect: {type(exc).__name__}"] += 1
                    time.sleep(0.05)
                    continue
                keep = False
                try:
                    if what == "random":
                        s.sendall(rng.randbytes(rng.randint(1, 300)))
                    elif what == "partial":
                        s.sendall(greeting[: rng.randint(1, len(greeting) - 1)])
                    elif what == "null-greeting":
                        s.sendall(signature + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
                    elif what == "bad-curve-hello":  # a CURVE HELLO command of the right size, all noise
                        s.sendall(greeting + b"\x04\xc8\x05HELLO" + rng.randbytes(194))
                    elif what == "stall":
                        s.sendall(signature[:5])
                        stalled.append((now, s))
                        keep = True
                    if what in ("null-greeting", "bad-curve-hello"):
                        s.settimeout(0.5)
                        try:
                            while s.recv(4096):  # the broker's greeting, then it hangs up
                                pass
                            tally.notes[f"{what}: closed by broker"] += 1
                        except (TimeoutError, ConnectionError):
                            pass
                except ConnectionError:
                    tally.notes[f"{what}: reset"] += 1
                finally:
                    if not keep:
                        s.close()
                tally.sent += 1
                tally.notes[what] += 1
                time.sleep(0.01)
        finally:
            for _, s in stalled:
                s.close()

    def oversized(self, tally: Tally) -> None:
        peer = Peer(self.ctx, self.endpoint, self.peer_keys("oversized"))
        corr = 0
        try:
            if not peer.hello(tally, "oversized"):
                return
            big = 64 << 20  # far over MAXMSGSIZE: if the broker buffered it, its RSS would show it
            while self.running():
                # Over max_frame_bytes, under ZMQ_MAXMSGSIZE: the data plane answers FRAME_TOO_LARGE
                corr += 1
                peer.send([hdr(REQUEST, corr=corr), ECHO_ROUTE, b"echo", b"x" * (MAX_FRAME + 1)])
                tally.sent += 1
                got = peer.recv(10.0)
                if got is None or tally.error_code(got) != ErrorCode.FRAME_TOO_LARGE or HDR.unpack(got[0])[7] != corr:
                    tally.problems.append(f"oversized: {got[:3] if got else None!r} for a frame over max_frame_bytes")
                    return
                tally.malformed += 1
                tally.answered += 1
                # Over ZMQ_MAXMSGSIZE: libzmq drops the connection; no answer
                size = big if tally.notes["dropped"] % 3 == 0 else MAXMSGSIZE + 1
                peer.send([hdr(REQUEST, corr=corr), ECHO_ROUTE, b"echo", bytes(size)])
                tally.sent += 1
                if (got := peer.recv(0.5)) is not None:
                    tally.problems.append(f"oversized: an answer {got[:3]!r} to a message over MAXMSGSIZE")
                    return
                # ... and the DEALER reconnects as a new, unregistered peer
                for _ in range(100):
                    peer.send([hdr(REQUEST, corr=corr), ECHO_ROUTE, b"echo", b""])
                    got = peer.recv(0.2)
                    if got is not None:
                        break
                if got is None or tally.error_code(got) != ErrorCode.NOT_REGISTERED:
                    tally.problems.append(f"oversized: after the drop, {got[:3] if got else None!r}")
                    return
                tally.notes["dropped"] += 1
                if not peer.hello(tally, "oversized"):
                    return
                time.sleep(0.5)
        finally:
            peer.close()


# ------------------------------------------------------------------- test


@pytest.mark.parametrize("core", os.environ.get("ORBITMESH_SOAK_CORES", "c").split(","))
def test_hostile_peers_cannot_hurt_a_curve_broker(tmp_path, core):
    keys_dir = tmp_path / "keys"
    names = ["agent", "client", "operator", "hostile", "rogue", "replayer", "oversized", "stranger", "rejected"]
    names.append("revoked")
    keys = {name: Keypair.generate() for name in names}
    store = KeyStore(keys_dir / "peers")
    for name in ("client", "replayer", "oversized"):
        store.accept(keys[name].public, Policy("client"))
    # The garbage peers' broken HELLOs (agent and client) must be judged on their bodies (BAD_HELLO)
    store.accept(keys["hostile"].public, Policy("agent", may_request=True))
    store.accept(keys["agent"].public, Policy("agent"))
    store.accept(keys["operator"].public, Policy("admin"))  # reads the broker's stats
    store.accept(keys["rogue"].public, Policy("agent", may_request=True))  # it tries both roles
    store.reject(keys["rejected"].public)
    store.revoke(keys["revoked"].public)
    keys["agent"].save(tmp_path, "agent")
    broker = Proc("broker", str(keys_dir), "--max-frame-bytes", str(MAX_FRAME), "--core", core)
    agent: Proc | None = None
    try:
        endpoint = broker.ready[1]
        agent = Proc("agent", endpoint, "agent-0", str(tmp_path / "agent.key_secret"), str(keys_dir / "broker.key"))
        server = Keypair.load(keys_dir / "broker.key").public
        report = asyncio.run(asyncio.wait_for(soak(broker, endpoint, server, keys), SOAK + 100))
        # Expect the unknown key waiting for an operator, and the others' states left alone
        assert store.state(keys["stranger"].public) == "pending"
        assert store.state(keys["rejected"].public) == "rejected" and store.state(keys["revoked"].public) == "revoked"
        assert len(store.list()["pending"]) == 1
        # Expect the broker to stop cleanly when asked, after all that
        assert broker.stop(signal.SIGTERM, timeout=15.0) == 0
    finally:
        if agent is not None:
            agent.stop()
        broker.stop()
    print(report)


async def soak(broker: Proc, endpoint: str, server: bytes, keys: dict[str, Keypair]) -> str:
    ctx: zmq.Context[Any] = zmq.Context()
    client = om.MeshClient(endpoint, context=ctx, keys=PeerKeys(keys["client"], server), timeout=10.0)
    ops = om.MeshClient(endpoint, context=ctx, keys=PeerKeys(keys["operator"], server), timeout=10.0)
    hostile: Soak | None = None
    try:
        await client.connect(timeout=10.0)
        await ops.connect(timeout=10.0)
        for i in range(50):  # warm up: the paths the soak uses have run once
            assert await client.invoke("agent-0", "echo", {"value": i}) == i
        await asyncio.sleep(1.5)  # counters are reported every heartbeat (0.5 s)
        before = await ops.stats()
        assert "malformed" in before
        baseline_kib = memory_kib(broker.pid)[0]
        bound_kib = baseline_kib + RSS_HEADROOM_MIB * 1024

        # Given hostile peers of every kind for SOAK seconds
        hostile = Soak(endpoint, server, keys, time.monotonic() + SOAK)
        garbage = [hostile.spawn(f"garbage-{s}", lambda t, s=s: hostile.garbage(t, s)) for s in (1, 2)]
        rogue = hostile.spawn("rogue", lambda t: hostile.rogue(t, 3))
        replay = hostile.spawn("replay", hostile.replay)
        bad_keys = hostile.spawn("bad-keys", hostile.bad_keys)
        raw = hostile.spawn("raw-tcp", lambda t: hostile.raw_tcp(t, 4))
        oversized = hostile.spawn("oversized", hostile.oversized)

        # ... while a well-behaved client keeps invoking, and the broker's memory is sampled
        ok, failures, peak_rss = 0, [], baseline_kib
        i = 0
        next_sample = 0.0
        while hostile.running():
            i += 1
            try:
                if await client.invoke("agent-0", "echo", {"value": i}, timeout=10.0) == i:
                    ok += 1
                else:
                    failures.append(f"call {i}: wrong value")
            except om.OrbitMeshError as exc:
                failures.append(f"call {i}: {exc}")
            if time.monotonic() >= next_sample:
                peak_rss = max(peak_rss, memory_kib(broker.pid)[0])
                next_sample = time.monotonic() + 0.25
            await asyncio.sleep(0.005)
        stuck = await asyncio.get_running_loop().run_in_executor(None, hostile.join, 30.0)
        assert not stuck, f"hostile peers did not stop: {stuck}"

        # Expect the broker up and answering, and a new client served
        assert broker.proc.poll() is None, "the broker died"
        await asyncio.sleep(1.5)  # counters are reported every heartbeat (0.5 s)
        after = await ops.stats()
        fresh = om.MeshClient(endpoint, context=ctx, keys=PeerKeys(keys["client"], server), timeout=10.0)
        await fresh.connect(timeout=10.0)
        try:
            assert await fresh.invoke("agent-0", "echo", {"value": "still here"}) == "still here"
        finally:
            await fresh.close()
        rss_kib, hwm_kib = memory_kib(broker.pid)
        peak_rss = max(peak_rss, rss_kib)

        lines = [
            f"soak {SOAK:.0f} s: good calls {ok}, failures {len(failures)}",
            f"broker RSS: baseline {baseline_kib / 1024:.1f} MiB, peak sampled {peak_rss / 1024:.1f} MiB, "
            f"end {rss_kib / 1024:.1f} MiB, VmHWM {hwm_kib / 1024:.1f} MiB, bound {bound_kib / 1024:.1f} MiB",
            f"stats delta: { {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)} }",
        ]
        for t in hostile.tallies:
            codes = {ErrorCode(c).name if c in KNOWN_CODES else c: n for c, n in t.codes.items()}
            lines.append(f"{t.name}: sent {t.sent}, answered {t.answered}, codes {codes}, {dict(t.notes)}")
        report = "\n".join(lines)

        problems = [p for t in hostile.tallies for p in t.problems]
        assert not problems, f"{problems[:20]}\n{report}"
        # Expect every good call to have succeeded, and enough of them to mean something
        assert not failures, f"{failures[:10]}\n{report}"
        assert ok >= MIN_GOOD_CALLS, report
        # Expect the broker's memory under the bound all along (VmHWM: the true peak)
        assert peak_rss <= bound_kib and hwm_kib <= bound_kib, report
        # Expect every hostile peer to have done its work (so the test cannot pass by doing nothing)
        for t in (*garbage, rogue, replay, bad_keys, raw, oversized):
            assert t.sent >= 10, report
        assert oversized.notes["dropped"] >= 2, report
        assert rogue.codes[ErrorCode.NAME_TAKEN] == 1, report
        for what in ("unknown", "rejected", "revoked", "wrong-server-key", "plaintext"):
            assert bad_keys.notes[what] >= 2, report
        # Expect the counters to have seen the abuse: every malformed message, every refused key
        malformed = sum(t.malformed for t in (*garbage, oversized))
        assert after["malformed"] - before["malformed"] >= malformed, report
        answered = sum(t.answered for t in garbage)
        assert after["errors_sent"] - before["errors_sent"] >= answered - sum(
            t.codes[ErrorCode.BAD_HELLO] for t in garbage
        ), report
        assert after["received"] - before["received"] >= sum(t.sent for t in (*garbage, rogue, replay)), report
        # ... the keys the ZAP handler refused: each attempt refused at the handshake (or, on a very
        # slow machine, no handshake within 3 s), counted at least once (the DEALER retries)
        refused = 0
        for what in ("unknown", "rejected", "revoked"):
            auth, none = bad_keys.notes[f"{what}: auth"], bad_keys.notes[f"{what}: none"]
            assert auth + none == bad_keys.notes[what] and auth >= 2, report
            refused += auth
        assert after["keys_refused"] - before["keys_refused"] >= refused, report
        return report
    finally:
        if hostile is not None:
            hostile.deadline = 0.0
            hostile.join(10.0)
            hostile.ctx.destroy(linger=0)
        await client.close()
        await ops.close()
        ctx.destroy(linger=0)
