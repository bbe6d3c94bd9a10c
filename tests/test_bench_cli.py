"""``orbitmesh bench``: one quick run end to end, with the live core."""

from __future__ import annotations

import json
import os
import tempfile
import time
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
    stores_before = set(Path(tempfile.gettempdir()).glob("orbitmesh-bench-*"))
    # When a quick bench runs
    started = time.monotonic()
    rc = main(["bench", "--quick", "--json", str(out)])
    took = time.monotonic() - started
    # Expect a report (exit 0 even if a target is missed), printed as a table and written as JSON
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pipelined invoke" in printed
    assert "execute sync: jobs/s" in printed
    report = json.loads(out.read_text())
    workloads = report["workloads"]
    assert set(workloads) >= {"pipelined", "latency_p50", "latency_p99", "broker_cpu", "raw_broker_cpu"}
    # ... with durable execute in every durability mode, against invoke from the same run
    for mode in ("sync", "batch", "none"):
        assert {f"jobs_{mode}", f"jobs_{mode}_broker_cpu", f"jobs_{mode}_client_cpu"} <= set(workloads), mode
        assert workloads[f"jobs_{mode}"]["baseline"] == workloads["pipelined"]["orbitmesh"]
        jobs = report["jobs"][mode]
        assert jobs["store"] == "lmdb" and jobs["jobs"] > 0 and jobs["rate"] > 0, mode
        assert jobs["broker_threads_ns_per_job"]["control"] > 0, mode
        assert jobs["broker_threads_ns_per_job"]["joblog"] > 0, mode
    assert workloads["jobs_sync"]["met_absolute"] in (True, False)
    assert workloads["jobs_sync"]["met_ratio"] in (True, False)
    for name, figures in workloads.items():
        assert figures["orbitmesh"] > 0 and figures["baseline"] > 0, name
        assert figures["ratio"] > 0, name
    assert workloads["pipelined"]["met"] in (True, False)
    assert report["broker_core"] == report["live_core"]
    assert report["settings"]["job_window"] == 1000 and report["settings"]["store"] == "lmdb"
    # Expect it quick, every child process gone and the job stores removed
    assert took < 30
    assert set(_children_of(os.getpid())) <= before
    assert set(Path(tempfile.gettempdir()).glob("orbitmesh-bench-*")) <= stores_before


def test_bench_rejects_a_bad_job_window(capsys: pytest.CaptureFixture[str]) -> None:
    # When the job window is not positive, expect a usage error before anything starts
    assert main(["bench", "--quick", "--job-window", "0"]) == 2
    assert "--job-window" in capsys.readouterr().err
