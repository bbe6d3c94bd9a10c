"""Short runs of the coverage-guided fuzz harnesses: the frame codec (fuzz/fuzz_decoders.py) and
what clients and agents do with received batches (fuzz/fuzz_receivers.py), each with proof that
it can fail (a bug planted in a pure twin must be found), and the broker's HELLO / QUERY handling
(fuzz/fuzz_control.py). The long runs are in docs/security.md ("Fuzzing").

atheris is a test dependency wherever it publishes wheels (Linux x86_64, CPython < 3.14, as the
marker in pyproject.toml says); there its absence is a failure, elsewhere the tests skip.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "fuzz_decoders.py"
CONTROL = ROOT / "fuzz" / "fuzz_control.py"
RECEIVERS = ROOT / "fuzz" / "fuzz_receivers.py"
SEEDS = ROOT / "fuzz" / "corpus"
RUN_SECONDS = 8
MIN_RUNS = 5_000  # ~40k runs/s on an idle core; a loaded 2-core CI machine still does far more

WHEELS = sys.platform == "linux" and platform.machine() == "x86_64" and sys.version_info < (3, 14)
if importlib.util.find_spec("atheris") is None:
    if WHEELS:
        pytest.fail("atheris is not installed: `pip install .[test]` installs it on this platform", pytrace=False)
    pytest.skip("atheris publishes no wheel for this platform", allow_module_level=True)


def run_harness(
    tmp_path: Path, *args: str, plant: bool = False, timeout: float = 90, harness: Path = HARNESS
) -> tuple[int, str]:
    """Run a harness in a child process (atheris.Fuzz never returns); (exit code, output)."""
    env = subprocess_env(ORBITMESH_FUZZ_PLANT="1" if plant else "0")
    env.pop("ORBITMESH_NO_EXTENSIONS", None)  # the harness compares the compiled twin with the pure one
    proc = subprocess.run(
        [sys.executable, str(harness), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(errors="replace")


def runs_done(out: str) -> int:
    """How many inputs a harness run that ended by itself went through (libFuzzer's last line)."""
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert done is not None, out[-3000:]
    return int(done.group(1))


def corpus_copy(tmp_path: Path) -> Path:
    """The seed corpus, copied: libFuzzer writes new inputs into its first corpus directory."""
    corpus = tmp_path / "corpus"
    shutil.copytree(SEEDS, corpus)
    return corpus


def test_seed_corpus_has_every_target():
    targets = {p.read_bytes()[0] % 4 for p in SEEDS.iterdir()}
    assert targets == {0, 1, 2, 3}
    headers = [p.read_bytes()[2:] for p in SEEDS.iterdir() if p.name.startswith("header-kind")]
    assert sorted(h[3] for h in headers) == list(range(1, 17))  # a valid header of every kind


def test_short_fuzz_run_finds_nothing(tmp_path):
    corpus = corpus_copy(tmp_path)
    # Given the harness fuzzing for a fixed time from the seed corpus
    rc, out = run_harness(
        tmp_path,
        f"-max_total_time={RUN_SECONDS}",
        "-seed=1",
        "-rss_limit_mb=1024",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    )
    # Expect it to end by itself, cleanly, having run many inputs
    assert rc == 0, out[-3000:]
    assert runs_done(out) >= MIN_RUNS, out[-3000:]
    assert not list(tmp_path.glob("crash-*"))
    # ... and coverage feedback at work: the corpus grew beyond the seeds
    assert len(list(corpus.iterdir())) > len(list(SEEDS.iterdir()))


def test_planted_bug_is_found_and_the_crash_replays(tmp_path):
    corpus = corpus_copy(tmp_path)
    # Given a bug planted in the pure twin (its reserved-field check skips byte 15)
    rc, out = run_harness(
        tmp_path,
        "-max_total_time=30",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
        plant=True,
    )
    # Expect the harness to fail on an input that shows it, and save that input
    assert rc != 0, out[-3000:]
    assert "Disagreement" in out and "BAD_HEADER_FIELD" in out, out[-3000:]
    crashes = list(tmp_path.glob("crash-*"))
    assert len(crashes) == 1, out[-3000:]
    data = crashes[0].read_bytes()
    assert data[0] % 4 == 0 and len(data) == 42 and data[2 + 15] and not any(data[2 + 12 : 2 + 15])
    # When the saved input is replayed without the planted bug, Expect it to pass: it only shows the plant
    rc, out = run_harness(tmp_path, str(crashes[0]))
    assert rc == 0, out[-3000:]
    assert re.search(r"Executed .*crash-", out), out[-3000:]


def test_short_control_fuzz_run_finds_nothing(tmp_path):
    corpus = tmp_path / "control-corpus"
    corpus.mkdir()
    # Given HELLO and QUERY bodies built by the fuzzer, sent to a live broker for a fixed time
    rc, out = run_harness(
        tmp_path,
        "-max_total_time=5",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
        harness=CONTROL,
    )
    # Expect every one answered with a known code, nothing logged, and a meaningful number of them
    assert rc == 0, out[-3000:]
    runs = runs_done(out)
    assert runs >= 1_000, out[-3000:]
    # Coverage feedback from the broker's bytecode: without it (the harness with its
    # instrument_func calls removed) 26k runs wrote no entry; with it, 22 - 28 in 15k - 26k runs
    # here, and 17 once under a loaded full suite.
    found = len(list(corpus.iterdir()))
    assert found >= 10, f"{found} corpus entries after {runs} runs"


def test_short_receivers_fuzz_run_finds_nothing_and_a_planted_bug_is_found(tmp_path):
    corpus = tmp_path / "receivers-corpus"
    corpus.mkdir()
    # Given random batches for the client's call table and the agent's dispatcher, both twins
    rc, out = run_harness(
        tmp_path, "-max_total_time=5", "-seed=1", f"-artifact_prefix={tmp_path}/", str(corpus), harness=RECEIVERS
    )
    # Expect no exception and no disagreement over many batches, and the corpus grown
    assert rc == 0, out[-3000:]
    assert runs_done(out) >= MIN_RUNS, out[-3000:]
    assert len(list(corpus.iterdir())) >= 10
    # When the pure dispatcher reads the TRACKED flag as a serializer bit, Expect the harness to say so
    rc, out = run_harness(
        tmp_path,
        "-max_total_time=30",
        "-seed=1",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
        harness=RECEIVERS,
        plant=True,
    )
    assert rc != 0 and "Disagreement: agent" in out, out[-3000:]
    assert list(tmp_path.glob("crash-*"))
