"""export/tensorrt.py type-checks against TensorRT 10.13's Python API (tensorrt-stubs).

TensorRT cannot be installed on these machines, so this is what checks that every class, flag, attribute
and method the builder uses exists with that signature. tensorrt-stubs as published cannot be used by
mypy directly: it installs tensorrt/__init__.pyi without a py.typed marker (mypy skips it), and its
generated stubs have syntax mypy rejects (parameters named `in`, a required parameter after defaulted
ones) plus a module-level `bool` that shadows the builtin in every annotation. The fixture copies them
and repairs exactly those defects; nothing is made lenient: no ignore_missing_imports, and a probe file
with a misspelt flag must fail.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _split_params(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _repair_def(line: str) -> str:
    match = re.match(r"^(\s*def \w+\()(.*)(\)(?: -> .*)?:\s*(?:\.\.\.)?)$", line)
    if not match:
        return line
    fixed, seen_default = [], False
    for param in _split_params(match.group(2)):
        name = param.strip().split(":")[0].split("=")[0].strip()
        if name == "in":
            param = param.replace("in", "in_", 1)
        if "=" in param:
            seen_default = True
        elif seen_default and name and not name.startswith("*"):
            param += " = ..."
        fixed.append(param)
    return match.group(1) + ",".join(fixed) + match.group(3)


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their mtime, so mypy's cache stays valid from one test run to the next.
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(scope="session")
def stub_dir() -> Path:
    try:
        files = importlib.metadata.files("tensorrt-stubs") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (make install adds it)")
    # A fixed, git-ignored place rather than a temporary one: a cold mypy run over the stubs, numpy and
    # onnx takes tens of seconds on two shared cores, a warm one about two.
    out = REPO / ".cache" / "mypy-tensorrt"
    for entry in files:
        if entry.suffix != ".pyi":
            continue
        lines = [
            _repair_def(line)
            for line in Path(entry.locate()).read_text().splitlines()
            if not re.match(r"^(bool: |from tensorrt_bindings(\.tensorrt)? import bool$)", line)
        ]
        _write_if_changed(out / "stubs" / str(entry), "\n".join(lines) + "\n")
    # imported by tensorrt/__init__.pyi, and has no stubs of its own
    _write_if_changed(out / "stubs" / "tensorrt_libs" / "__init__.pyi", "")
    # ignore_errors silences complaints *inside* the stubs only; uses of them are still checked.
    _write_if_changed(
        out / "mypy.ini",
        f"[mypy]\nstrict = True\nmypy_path = {out / 'stubs'}\n"
        "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*,tensorrt_libs]\nignore_errors = True\n",
    )
    return out


def _mypy(stub_dir: Path, target: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(stub_dir / "mypy.ini"),
         "--cache-dir", str(stub_dir / ".mypy_cache"), "--no-error-summary", str(target)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "MYPYPATH": ""},
    )


def test_mypy_catches_a_wrong_tensorrt_name(stub_dir: Path) -> None:
    probe = stub_dir / "probe.py"
    _write_if_changed(probe, 
        "import tensorrt as trt\n"
        "config = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config()\n"
        "config.set_flag(trt.BuilderFlag.SPARSE_WEIGHT)\n",
    )
    result = _mypy(stub_dir, probe)
    assert result.returncode != 0
    assert 'has no attribute "SPARSE_WEIGHT"' in result.stdout


def test_tensorrt_builder_passes_mypy_against_the_stubs(stub_dir: Path) -> None:
    result = _mypy(stub_dir, REPO / "export" / "tensorrt.py")
    assert result.returncode == 0, result.stdout + result.stderr
