"""Run one bench as a child process: keep its stdout (the tables), show both streams live on stderr.

A bench prints its table at the end, minutes after it starts: the person waiting sees each line as it
comes (prefixed with the bench and the time since it started), and a heartbeat when it is quiet.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

STDERR_TAIL_LINES = 30  # kept for the section of a bench that failed


@dataclass(frozen=True)
class Finished:
    exit_code: int
    stdout: str
    stderr_tail: list[str]
    seconds: float


def _pump(stream: IO[str], sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line.rstrip())  # trailing spaces dropped: invisible, and editors strip them from copies


def run_streamed(
    argv: list[str],
    cwd: Path,
    show: Callable[[str], None],
    quiet_note: Callable[[float], str],
    quiet_after: float = 60.0,
) -> Finished:
    """Run argv in cwd; every output line goes to show(line) as it arrives; after quiet_after seconds
    without output, show(quiet_note(elapsed)) (and again after each further quiet_after)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines as they are printed, not when a buffer fills
    started = time.perf_counter()
    last_line = [started]
    stdout: list[str] = []
    stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    lock = threading.Lock()

    def sink(kept: list[str] | collections.deque[str]) -> Callable[[str], None]:
        def take(line: str) -> None:
            with lock:
                kept.append(line)
                last_line[0] = time.perf_counter()
                show(line)

        return take

    child = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, sink(stdout)), daemon=True),
        threading.Thread(target=_pump, args=(child.stderr, sink(stderr_tail)), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        while child.poll() is None:
            time.sleep(0.5)
            with lock:
                if time.perf_counter() - last_line[0] >= quiet_after:
                    show(quiet_note(time.perf_counter() - started))
                    last_line[0] = time.perf_counter()
    except KeyboardInterrupt:
        child.terminate()
        child.wait()
        raise
    for pump in pumps:
        pump.join()
    return Finished(child.returncode, "\n".join(stdout) + "\n", list(stderr_tail), time.perf_counter() - started)


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
