"""Which benches bench/all.py runs, in which order, with which arguments per mode.

quick: the whole set within about 15 minutes on 2 idle cores (each bench's smoke settings, narrowed
where its own --quick still took too long); full: each bench's own defaults, what `make bench` runs.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("quick", "full")


@dataclass(frozen=True)
class Bench:
    name: str  # the section name in bench/RESULTS.md and the script bench/NAME.py
    quick: tuple[str, ...] | None  # arguments in --quick mode; None: not run in --quick
    full: tuple[str, ...]

    @property
    def script(self) -> str:
        return f"bench/{self.name}.py"

    def args(self, mode: str) -> tuple[str, ...] | None:
        return self.quick if mode == "quick" else self.full


BENCHES: tuple[Bench, ...] = (
    # what `make demo` prints, measured without resuming anything (the reference from the cache)
    Bench("demo", (), ()),
    # the CI recipes at 2 vs 1 threads: what .ci/run's metric tolerance must cover
    Bench("ci_variation", ("--trained", "channels,2to4"), ("--trained", "channels,2to4,ap")),
    Bench("distill", ("--quick",), ()),
    Bench("export", ("--quick",), ()),
    Bench("pruning", ("--quick",), ()),
    # --quick's ResNet-8 settings plus W8A8, where ONNX Runtime's quantize_static is the peer; AIMET is
    # left out (it installs a second environment with pip and runs minutes per width)
    Bench("quantization", ("--models", "resnet8", "--iterations", "100", "--seeds", "1", "--bits", "8,4,3", "--no-aimet"), ()),
    # no --quick of its own: fewer AdaRound steps and calibration images than its defaults (200, 512)
    Bench("mixed_precision", ("--iterations", "50", "--calibration", "256"), ()),
    # all-MiniLM-L6-v2's fp32 export against ONNX Runtime's quantize_dynamic/quantize_static (issue 19's peers)
    Bench("hf", ("--quick",), ()),
    Bench("zoo", None, ()),
    # the task recipes (segmentation, detector head) at W8A8 and W4A8: references train on first use
    # (about 10 minutes for the detector on 2 cores), so only with --full
    Bench("tasks", None, ()),
)


def bench_named(name: str) -> Bench:
    return next(b for b in BENCHES if b.name == name)


def benches_for(mode: str, only: list[str] | None = None) -> list[Bench]:
    """The benches a run executes, in plan order; `only` narrows them (names checked by the caller)."""
    chosen = [b for b in BENCHES if b.args(mode) is not None]
    if only is not None:
        chosen = [b for b in BENCHES if b.name in only]
    return chosen


def command_line(bench: Bench, mode: str) -> list[str]:
    """The command as RESULTS.md records it: what to type from the repository root to measure it again."""
    args = bench.args(mode)
    if args is None:
        raise ValueError(f"{bench.name} has no {mode} settings")
    return ["python", bench.script, *args]
