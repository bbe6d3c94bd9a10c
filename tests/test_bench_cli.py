"""``orbitmesh bench``: one quick run end to end, with the live core."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orbitmesh.cli import main


def _children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.parent.name))
    return found


def test_bench_quick_reports_every_workload_against_the_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the live core and a JSON file to write
    out = tmp_path / "b.json"
    before = set(_children_of(os.getpid()))
    # When a quick bench runs
    rc = main(["bench", "--quick", "--json", str(out)])
    # Expect a report (exit 0 even if a target is missed), printed as a table and written as JSON
    assert rc == 0
    assert "pipelined invoke" in capsys.readouterr().out
    report = json.loads(out.read_text())
    workloads = report["workloads"]
    assert set(workloads) >= {"pipelined", "latency_p50", "latency_p99", "broker_cpu", "raw_broker_cpu"}
    for name, figures in workloads.items():
        assert figures["orbitmesh"] > 0 and figures["baseline"] > 0, name
        assert figures["ratio"] > 0, name
    assert workloads["pipelined"]["met"] in (True, False)
    assert report["broker_core"] == report["live_core"]
    # Expect every child process gone
    assert set(_children_of(os.getpid())) <= before
