"""The pytest-benchmark suites in ``benchmarks/`` run in CI too, timing off: every case once, on
both cores, with its assertions (docs/benchmarks.md quotes their ratios; this keeps them
runnable). Timing them is for ``pytest benchmarks/``, not for the test suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """A child Python on the same orbitmesh as this test run."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def test_every_benchmark_case_runs_once_and_holds(tmp_path: Path) -> None:
    suites = str(ROOT / "benchmarks")
    proc = _run(["-m", "pytest", suites, "--benchmark-disable", "-q", "-p", "no:cacheprovider"], tmp_path, 300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Expect every suite collected: both cores of the codec, data plane, calls and record cases
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 40, proc.stdout[-2000:]
    assert " failed" not in proc.stdout and " skipped" not in proc.stdout


@pytest.mark.slow
def test_job_ceiling_experiment_runs_and_its_lean_brokers_are_the_patched_ones(tmp_path: Path) -> None:
    """``benchmarks/job_ceiling.py`` (docs/performance.md quotes it) stays runnable, and its lean
    variants measure what they say: the broker child runs the cut-down job path."""
    variants = ("invoke", "full", "lean+log", "lean")
    proc = _run([str(ROOT / "benchmarks" / "job_ceiling.py"), "--duration", "0.5", "--rounds", "1"], tmp_path, 110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in map(str.split, proc.stdout.splitlines()) if cells and cells[0] in variants}
    assert set(rows) == set(variants), proc.stdout
    rate = {v: float(rows[v][1].replace(",", "")) for v in variants}
    control = {v: float(rows[v][4]) for v in variants}
    joblog = {v: float(rows[v][5]) for v in variants}
    assert all(r > 0 for r in rate.values()), rate
    # Expect the lean brokers to be the patched ones: the common-path table took no job of theirs
    # and all of the full broker's; the lean+log broker writes its job log, the lean one none
    table = {v: rows[v][9] for v in variants}
    assert table == {"invoke": "no", "full": "yes", "lean+log": "no", "lean": "no"}, table
    assert control["lean"] < control["lean+log"], control
    assert joblog["lean+log"] > 1.0 and joblog["lean"] < 0.5, joblog
