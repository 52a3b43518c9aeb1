"""What a bench number was measured on: the commit, the machine and the library versions (stdlib only).

bench/all.py writes these into bench/RESULTS.md so that every figure there says where it came from.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# the libraries whose speed and numerics the benches measure (distribution names, as pip spells them)
VERSIONED = ("torch", "onnxruntime", "onnx", "torch-pruning")

# files bench/all.py itself rewrites: a change to them does not change what is measured
WRITTEN_BY_ALL = ("bench/RESULTS.md", "README.md")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: Path) -> str:
    """'<commit>' plus '(clean)' or '(dirty: paths)': the code measured is the commit only when clean."""
    commit = (_git(root, "rev-parse", "--short=12", "HEAD") or "").strip()
    if not commit:
        return "unknown (not a git checkout)"
    status = _git(root, "status", "--porcelain", "--untracked-files=normal") or ""
    changed = [line[3:].strip() for line in status.splitlines() if line[3:].strip() not in WRITTEN_BY_ALL]
    if not changed:
        return f"{commit} (clean)"
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return f"{commit} (dirty: {shown})"


def _is_relevant_flag(flag: str) -> bool:
    """SIMD and matrix extensions that decide which int8/fp32 kernels ONNX Runtime and torch pick."""
    return flag in ("avx2", "fma") or flag.startswith(("avx512", "amx")) or "vnni" in flag


def cpu_description() -> str:
    """Model name, the relevant flags, and how many logical CPUs exist and this process may use."""
    model, flags = "", list[str]()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:  # Features: ARM's name for them
                    flags = [f for f in value.split() if _is_relevant_flag(f)]
    except OSError:  # not Linux: the name platform gives is all there is
        pass
    model = model or platform.processor() or "unknown CPU"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shown = " ".join(flags) if flags else "none of avx2/avx512/vnni/amx"
    return f"{model}; flags: {shown}; {os.cpu_count()} logical CPUs ({usable} usable)"


def versions() -> str:
    found = []
    for name in VERSIONED:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"python {platform.python_version()}, " + ", ".join(found)


def load_average() -> str:
    """The 1-minute load average: wall times on a shared machine mean little without it."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Provenance:
    """What every section of one run shares: the code, the machine and the libraries it measured."""

    commit: str
    machine: str
    versions: str


def collect(root: Path) -> Provenance:
    return Provenance(git_state(root), cpu_description(), versions())
