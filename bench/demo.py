"""The demo (`make demo`): recipes/mnist-resnet20-demo.yaml end to end, what compression buys on this CPU.

Runs the recipe into a temporary directory with nothing resumed (the reference model comes from
~/.cache/compress, trained there on first use) and prints its stage table, its export table (the original
model's fp32 file first, every file timed in ONNX Runtime in alternating rounds) and the headline line
that `make demo` ends with. The acceptance of issue 17: at least 3x smaller and 1.5x faster at batch 64
than the original file, within 1 point of its test accuracy.

    python bench/demo.py
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from _common import ROOT  # noqa: E402  (puts the repository on sys.path)
from compress.report import EXPORT_COLUMNS, STAGE_COLUMNS, export_rows, headline_text, markdown_table, stage_rows
from compress.runner import RunOptions, run_recipe

DEMO = ROOT / "recipes" / "mnist-resnet20-demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEMO)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own summary: the tables below say it
            report = run_recipe(args.recipe, RunOptions(out=Path(tmp) / "run", resume=False, quiet=True))
        seconds = time.perf_counter() - started
    print(f"## {args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}: "
          f"{report['status']} in {seconds:.0f} s (reference model from the cache)\n")  # fmt: skip
    print(markdown_table(STAGE_COLUMNS, stage_rows(report)))
    print()
    print(markdown_table(EXPORT_COLUMNS, export_rows(report)))
    print()
    if report.get("headline"):
        print(f"headline: {headline_text(report['headline'])}")


if __name__ == "__main__":
    main()
