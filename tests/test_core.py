"""Which core is live: the compiled modules by default, the pure-Python twins with
ORBITMESH_NO_EXTENSIONS=1, and a clear error (never a silent fallback) when the compiled
core is not built."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import orbitmesh
from orbitmesh import _core

SRC = Path(orbitmesh.__file__).resolve().parent.parent
PURE_WANTED = bool(os.environ.get("ORBITMESH_NO_EXTENSIONS"))


def wrapper(name: str) -> ModuleType:
    """The public selector module for core module ``name`` ("_frame" -> orbitmesh._core.frame)."""
    return importlib.import_module(f"orbitmesh._core.{name.lstrip('_')}")


def run_python(code: str, *, pythonpath: Path, no_extensions: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ORBITMESH_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(pythonpath)
    if no_extensions:
        env["ORBITMESH_NO_EXTENSIONS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )


def test_core_modules_have_selectors() -> None:
    assert set(_core.MODULES) >= {"_frame", "_dataplane"}
    for name in _core.MODULES:
        assert wrapper(name)._mod is _core.load(name)


@pytest.mark.parametrize("name", _core.MODULES)
def test_compiled_core_is_live_by_default(name: str) -> None:
    """No skip: an unbuilt core fails here (unless ORBITMESH_NO_EXTENSIONS asks for the twins)."""
    mod = wrapper(name)._mod
    if PURE_WANTED:
        assert orbitmesh.core_impl() == "py"
        assert mod.__name__ == f"orbitmesh._core.{name}_py"
        return
    assert orbitmesh.core_impl() == "c"
    assert mod.__name__ == f"orbitmesh._core.{name}_c"
    assert mod.__file__ is not None
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__
    for attr in mod.public_api:
        assert getattr(wrapper(name), attr) is getattr(mod, attr), attr


def test_frame_and_dataplane_resolve_to_the_live_core() -> None:
    from orbitmesh._core import dataplane, frame

    for obj in (frame.pack_header, dataplane.DataPlane):
        module = sys.modules[obj.__module__]
        if PURE_WANTED:
            assert obj.__module__.endswith("_py"), obj
            continue
        assert obj.__module__.endswith("_c"), obj
        assert str(module.__file__).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), module
    assert frame.IMPL == ("py" if PURE_WANTED else "c")


def test_no_extensions_selects_the_pure_python_twins() -> None:
    result = run_python(
        """
        import json, sys
        import orbitmesh
        from orbitmesh import _core
        from orbitmesh._core import frame
        mods = {n: __import__(f"orbitmesh._core.{n.lstrip('_')}", fromlist=["_mod"])._mod.__name__
                for n in _core.MODULES}
        compiled = sorted(m for m in sys.modules if m.startswith("orbitmesh._core.") and m.endswith("_c"))
        print(json.dumps({"impl": orbitmesh.core_impl(), "mods": mods, "compiled": compiled,
                          "frame_impl": frame.IMPL}))
        """,
        pythonpath=SRC,
        no_extensions=True,
    )
    assert result.returncode == 0, result.stderr
    got: dict[str, Any] = json.loads(result.stdout)
    assert got["impl"] == "py"
    assert got["frame_impl"] == "py"
    assert got["mods"] == {n: f"orbitmesh._core.{n}_py" for n in _core.MODULES}
    assert got["compiled"] == []


def test_load_rejects_an_unknown_impl() -> None:
    with pytest.raises(ValueError, match="impl must be 'c' or 'py'"):
        _core.load("_frame", "x")


def test_load_of_both_twins() -> None:
    assert _core.load("_frame", "py").__name__ == "orbitmesh._core._frame_py"
    if not PURE_WANTED:
        assert _core.load("_frame", "c").__name__ == "orbitmesh._core._frame_c"


def _assert_build_hint(message: str) -> None:
    assert "pip install ." in message, message
    assert "ORBITMESH_NO_EXTENSIONS" in message, message
    assert "_frame_c" in message, message


def test_missing_compiled_module_says_how_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def import_module(name: str, package: str | None = None) -> ModuleType:
        if name.endswith("._frame_c"):
            raise ImportError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(ImportError) as info:
        _core.load("_frame", "c")
    _assert_build_hint(str(info.value))
    assert isinstance(info.value.__cause__, ImportError)
    assert _core.load("_frame", "py").__name__.endswith("_py")  # the twin still loads


def test_unbuilt_package_fails_on_import_with_a_build_hint(tmp_path: Path) -> None:
    """A source tree with no compiled modules: importing it fails, and says how to fix it
    (no silent fallback to the pure-Python core)."""
    shutil.copytree(
        SRC / "orbitmesh",
        tmp_path / "orbitmesh",
        ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "*.cpp", "*.html", "__pycache__"),
    )
    assert not [p for p in (tmp_path / "orbitmesh").rglob("*") if p.suffix in (".so", ".pyd")]
    result = run_python(
        """
        import json, sys
        out = {}
        try:
            import orbitmesh
        except ImportError as exc:
            out["import"] = str(exc)
        core = sys.modules["orbitmesh._core"]
        out["file"] = core.__file__
        try:
            core.load("_frame")
        except ImportError as exc:
            out["load"] = str(exc)
        print(json.dumps(out))
        """,
        pythonpath=tmp_path,
        no_extensions=False,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["file"].startswith(str(tmp_path)), got
    assert "import" in got, "importing an unbuilt orbitmesh must fail, not fall back to the pure core"
    assert "pip install ." in got["import"] and "ORBITMESH_NO_EXTENSIONS" in got["import"], got
    _assert_build_hint(got["load"])
    # ... and the same tree runs on the pure-Python core when asked to.
    pure = run_python(
        "import orbitmesh; print(orbitmesh.core_impl())",
        pythonpath=tmp_path,
        no_extensions=True,
    )
    assert pure.returncode == 0, pure.stderr
    assert pure.stdout.strip() == "py"


@pytest.mark.parametrize("impl", ["c", "py"])
def test_io_twins_send_and_receive_whole_messages_in_byte_bounded_batches(impl: str) -> None:
    import time

    import zmq

    io = _core.load("_io", impl)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"inproc://io-twins-{impl}")
        b.connect(f"inproc://io-twins-{impl}")
        # Given large and small messages sent as bytes, memoryviews and bytearrays
        big = b"x" * (io.BATCH_BYTES // 4 + 1)
        for i in range(8):
            assert io.send_parts(a, [b"h%d" % i, memoryview(big), bytearray(b"t")])
        for i in range(5):
            assert io.send_parts(a, [b"s%d" % i])
        with pytest.raises(ValueError):
            io.send_parts(a, [])
        time.sleep(0.05)
        got, sizes = [], []
        for _ in range(20):
            batch = io.recv_batch(b, 256)
            if not batch:
                break
            sizes.append(len(batch))
            got += batch
        # Expect every message whole and in order, and no batch holding much past BATCH_BYTES
        assert [m[0] for m in got] == [b"h%d" % i for i in range(8)] + [b"s%d" % i for i in range(5)]
        assert all(m[1:] == [big, b"t"] for m in got[:8])
        assert sizes == [4, 4, 5]
        assert io.recv_batch(b, 256) == []
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


@pytest.mark.parametrize("impl", ["c", "py"])
def test_io_twins_send_a_queue_until_the_socket_is_full_or_a_message_needs_the_caller(impl: str) -> None:
    from collections import deque

    import zmq

    from orbitmesh._wire import header
    from orbitmesh.protocol import Kind

    io = _core.load("_io", impl)
    ctx = zmq.Context()
    a, b, lone = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.setsockopt(zmq.SNDHWM, 4)
        a.bind(f"inproc://io-queue-{impl}")
        b.setsockopt(zmq.RCVHWM, 4)  # inproc: the pipe holds both sides' marks
        b.connect(f"inproc://io-queue-{impl}")
        b.send(b"hi")
        assert a.recv() == b"hi"  # a has its peer now
        lone.bind(f"inproc://io-queue-lone-{impl}")
        # Given a queue of lists and tuples (packed and not), then a message of another sort
        hdr = header(Kind.REQUEST, corr=1)
        out: deque[Any] = deque([[hdr, b"r", b"c"], (hdr, b"t"), [hdr, memoryview(b"m")], object(), [b"after"]])
        assert io.send_queue(lone, out, False) is True  # no peer: the socket takes nothing
        assert len(out) == 5
        # Expect the three sent, in order, and the queue stopped at the other sort of message
        assert io.send_queue(a, out, True) is False
        assert len(out) == 2 and type(out[0]) is object
        got = [io.recv_batch(b, 10) for _ in range(2)]
        assert got[0] == [[hdr, b"r", b"c"], [hdr, b"t"], [hdr, b"m"]]
        out.popleft()
        # ... and a full socket stops it, keeping what is left
        out.extend([b"x%d" % i] for i in range(50))
        assert io.send_queue(a, out, False) is True
        left = len(out)
        assert 0 < left < 50 and [m[0] for m in out] == [b"x%d" % i for i in range(50 - left, 50)]
        assert io.send_queue(a, deque(), False) is False
    finally:
        for sock in (a, b, lone):
            sock.close(0)
        ctx.term()


def test_io_twins_pack_messages_into_one_frame_and_back() -> None:
    """What the broker's two planes send each other per turn (OP_PACKED, EV_PACKED): the same
    bytes from both twins, read back whole and in order; a packing that does not add up is read
    up to its last whole message; pack_runs leaves a message over its limit as it is, in order."""
    c, py = _core.load("_io", "c"), _core.load("_io", "py")
    messages = [[b"\x01", b"rid", b"h" * 40, b""], [b"\x02"], [b"\x03", bytearray(b"view"), memoryview(b"mv")]]
    packed = c.pack_messages(messages)
    assert packed == py.pack_messages(messages) == c.pack_messages(iter(messages))
    expect = [[bytes(p) for p in m] for m in messages]
    assert c.unpack_messages(packed) == py.unpack_messages(packed) == expect
    for cut in range(len(packed)):  # torn anywhere: the whole messages before the tear
        got = c.unpack_messages(packed[:cut])
        assert got == py.unpack_messages(packed[:cut]) == expect[: len(got)]
        assert len(got) == len(expect) or c.pack_messages(got) == packed[: len(c.pack_messages(got))]
    assert c.unpack_messages(b"\x00\x00" + packed) == []  # a message of no part ends it
    for bad in ([], [b"x"] * 65536):
        for io in (c, py):
            with pytest.raises(ValueError, match="1 to 65535 parts"):
                io.pack_messages([*messages, bad])
    big = [b"\x01", b"x" * 20_000]
    mixed = [messages[0], messages[1], big, messages[2], big]
    runs_c, runs_py = c.pack_runs(mixed, 16384), py.pack_runs(mixed, 16384)
    assert runs_c == runs_py
    assert runs_c == [c.pack_messages(mixed[:2]), big, c.pack_messages(mixed[3:4]), big]
    assert c.pack_runs([], 10) == [] and c.pack_runs(mixed, 1 << 20) == [c.pack_messages(mixed)]


@pytest.mark.parametrize("impl", ["c", "py"])
def test_outbox_queues_a_turns_messages_and_asks_for_one_flush(impl: str) -> None:
    """The broker's ``Outbox``: nothing kept while closed; the first message of a turn asks for
    the flush (once), ``send`` wraps a peer's message in the op, ``take`` empties it in order."""
    flushes: list[int] = []
    box = _core.load("_io", impl).Outbox(b"\x01", lambda: flushes.append(1))
    box.ctl([b"\x04", b"dropped"])
    box.send(b"rid", [b"dropped"])
    assert box.take() == [] and flushes == []
    box.closed = False
    box.ctl([b"\x04", b"op"])
    box.send(b"rid", [b"hdr", b"", b"body"])
    box.send(b"rid2", (b"hdr2",))  # any sequence of frames
    assert flushes == [1]
    assert box.take() == [[b"\x04", b"op"], [b"\x01", b"rid", b"hdr", b"", b"body"], [b"\x01", b"rid2", b"hdr2"]]
    assert box.take() == []
    box.send(b"rid", [b"next turn"])
    assert flushes == [1, 1] and box.take() == [[b"\x01", b"rid", b"next turn"]]


