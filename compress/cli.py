"""The `compress` command line. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 a gate failed."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from compress.errors import CompressError

app = typer.Typer(
    name="compress",
    help="Staged, accuracy-gated model compression for PyTorch, exported to ONNX and TensorRT.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
err_console = Console(stderr=True)
T = TypeVar("T")

def recipes_dir() -> Path:
    """The shipped recipes: next to the package in a checkout, or where COMPRESS_RECIPES points (Docker)."""
    configured = os.environ.get("COMPRESS_RECIPES")
    return Path(configured) if configured else Path(__file__).resolve().parent.parent / "recipes"


def guarded(fn: Callable[[], T]) -> T:
    """Turn our own errors into one line and the right exit code; leave real bugs their traceback."""
    try:
        return fn()
    except CompressError as exc:
        label = "gate failed" if exc.exit_code == 3 else "error"
        err_console.print(f"[bold red]{label}:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: finished stages are kept; rerun with --resume to continue")
        raise typer.Exit(130) from None


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="run directory (default: runs/NAME)")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="reuse finished stages whose recipe section is unchanged")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="override the recipe's seed")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="allow checkpoints that need full unpickling (runs code from the file)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def _run(recipe: Path, out: Path | None, resume: bool, device: str, seed: int | None, trust: bool, quiet: bool) -> None:
    from compress.runner import RunOptions, run_recipe

    options = RunOptions(out=out, resume=resume, device=device, seed=seed, trust_checkpoint=trust, quiet=quiet)
    guarded(lambda: run_recipe(recipe, options))


@app.command()
def run(
    recipe: RecipeArg,
    out: OutOpt = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = None,
    trust_checkpoint: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: baseline, stages with gates, export, report."""
    _run(recipe, out, resume, device, seed, trust_checkpoint, quiet)


@app.command()
def demo(
    out: OutOpt = None,
    resume: ResumeOpt = True,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """The default recipe end to end: ResNet-20 on real MNIST digits, channel pruning, AdaRound W8A8, int8 ONNX."""
    _run(recipes_dir() / "mnist-resnet20-demo.yaml", out, resume, device, None, False, quiet)


@app.command()
def analyze(
    recipe: RecipeArg,
    stage: Annotated[str | None, typer.Option("--stage", help="the stage to analyse (default: every prune/quantize stage)")] = None,
    out: OutOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Per-layer sensitivity of a stage (metric drop with only that layer pruned/quantized): table and chart."""
    from compress.analyze import analyze_recipe
    from compress.runner import RunOptions

    guarded(lambda: analyze_recipe(recipe, RunOptions(out=out, device=device, quiet=quiet), stage))


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe's schema and references (model, checkpoint, data, metric) without running it."""

    def check() -> None:
        from compress.validate import validate_recipe

        validate_recipe(recipe)

    guarded(check)
    Console().print(f"{recipe}: ok")


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="a stage checkpoint (.pt/.safetensors) or an .onnx file")],
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="recipe giving the model and data")],
    split: Annotated[str, typer.Option(help="val or test")] = "test",
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Metric of a checkpoint or an ONNX file on the recipe's data."""

    def score() -> Any:
        from compress.evaluate import evaluate_file

        return evaluate_file(model, recipe, split=split, trust=trust_checkpoint)

    value = guarded(score)
    Console().print(f"{model}: {split} metric {value:.4f}")


@app.command("export")
def export_command(
    checkpoint: Annotated[Path | None, typer.Argument(help="a stage checkpoint (not available yet: use compress run)", show_default=False)] = None,
    lint: Annotated[Path | None, typer.Option("--lint", help="check an ONNX file against TensorRT's Q/DQ rules")] = None,
) -> None:
    """Lint an ONNX file for TensorRT: exit 0 when clean, 3 when a rule is broken (like a failed gate)."""
    from compress.errors import BadInput, GateFailed

    def check() -> None:
        if lint is None:
            raise BadInput(
                "compress export: exporting a checkpoint outside a run is not available yet "
                "(compress run exports); use --lint MODEL.onnx to check a file"
            )
        if checkpoint is not None:
            raise BadInput("compress export: give either CHECKPOINT or --lint MODEL.onnx, not both")
        from export.errors import ExportError
        from export.lint import lint_onnx

        try:
            findings = lint_onnx(lint)
        except ExportError as exc:
            raise BadInput(str(exc)) from None
        for finding in findings:
            Console(soft_wrap=True).print(str(finding), highlight=False, markup=False)
        if findings:
            raise GateFailed(f"{lint}: {len(findings)} finding(s) against TensorRT's explicit-quantization rules")
        Console().print(f"{lint}: clean (TensorRT explicit-quantization rules)", highlight=False)

    guarded(check)


