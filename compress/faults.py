"""Named pause points for crash-safety tests.

A test sets COMPRESS_PAUSE_AT to a point's name (fnmatch pattern) and COMPRESS_PAUSE_MARKER to a file; the
run writes the marker and stops there until the test SIGKILLs it. This makes "killed exactly while the
checkpoint is half-written" reproducible instead of a race. Unset (always, outside tests), it costs one
environment lookup.
"""
from __future__ import annotations

import os
import time
from fnmatch import fnmatch
from pathlib import Path


def pause_point(name: str) -> None:
    target = os.environ.get("COMPRESS_PAUSE_AT")
    if not target or not fnmatch(name, target):
        return
    marker = os.environ.get("COMPRESS_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(name)
    while True:  # until the test kills the process
        time.sleep(60)
