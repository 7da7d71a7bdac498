"""`make test`'s scheduler: a worker that dies mid-run is one failed test, and the run ends.

Each case runs a real pytest with two xdist workers over a small suite in which one test
kills its worker (SIGSEGV, as the C extension that crashed a CI run did). With xdist's own
`loadgroup` scheduler these runs never end (the subprocess is then killed at its timeout,
failing the test) or fail the crashing test once per restart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_CONFTEST = """
from tests.xdist_recovery import make_scheduler

def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log)
"""

_CRASH = """
import os, signal

def test_crash():
    os.kill(os.getpid(), signal.SIGSEGV)
"""


def _run(folder: Path, *arguments: str) -> tuple[dict[str, int], str]:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts="]
    command += ["-n", "2", "--dist", "loadgroup", "--rootdir", str(folder), *arguments, str(folder)]
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env=environment,
        cwd=folder,
    )
    output = done.stdout + done.stderr
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed)", output)}
    return counts, output


def _suite(folder: Path, files: dict[str, str]) -> Path:
    (folder / "conftest.py").write_text(_CONFTEST)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_a_crash_after_finished_groups_fails_one_test_and_the_run_ends(tmp_path: Path) -> None:
    # Many one-test groups finished by the worker before it dies: xdist queued them again
    # as empty batches and the run waited at its end forever.
    passing = "\n".join(f"def test_pass_{n}():\n    pass\n" for n in range(40))
    folder = _suite(tmp_path, {"test_many.py": passing, "test_zz_crash.py": _CRASH})

    counts, output = _run(folder)

    assert counts == {"failed": 1, "passed": 40}, output
    assert "test_zz_crash.py::test_crash" in output
    assert "crashed" in output


def test_the_crashing_test_runs_once(tmp_path: Path) -> None:
    # xdist ran it again on every replacement worker until its restarts were spent.
    passing = "\n".join(f"def test_after_{n}():\n    pass\n" for n in range(3))
    folder = _suite(tmp_path, {"test_a_crash.py": _CRASH, "test_b_after.py": passing})

    counts, output = _run(folder, "--max-worker-restart", "4")

    assert counts == {"failed": 1, "passed": 3}, output


def test_a_crash_in_a_group_runs_the_rest_of_the_group(tmp_path: Path) -> None:
    grouped = (
        "import os, signal, pytest\n"
        "pytestmark = pytest.mark.xdist_group('shared')\n"
        "def test_first():\n    pass\n"
        "def test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def test_last():\n    pass\n"
    )
    passing = "\n".join(f"def test_other_{n}():\n    pass\n" for n in range(5))
    folder = _suite(tmp_path, {"test_group.py": grouped, "test_other.py": passing})

    counts, output = _run(folder)

    assert counts == {"failed": 1, "passed": 7}, output
    assert re.search(r"test_group\.py::test_crash", output), output