def test_async_socket_sends_what_a_batch_answers_at_the_end_of_that_batch() -> None:
    """What the handlers of a received batch send leaves when the batch ends, not a loop turn
    later; and a handler that raises still leaves a drain scheduled for what was queued."""
    import asyncio

    import zmq

    from orbitmesh._aio import AsyncSocket

    loop = asyncio.new_event_loop()
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    sock = None
    try:
        a.bind("inproc://aio-batch-end")
        b.connect("inproc://aio-batch-end")
        b.send(b"hi")
        assert a.recv() == b"hi"  # a has its peer now
        got: list[bytes] = []

        def on_message(frames: list[bytes]) -> None:
            got.append(frames[0])
            sock.send([b"re-" + frames[0]])
            if frames[0] == b"boom":
                raise RuntimeError("a handler's bug")

        sock = AsyncSocket(a, on_message, loop)
        # Given three messages waiting, When one batch handles them (no loop turn)
        for m in (b"1", b"2", b"3"):
            b.send(m)
        assert a.poll(1000)
        sock._drain()
        # Expect the three answers already sent, in order
        assert got == [b"1", b"2", b"3"]
        answers = []
        for _ in range(3):
            assert b.poll(1000)
            answers.append(b.recv())
        assert answers == [b"re-1", b"re-2", b"re-3"]
        # When a handler raises after sending, Expect its answer to leave on the next loop turn
        b.send(b"boom")
        assert a.poll(1000)
        with pytest.raises(RuntimeError, match="bug"):
            sock._drain()
        assert not b.poll(50)
        loop.run_until_complete(asyncio.sleep(0.01))
        assert b.poll(1000) and b.recv() == b"re-boom"
    finally:
        if sock is not None:
            sock.close()
        else:
            a.close(0)
        b.close(0)
        ctx.term()
        loop.close()


def test_protocol_doc_lists_every_error_code_and_kind() -> None:
    """docs/protocol.md is the reference: every ErrorCode and message kind has its row."""
    from orbitmesh.errors import ErrorCode
    from orbitmesh.protocol import Kind

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    missing = [c.name for c in ErrorCode if f"| {int(c)} | {c.name} |" not in doc]
    missing += [k.name for k in Kind if f"| {int(k)} | {k.name} |" not in doc]
    assert not missing, f"docs/protocol.md has no row for {missing}"