@app.command()
def gate(
    report: Annotated[Path | None, typer.Argument(help="a run's report.json", show_default=False)] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", "-b", help="baseline JSON to compare with")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="also write JUnit XML, one test case per check")] = None,
    tolerance: Annotated[
        list[str] | None,
        typer.Option("--tolerance", "-t", help="KEY=VALUE: metric (abs), size (rel), latency (rel), sparsity (abs)"),
    ] = None,
    write_baseline: Annotated[Path | None, typer.Option("--write-baseline", help="make a baseline from this report")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where --write-baseline writes")] = None,
) -> None:
    """CI regression gate: exit 0 when every check holds against the baseline, 3 when any fails."""
    from rich.table import Table

    from compress import regression
    from compress.errors import BadInput, GateFailed

    def check() -> None:
        if write_baseline is not None:
            if out is None:
                raise BadInput("--write-baseline needs --out BASELINE.json")
            regression.write_baseline(write_baseline, out)
            Console().print(f"baseline written: {out}")
            return
        if report is None or baseline is None:
            raise BadInput("gate needs REPORT and --baseline BASELINE.json (or --write-baseline REPORT --out FILE)")
        checks = regression.run_gate(report, baseline, tolerance or [], junit)
        table = Table(title=f"compress gate: {report}")
        for column in ("check", "value", "baseline", "tolerance", "verdict"):
            table.add_column(column, justify="left" if column == "check" else "right")
        for c in checks:
            table.add_row(c.name, _fmt(c.value), _fmt(c.baseline), c.tolerance, "pass" if c.passed else "FAIL",
                          style=None if c.passed else "red")
        Console(width=max(120, Console().width)).print(table)
        failed = [c.name for c in checks if not c.passed]
        if failed:
            raise GateFailed(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
        Console().print(f"all {len(checks)} checks passed")

    guarded(check)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one run directory to redraw, or several to compare")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where a comparison is written")] = Path("comparison"),
) -> None:
    """Regenerate report.md, report.html and plots from report.json; with several runs, compare them."""
    from compress.regression import read_json
    from compress.report import render_reports, write_comparison

    def make() -> None:
        reports = {str(d): read_json(d / "report.json", "report") for d in run_dirs}
        if len(run_dirs) == 1:
            made = render_reports(reports[str(run_dirs[0])], run_dirs[0])
            Console().print(f"wrote {run_dirs[0] / 'report.md'}, report.html and {len(made)} plots")
            return
        made = write_comparison(reports, out, Console(width=160))
        Console().print("wrote " + ", ".join(str(p) for p in made))

    guarded(make)


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def main() -> int:
    """Entry point: flag mistakes become one line and exit 2, like every other bad input."""
    usage_error, exit_types, abort_types = _cli_exceptions()
    try:
        result = app(standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        name = ctx.command.name if ctx is not None else None
        where = f"compress {name}" if name and name != "compress" else "compress"
        message = exc.format_message()
        if message:  # empty when the help text was shown instead (bare `compress`)
            err_console.print(f"[bold red]error:[/] {where}: {message}", highlight=False, soft_wrap=True)
        return 2
    except exit_types as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except abort_types:
        err_console.print("aborted")
        return 130
    return result if isinstance(result, int) else 0


def _cli_exceptions() -> tuple[type[Exception], tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Typer >= 0.20 vendors click as typer._click; older releases use click itself."""
    try:
        from typer._click import exceptions as click_exceptions
    except ImportError:
        import click.exceptions as click_exceptions  # type: ignore[no-redef]
    return (
        click_exceptions.UsageError,
        (typer.Exit, click_exceptions.Exit) if hasattr(click_exceptions, "Exit") else (typer.Exit,),
        (typer.Abort, click_exceptions.Abort) if hasattr(click_exceptions, "Abort") else (typer.Abort,),
    )


if __name__ == "__main__":
    sys.exit(main())
