"""The ``orbitmesh`` command: broker and agent as real processes, queries and the demo in-process."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import orbitmesh as om
from orbitmesh.cli import main

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orbitmesh", *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=5)
    return out


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_broker_agent_and_queries_as_processes(tmp_path):
    # Given a broker (its job log in tmp_path) and an agent started from the command line
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    broker = _spawn("broker", endpoint, "--heartbeat", "0.2", "--store", f"lmdb://{tmp_path}/jobs")
    agent = None
    try:
        agent = _spawn(
            "agent",
            "--broker",
            endpoint,
            "--name",
            "cli-agent",
            "--handlers",
            "tests.cli_handlers:HANDLERS",
            "--capability",
            "text",
            "--label",
            "zone=lab",
        )
        # When the agent list is asked for, Expect the agent with its commands and labels
        deadline = time.monotonic() + 20
        rows: list[dict] = []
        while time.monotonic() < deadline:
            code, out = _run(["agents", "--broker", endpoint, "--json", "--timeout", "2"])
            rows = json.loads(out) if code == 0 else []
            if rows:
                break
            time.sleep(0.2)
        assert [r["name"] for r in rows] == ["cli-agent"]
        assert sorted(rows[0]["commands"]) == ["double", "shout", "triple"]
        assert rows[0]["labels"] == {"zone": "lab"} and rows[0]["capabilities"] == ["text"]
        # Expect the handlers loaded from the module to answer a client
        with om.BlockingClient(endpoint, timeout=5) as client:
            assert client.invoke("cli-agent", "shout", {"text": "hi"}) == "HI"
            assert client.invoke(om.Select(capability="text"), "triple", [5]) == 15
            assert client.invoke("cli-agent", "double", [4]) == 8
        code, out = _run(["agents", "--broker", endpoint])
        assert code == 0 and "cli-agent" in out and "zone=lab" in out
        # And jobs: submitted through the API, seen, waited for and cancelled from the CLI
        with om.BlockingClient(endpoint, timeout=5) as client:
            done = client.execute("cli-agent", "double", [21])
            assert client.job_result(done) == 42
        code, out = _run(["jobs", "list", "--broker", endpoint])
        assert code == 0 and f"{done:>8} SUCCEEDED  double" in out
        code, out = _run(["jobs", "wait", str(done), "--broker", endpoint, "--json"])
        assert code == 0 and json.loads(out)["state"] == "SUCCEEDED"
        code, out = _run(["jobs", "show", str(done), "--broker", endpoint])
        assert code == 0 and "PENDING" in out and "DISPATCHED" in out and "SUCCEEDED" in out
        code, out = _run(["jobs", "cancel", str(done), "--broker", endpoint, "--json"])
        assert code == 0 and json.loads(out)["state"] == "SUCCEEDED"  # a finished job stays finished
    finally:
        if agent is not None:
            agent_out = _stop(agent)
        broker_out = _stop(broker)
    # Expect both to have said what they serve, and to stop cleanly on SIGTERM
    assert "serving" in agent_out and "shout" in agent_out
    assert "orbitmesh broker" in broker_out and endpoint in broker_out
    assert agent.returncode == 0 and broker.returncode == 0


def test_agents_query_without_a_broker_fails_clearly():
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    err = io.StringIO()
    from contextlib import redirect_stderr

    with redirect_stderr(err):
        code, _ = _run(["agents", "--broker", endpoint, "--timeout", "0.5"])
    assert code == 2
    assert "NOT_CONNECTED" in err.getvalue()


def test_bad_handler_spec_is_refused():
    with pytest.raises(SystemExit, match="MODULE:OBJ"):
        main(["agent", "--name", "x", "--handlers", "no_colon_here"])


@pytest.mark.parametrize("transport", ["inproc", "tcp"])
def test_demo_prints_a_summary(transport):
    argv = ["demo", "--requests", "300"] + (["--tcp"] if transport == "tcp" else [])
    code, out = _run(argv)
    assert code == 0
    # Each feature shows its real result
    assert "square(12) on agent-0            -> 144" in out
    assert "stream   count(5) from agent-1, window 2    -> [0, 1, 2, 3, 4]" in out
    assert "setyb war hseMtibrO" in out
    assert "agent-0=49, agent-1=49, agent-2=49" in out
    assert "builtins.ValueError: agent-2 refuses" in out
    assert "300 pipelined invokes" in out and out.rstrip().endswith("done.")


def test_version():
    with pytest.raises(SystemExit) as info, redirect_stdout(io.StringIO()) as out:
        main(["--version"])
    assert info.value.code == 0
    assert om.__version__ in out.getvalue()


def test_keys_and_a_secured_broker_from_the_command_line(tmp_path):
    keys_dir = tmp_path / "broker-keys"
    # Given a keypair made with `orbitmesh keys generate`
    code, out = _run(["keys", "generate", "ops", "--out", str(tmp_path)])
    assert code == 0 and (tmp_path / "ops.key_secret").exists()
    ops_id = out.split()[0]
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    broker = _spawn("broker", endpoint, "--heartbeat", "0.2", "--store", "memory://", "--keys", str(keys_dir))
    try:
        server_key = keys_dir / "broker.key"
        deadline = time.monotonic() + 10
        while not server_key.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        creds = ["--key", str(tmp_path / "ops.key_secret"), "--server-key", str(server_key), "--timeout", "0.6"]
        # When it connects before being accepted, Expect a clear failure and the key pending
        err = io.StringIO()
        from contextlib import redirect_stderr

        with redirect_stderr(err):
            code, _ = _run(["agents", "--broker", endpoint, *creds])
        assert code == 2 and "NOT_CONNECTED" in err.getvalue()
        code, out = _run(["keys", "list", "--keys", str(keys_dir)])
        assert code == 0 and f"pending   {ops_id[:16]}" in out
        # When the operator accepts it, Expect the same command to work, with no restart
        code, out = _run(["keys", "accept", ops_id[:10], "--role", "client", "--keys", str(keys_dir)])
        assert code == 0 and "[client]" in out
        code, out = _run(["agents", "--broker", endpoint, *creds])
        assert code == 0 and "no agents" in out
        code, out = _run(["keys", "list", "--keys", str(keys_dir)])
        assert f"accepted  {ops_id[:16]}" in out and out.rstrip().endswith("[client]")
        # When its policy says it is an agent key, Expect a query connection refused as FORBIDDEN
        code, out = _run(["keys", "policy", ops_id[:10], "--role", "agent", "--keys", str(keys_dir)])
        assert code == 0 and "[agent]" in out
        with redirect_stderr(err):
            code, _ = _run(["agents", "--broker", endpoint, *creds])
        assert code == 2 and "FORBIDDEN" in err.getvalue()
        # And a policy that makes no sense is refused with the reason
        with redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as bad:
            _run(["keys", "policy", ops_id[:10], "--role", "admin", "--commands", "x.*", "--keys", str(keys_dir)])
        assert "admin key is unrestricted" in str(bad.value)
    finally:
        _stop(broker)
