"""A SIGTERM, SIGINT or SIGHUP in the first moments of `serve` (imports, the config read):
a clean stop, as the same signal once the gateway has installed its own handlers.

The config file is a FIFO: the test's open for writing returns once `serve` has opened
it to read, so the signal arrives while `serve` is held there, before it could handle
signals itself.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import gateway_config_data

REPO = Path(__file__).resolve().parents[2]
_HANG_GUARD_S = 30.0
_STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
# The `llm-gateway` console script's entry point, as pyproject.toml installs it.
_PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
_SCRIPT_MODULE, _SCRIPT_FUNCTION = _PROJECT["scripts"]["llm-gateway"].split(":")
# `python -m service serve`, and the `llm-gateway` console script (as its wrapper runs it).
_ENTRY_POINTS = {
    "python -m service": ["-m", "service"],
    "llm-gateway": [
        "-c",
        f"import sys; from {_SCRIPT_MODULE} import {_SCRIPT_FUNCTION}; "
        f"sys.exit({_SCRIPT_FUNCTION}())",
    ],
}


async def _open_once_read(fifo: Path, reader: asyncio.subprocess.Process) -> int:
    """`fifo` opened to write, once `reader` has opened it to read (an error if it exits)."""
    while True:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: nobody has it open to read yet
                raise
        else:
            os.set_blocking(writer, True)
            return writer
        assert reader.returncode is None, "serve exited before it read its config"
        await asyncio.sleep(0.01)


async def _serve_with_signal_while_config_is_read(
    tmp_path: Path, entry: list[str], sig: signal.Signals, *args: str
) -> tuple[int, str, str]:
    fifo = tmp_path / "gateway.yaml"
    os.mkfifo(fifo)
    process = await asyncio.create_subprocess_exec(
        sys.executable, *entry, "serve", "--config", str(fifo), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        async with asyncio.timeout(_HANG_GUARD_S):
            writer = await _open_once_read(fifo, process)
        process.send_signal(sig)
        with os.fdopen(writer, "w") as config:
            config.write(yaml.safe_dump(gateway_config_data("http://127.0.0.1:1/v1")))
        async with asyncio.timeout(_HANG_GUARD_S):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("entry", _ENTRY_POINTS, ids=str)
@pytest.mark.parametrize("sig", _STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_signal_while_the_config_is_read_is_a_clean_stop(tmp_path, entry, sig):
    """Status 0, no traceback, and the log line of a stop while starting; nothing served.

    Before, SIGTERM killed the process (status -15, 143 in a shell) and SIGINT ended it
    with KeyboardInterrupt and a traceback; later, SIGHUP killed it (status -1).
    """
    code, out, err = await _serve_with_signal_while_config_is_read(
        tmp_path, _ENTRY_POINTS[entry], sig
    )
    assert code == 0, err
    assert "Traceback" not in err
    assert "listening" not in out
    assert "server.stopped_while_starting" in err


async def test_a_signal_while_the_config_is_read_stops_the_supervisor_cleanly(tmp_path):
    """With `--workers 2` the supervisor stops before starting any worker, with status 0."""
    code, out, err = await _serve_with_signal_while_config_is_read(
        tmp_path, _ENTRY_POINTS["python -m service"], signal.SIGTERM, "--workers", "2"
    )
    assert code == 0, err
    assert "listening" not in out
    assert "workers.stopped_while_starting" in err


# The console script, with the same signal sent again from an object's finalizer: among
# the last moments of the process, once the gateway has stopped, its event loop has closed
# and the interpreter has dropped its own signal handlers (grpc's teardown runs then).
_AGAIN_AT_EXIT = (
    "import os, signal, sys\n"
    "class Again:\n"
    "    def __del__(self):\n"
    "        os.kill(os.getpid(), signal.{sig})\n"
    "again = Again()\n"
    "from service.console import main\n"
    "sys.exit(main())\n"
)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("sig", _STOP_SIGNALS, ids=lambda s: s.name)
async def test_a_signal_again_as_the_stopped_gateway_exits_keeps_its_status_0(
    tmp_path, workers, sig
):
    """A second SIGTERM or Ctrl-C (an impatient operator) landing after the drain, while the
    process exits, does not turn the clean stop into status 143 or 130.

    Before, the event loop's close gave the signals back to their defaults, so it did.
    """
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config_data("http://127.0.0.1:1/v1")))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _AGAIN_AT_EXIT.format(sig=sig.name),
        "serve", "--config", str(path), "--workers", workers,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(_HANG_GUARD_S):
            line = (await process.stdout.readline()).decode()
        assert "listening on" in line
        process.send_signal(sig)
        async with asyncio.timeout(_HANG_GUARD_S):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()


async def test_a_ctrl_c_held_while_a_client_command_started_is_status_130_and_no_call():
    """A Ctrl-C in the first moments of `llm-gateway complete` (held by the console
    script with the rest, while the imports run): status 130, as one during the call, no
    traceback and no call. Before, the CLI raised it as it let the held signals go, and
    the command ended in a KeyboardInterrupt traceback."""
    started = (
        "import signal, sys\n"
        # As Python sets it up in a terminal's foreground: a background job (the test's
        # own runner, started with `&`) begins with SIGINT ignored, and keeps it so.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from service import early_signals\n"
        "early_signals.hold()\n"
        "signal.raise_signal(signal.SIGINT)  # as a Ctrl-C while the imports run\n"
        "from gateway_client.cli import main\n"
        "sys.exit(main(['complete', 'Say hi', '--address', '127.0.0.1:1']))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", started,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    async with asyncio.timeout(_HANG_GUARD_S):
        out, err = await process.communicate()
    # A call to nothing at 127.0.0.1:1 would have said UNAVAILABLE on stderr.
    assert (process.returncode, out, err.decode()) == (130, b"", "")
