"""The examples are consumer apps: each runs as its own process and must finish cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = {
    "quickstart": [
        "square(12) = 144",
        "job 1 state = SUCCEEDED on worker-1",
        "100 pipelined jobs: sum of squares = 338350",
        "unknown command -> UNKNOWN_COMMAND",
    ],
    "streaming": ["consumed 100 readings", "normalised 100000 float64 values: mean 0.000, std 1.000"],
    "fleet": [
        "round_robin over gpu: gpu-eu-1, gpu-us-1, gpu-eu-1, gpu-us-1",
        "least_loaded gpu while gpu-eu-1 is busy: gpu-us-1",
        "labels zone=us-*: cpu-us-1",
        "execute_on_all: 3 ok, 1 failed",
        "events on shutdown: agent_left x4",
    ],
    "secure_fleet": [
        "edge-1 refused; pending keys: 1",
        "edge-1 accepted and connected",
        "operator: edge-1: 42% used",
        "operator reboot -> FORBIDDEN: command 'admin.reboot' is not allowed for this key",
        "admin: edge-1: rebooting",
        "after revoke: 0 agents; forbidden so far: 1",
    ],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(core_impl, name):
    # Given the example as a user would run it, on the core under test
    env = subprocess_env()
    env.pop("ORBITMESH_NO_EXTENSIONS", None)
    if core_impl == "py":
        env["ORBITMESH_NO_EXTENSIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Expect a clean exit, the lines that show it worked, and nothing on stderr
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for expected in EXAMPLES[name]:
        assert any(line.startswith(expected) for line in lines), f"{expected!r} not in:\n{proc.stdout}"
    assert lines[-1] == f"{name} done"
    assert proc.stderr == ""
