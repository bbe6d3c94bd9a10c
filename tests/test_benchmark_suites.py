"""The pytest-benchmark suites in ``benchmarks/`` run in CI too, timing off: every case once, on
both cores, with its assertions (docs/benchmarks.md quotes their ratios; this keeps them
runnable). Timing them is for ``pytest benchmarks/``, not for the test suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_case_runs_once_and_holds(tmp_path: Path) -> None:
    suites = str(ROOT / "benchmarks")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", suites, "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # Expect every suite collected: both cores of the codec, data plane, calls and record cases
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed is not None and int(passed.group(1)) >= 40, proc.stdout[-2000:]
    assert " failed" not in proc.stdout and " skipped" not in proc.stdout
