"""How far the CI recipes' gated metrics move between runs that differ only in floating-point rounding.

Each recipes/ci-*.yaml runs twice, at 2 and at 1 torch thread (OMP_NUM_THREADS; another CPU's kernels
round differently in the same way), in subprocesses with nothing resumed and a fresh model cache each.
Every metric `compress gate` checks (stage metrics on the validation split, exported files' test
metrics) is compared between the two runs: the largest difference is what .ci/run's metric tolerance
must cover. `--trained` names recipes to measure again with their reference trained in the run
(15 epochs) instead of loaded from recipes/checkpoints/, which is why the CI recipes load one.

    python bench/ci_variation.py [--recipes channels,2to4,ap] [--trained channels,2to4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _common import ROOT  # noqa: E402  (puts the repository on sys.path)
from compress.regression import DEFAULT_TOLERANCES, compare, make_baseline

THREADS = (2, 1)
TRAINED_REFERENCE = {"epochs": 15, "lr": 0.1, "shift": 2, "schedule": "onecycle"}  # how the checkpoint was made


def run(recipe: Path, out: Path, threads: int, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COMPRESS_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "compress.cli", "run", str(recipe), "--out", str(out), "--no-resume", "--quiet"]
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def with_trained_reference(recipe: Path, out: Path) -> Path:
    raw = yaml.safe_load(recipe.read_text())
    raw["model"].pop("checkpoint")
    raw["model"]["train"] = TRAINED_REFERENCE
    path = out / f"{recipe.stem}-trained.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def gated_values(first: dict, second: dict, kind: str) -> list[tuple[str, float, float]]:
    """(check, value in `first`, value in `second`) for every check of `kind` (metric, latency) compress
    gate makes of `second` against a baseline made from `first`."""
    checks = compare(second, make_baseline(first), DEFAULT_TOLERANCES)
    return [(c.name, c.baseline, c.value) for c in checks if f": {kind}" in c.name and c.value is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="channels,2to4,ap", help="which recipes/ci-NAME.yaml")
    parser.add_argument("--trained", default="2to4", help="recipes also measured with a reference trained in the run")
    args = parser.parse_args()
    variants = [(name, "committed checkpoint") for name in args.recipes.split(",") if name]
    variants += [(name, "trained in the run") for name in args.trained.split(",") if name]
    print(f"| recipe | reference | check | {THREADS[0]} threads | {THREADS[1]} thread | difference |")
    print("|---|---|---|---|---|---|")
    largest: dict[str, float] = {}
    latency_change = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, reference in variants:
            recipe = ROOT / "recipes" / f"ci-{name}.yaml"
            if reference == "trained in the run":
                recipe = with_trained_reference(recipe, Path(tmp))
            reports = [
                run(recipe, Path(tmp) / f"{recipe.stem}-t{t}", t, Path(tmp) / f"cache-{recipe.stem}-t{t}") for t in THREADS
            ]
            if any(r["status"] != "passed" for r in reports):
                print(f"| ci-{name} | {reference} | run status | {reports[0]['status']} | {reports[1]['status']} | - |")
                continue
            for check, a, b in gated_values(*reports, "metric"):
                difference = 100 * (b - a)
                largest[reference] = max(largest.get(reference, 0.0), abs(difference))
                print(f"| ci-{name} | {reference} | {check} | {100 * a:.1f}% | {100 * b:.1f}% | {difference:+.1f} pt |")
            for check, a, b in gated_values(*reports, "latency"):
                latency_change = max(latency_change, abs(b / a - 1))
    print()
    for reference, points in largest.items():
        print(f"largest metric difference between {THREADS[0]} and {THREADS[1]} threads, reference {reference}: "
              f"{points:.1f} pt")  # fmt: skip
    print(f"largest change of a gated latency ratio between two runs (ONNX Runtime at 2 threads in both): "
          f"{100 * latency_change:.0f}%")  # fmt: skip


if __name__ == "__main__":
    main()
