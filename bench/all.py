"""Run the benches and write bench/RESULTS.md (and README.md's "Measured figures" block from it).

    python bench/all.py                  # --quick: every bench at smoke settings (at most ~15 minutes on 2 idle cores)
    python bench/all.py --full           # each bench's own defaults, zoo.py too (what `make bench` runs; over an hour)
    python bench/all.py --only export,pruning    # rerun these, keep the other sections of RESULTS.md
    python bench/all.py --dry-run        # print what would run and the time estimate, run nothing

Each bench runs as its own process (python bench/NAME.py ARGS, see bench/_plan.py); its stdout is kept
verbatim in its section with the commit, mode, command, machine, versions and wall time it was measured
with. Progress goes to stderr, with an estimate of the time left from the timings in the RESULTS.md
this run replaces. RESULTS.md and README.md are replaced atomically (temporary file, rename), and
rewritten also when a bench fails (its section says so; exit 1) or on Ctrl-C (what finished is kept).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _provenance
from _plan import BENCHES, Bench, bench_named, benches_for, command_line
from _readme_block import README_PATH, render_block, splice
from _results_file import RESULTS_PATH, RunHeader, Section, parse_sections, raw_sections, render_file, render_section
from _streamed import print_err, run_streamed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.atomic import atomic_write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="smoke settings (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="each bench's defaults, zoo too")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", help="comma-separated bench names; the other sections of RESULTS.md are kept")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the estimate, run nothing")
    args = parser.parse_args(argv)
    known = [b.name for b in BENCHES]
    args.only = [n for n in args.only.split(",") if n] if args.only else None
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"--only: unknown bench {', '.join(unknown)}; known: {', '.join(known)}")
    no_settings = [n for n in args.only or [] if bench_named(n).args(args.mode) is None]
    if no_settings:
        parser.error(f"--only: {', '.join(no_settings)} runs only with --full")
    return args


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Estimate:
    """Time left, from the wall time each bench took in the previous RESULTS.md with the same command."""

    def __init__(self, previous: dict[str, Section], mode: str) -> None:
        self.previous = previous
        self.mode = mode

    def seconds(self, bench: Bench) -> float | None:
        section = self.previous.get(bench.name)
        if section is None or not section.passed or section.command != shlex.join(command_line(bench, self.mode)):
            return None
        return section.wall_seconds

    def left(self, current: Bench | None, elapsed: float, later: list[Bench]) -> str:
        """What is left of `current` (running for `elapsed` seconds) and of the benches `later`."""
        if current is None and not later:
            return "nothing left"
        pending = ([current] if current is not None else []) + later
        timings = {b.name: self.seconds(b) for b in pending}
        total = sum(s for s in timings.values() if s is not None)
        if current is not None and timings[current.name] is not None:
            total -= min(elapsed, timings[current.name] or 0.0)
        unknown = [name for name, s in timings.items() if s is None]
        if len(unknown) == len(pending):
            return "time left unknown (no earlier timing in RESULTS.md for these commands)"
        note = f"~{minutes(total)} left by the last RESULTS.md timings"
        return note + (f" (none for {', '.join(unknown)})" if unknown else "")


def prefixed(label: str) -> Callable[[str], None]:
    """A line printer for one child: `[label m:ss] line` on stderr, the time counted from now."""
    started = time.perf_counter()

    def show(line: str) -> None:
        elapsed = int(time.perf_counter() - started)
        print_err(f"[{label} {elapsed // 60}:{elapsed % 60:02d}] {line}")

    return show


# The demo recipe's references (ResNet-20, ResNet-8; trained once, then cached in ~/.cache/compress), made
# before the benches: otherwise the first bench that needs one is charged with its training.
WARM_REFERENCES = "import _common; _common.reference('resnet20'); _common.reference('resnet8')"


def warm_references() -> str:
    """Train or load the references; a line for the RESULTS.md header."""
    done = run_streamed([sys.executable, "-c", WARM_REFERENCES], ROOT / "bench", prefixed("references"),
                        lambda elapsed: "... still training the reference models")  # fmt: skip
    outcome = "ready" if done.exit_code == 0 else f"FAILED (exit code {done.exit_code}; the benches will say why)"
    return f"{outcome} in {done.seconds:.0f} s, before the benches (not counted in their wall times)"


def run_bench(bench: Bench, mode: str, facts: _provenance.Provenance, quiet_note: Callable[[float], str]) -> Section:
    argv = command_line(bench, mode)
    measured, load = _provenance.utc_now(), _provenance.load_average()
    finished = run_streamed([sys.executable, *argv[1:]], ROOT, prefixed(bench.name), quiet_note)
    output = finished.stdout
    if finished.exit_code != 0:
        output += f"\n(exit code {finished.exit_code}; last lines of stderr:)\n" + "\n".join(finished.stderr_tail) + "\n"
    return Section(
        name=bench.name, command=shlex.join(argv), measured=measured, commit=facts.commit, mode=mode,
        machine=facts.machine, versions=facts.versions, wall_seconds=finished.seconds,
        exit_code=finished.exit_code, load_at_start=load, output=output,
    )  # fmt: skip


def assemble(previous_text: str, fresh: dict[str, Section], header: RunHeader) -> str:
    """The new RESULTS.md: fresh sections and, for benches not rerun, the previous sections verbatim;
    plan order, then any previous section the plan no longer has (kept rather than silently dropped)."""
    kept = raw_sections(previous_text)
    order = [b.name for b in BENCHES] + [name for name in kept if name not in {b.name for b in BENCHES}]
    texts = [render_section(fresh[n]) if n in fresh else kept[n] for n in order if n in fresh or n in kept]
    return render_file(header, texts)


def kept_lines(previous: dict[str, Section], fresh: dict[str, Section]) -> list[str]:
    return [f"{s.name}: {s.mode} mode, {s.measured}, commit {s.commit}" for n, s in previous.items() if n not in fresh]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = benches_for(args.mode, args.only)
    previous_text = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else ""
    try:
        previous = parse_sections(previous_text)
    except ValueError as exc:  # a hand-edited file: no estimate (its sections are still kept as they stand)
        print_err(f"[all] {RESULTS_PATH.name} unreadable ({exc}): no time estimate")
        previous = {}
    estimate = Estimate(previous, args.mode)
    print_err(f"[all] {args.mode} mode, {len(chosen)} benches; {estimate.left(None, 0.0, chosen)}")
    if args.dry_run:
        for bench in chosen:
            last = estimate.seconds(bench)
            print(shlex.join(command_line(bench, args.mode)) + (f"    # last time {last:.0f} s" if last else ""))
        return 0

    facts = _provenance.collect(ROOT)
    run_started, run_date = time.perf_counter(), _provenance.utc_now()
    fresh: dict[str, Section] = {}
    interrupted = False
    references = "not needed" if all(b.name == "zoo" for b in chosen) else warm_references()
    for index, bench in enumerate(chosen):
        later = chosen[index + 1 :]
        command = shlex.join(command_line(bench, args.mode))
        print_err(f"[all] {index + 1}/{len(chosen)} {bench.name}: {command}; {estimate.left(bench, 0.0, later)}")

        def quiet_note(elapsed: float, current: Bench = bench, rest: list[Bench] = later) -> str:
            return f"... still running; {estimate.left(current, elapsed, rest)}"

        try:
            section = run_bench(bench, args.mode, facts, quiet_note)
        except KeyboardInterrupt:
            interrupted = True
            print_err(f"[all] interrupted during {bench.name}: writing the sections that finished")
            break
        fresh[bench.name] = section
        print_err(f"[all] {bench.name}: exit {section.exit_code} in {section.wall_seconds:.0f} s; "
                  f"{estimate.left(None, 0.0, later)}")  # fmt: skip
    if not fresh:
        return 130 if interrupted else 1
    header = RunHeader(
        measured=run_date, commit=facts.commit, mode=args.mode, machine=facts.machine, versions=facts.versions,
        commands=[f"`{s.command}`: {s.wall_seconds:.0f} s, exit {s.exit_code}" for s in fresh.values()],
        kept=kept_lines(previous, fresh), references=references, total_seconds=time.perf_counter() - run_started,
    )  # fmt: skip
    text = assemble(previous_text, fresh, header)
    atomic_write_text(RESULTS_PATH, text)
    print_err(f"[all] wrote {RESULTS_PATH.relative_to(ROOT)} ({header.total_seconds:.0f} s in all)")
    try:
        atomic_write_text(README_PATH, splice(README_PATH.read_text(), render_block(text)))
        print_err(f"[all] rewrote the Measured figures block of {README_PATH.relative_to(ROOT)}")
    except ValueError as exc:
        print_err(f"[all] README.md not updated: {exc}")
    if interrupted:
        return 130
    return 0 if all(s.passed for s in fresh.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
