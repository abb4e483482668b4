"""`hl7bridge` commands as child processes for the tests that need a real process
death (kill -9): start one and wait for its `ready` line; stop them all."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterable


def start_cli(args: list[str], *, timeout_s: float = 60.0) -> subprocess.Popen[str]:
    """Run ``hl7bridge ARGS`` in its own session; return once it printed ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("ready "):
                return proc
            if not line and proc.poll() is not None:
                break
    reap(proc, kill=True)
    raise AssertionError(f"hl7bridge {args[0]} did not become ready")


def reap(proc: subprocess.Popen[str], *, kill: bool = False) -> None:
    """Stop (SIGTERM, or SIGKILL with ``kill``), wait, close the pipe."""
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


def reap_all(procs: Iterable[subprocess.Popen[str]]) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        reap(proc)
