"""README.md against the code: its `compress` command lines parse, the cheap ones run, the recipes it names
exist and validate, and the figures it quotes are bench/RESULTS.md's (issue 17: numbers that cannot go stale).

Command lines are taken from the README's code blocks (fenced without a language or in a shell, and
4-space indented), including `torchrun ... -m compress.cli ARGS` and `docker run ... compress:TAG ARGS`.
A synopsis such as `compress run RECIPE [--out DIR] [--device cpu|cuda]` is checked with its optional
parts left out and put in, once per alternative; UPPERCASE words are placeholders and get sample values.
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from compress.cli import _cli_exceptions, app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
sys.path.append(str(ROOT / "bench"))  # appended: bench/export.py must not shadow the export package

from _plan import benches_for  # noqa: E402
from _readme_block import current_block, render_block  # noqa: E402
from _results_file import RESULTS_PATH, parse_sections  # noqa: E402

UsageError = _cli_exceptions()[0]
runner = CliRunner()
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}


# -- finding the command lines ------------------------------------------------------------------------


def code_blocks(markdown: str) -> list[str]:
    """The text of each shell-like fenced block and each 4-space indented block (CommonMark: an indented
    block starts after a blank line, outside fences)."""
    blocks: list[str] = []
    fence: str | None = None
    language = ""
    current: list[str] = []
    indented: list[str] = []
    previous_blank = True
    for line in markdown.splitlines():
        if fence is not None:
            if line.strip() == fence:
                if language in SHELL_LANGUAGES:
                    blocks.append("\n".join(current))
                fence, current = None, []
            else:
                current.append(line)
            continue
        opened = re.match(r"^(`{3,})\s*([\w-]*)\s*$", line)
        if opened:
            fence, language = opened.group(1), opened.group(2).lower()
            continue
        if line.startswith("    ") and (indented or previous_blank):
            indented.append(line[4:])
        elif line.strip() and indented:
            blocks.append("\n".join(indented))
            indented = []
        previous_blank = not line.strip()
    if indented:
        blocks.append("\n".join(indented))
    return blocks


def compress_args(line: str) -> str | None:
    """The arguments of the compress invocation on a line, or None when the line runs no compress."""
    line = re.split(r"\s#", line, maxsplit=1)[0]  # a shell comment
    line = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]  # a description column after two spaces
    for pattern in (r"^compress\s+(.*)$", r"-m compress\.cli\s+(.*)$", r"^docker run .*?compress:\S+\s+(.*)$"):
        found = re.search(pattern, line)
        if found:
            return found.group(1)
    return None


def readme_commands(markdown: str = README) -> list[str]:
    commands = []
    for block in code_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():  # shell continuation lines joined
            args = compress_args(line)
            if args is not None:
                commands.append(args)
    return commands


# -- a synopsis to concrete argument lists -------------------------------------------------------------

SAMPLES = {"N": "1", "KEY=VALUE": "metric=0.01", "NAME": "prune"}


def _placeholder(token: str) -> str:
    """RECIPE -> recipe, MODEL.onnx -> model.onnx, N -> 1: a value of the right kind for parsing."""
    return SAMPLES.get(token, token.lower())


def _is_placeholder(token: str) -> bool:
    return token in SAMPLES or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[\w]+)?", token) is not None


def _alternatives(token: str) -> list[str]:
    """`cpu|cuda` and `--resume/--no-resume` -> each spelling; anything else -> itself."""
    if token.startswith("--") and "/--" in token:
        return token.split("/")
    return token.split("|") if "|" in token else [token]


def expand(synopsis: str) -> list[list[str]]:
    """Concrete argument lists for a synopsis: every optional [group] left out, then all put in, once per
    alternative spelling; `...` (repeat) is dropped, placeholders get sample values."""
    tokens = re.findall(r"\[[^\]]*\]|\S+", synopsis)
    required = [t for t in tokens if not t.startswith("[")]
    everything = [part for t in tokens for part in (t[1:-1].split() if t.startswith("[") else [t])]
    variants: list[list[str]] = []
    for chosen in (required, everything):
        spellings = [_alternatives(t) for t in chosen if t != "..."]
        for i in range(max((len(s) for s in spellings), default=1)):
            argv = [s[min(i, len(s) - 1)] for s in spellings]
            variants.append([_placeholder(t) if _is_placeholder(t) else t for t in argv])
    unique = {tuple(v): v for v in variants}
    return list(unique.values())


def parse(argv: list[str]) -> dict:
    """Parse argv as `compress argv` would, without running it; UsageError for an unknown subcommand or
    option, a missing argument or a value of the wrong type."""
    root = typer.main.get_command(app)
    parent = root.context_class(root, info_name="compress")
    command = root.get_command(parent, argv[0]) if argv else None  # type: ignore[attr-defined]
    if command is None:
        raise UsageError(f"no such command: {argv[:1]}")
    return command.make_context(argv[0], argv[1:], parent=parent).params


# -- the tests -------------------------------------------------------------------------------------------

COMMANDS = readme_commands()


def test_the_readme_shows_every_subcommand() -> None:
    # also guards the extraction: an empty or partial list would let the parse test pass vacuously
    shown = {shlex.split(c)[0] for c in COMMANDS}
    assert shown == set(typer.main.get_command(app).commands), shown  # type: ignore[attr-defined]


@pytest.mark.parametrize("synopsis", COMMANDS)
def test_readme_command_parses(synopsis: str) -> None:
    for argv in expand(synopsis):
        parse(argv)


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["run", "r.yaml", "--no-such-flag"], ["eval", "model.pt"], ["run", "r.yaml", "--seed", "x"]],
)
def test_the_parse_check_rejects_what_the_cli_rejects(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def test_synopsis_expansion() -> None:
    assert expand("run RECIPE [--out DIR] [--resume/--no-resume] [--seed N]") == [
        ["run", "recipe"],
        ["run", "recipe", "--out", "dir", "--resume", "--seed", "1"],
        ["run", "recipe", "--out", "dir", "--no-resume", "--seed", "1"],
    ]
    assert compress_args("compress validate RECIPE                  schema and references") == "validate RECIPE"
    assert compress_args("torchrun --nproc_per_node 2 -m compress.cli run RECIPE  # x") == "run RECIPE"
    assert compress_args("docker run --rm -v \"$PWD:/work\" compress:cpu run recipes/ci.yaml") == "run recipes/ci.yaml"
    assert compress_args("python -m export.tensorrt model.onnx") is None


NAMED_RECIPES = sorted(set(re.findall(r"recipes/[\w.-]+\.yaml", README)))


def test_the_readme_names_recipes() -> None:
    assert "recipes/mnist-resnet20.yaml" in NAMED_RECIPES


@pytest.mark.parametrize("recipe", NAMED_RECIPES)
def test_named_recipe_exists_and_validates(recipe: str) -> None:
    assert (ROOT / recipe).is_file(), recipe
    result = runner.invoke(app, ["validate", str(ROOT / recipe)])
    assert result.exit_code == 0, result.output


def _readme_lines(subcommand_start: str) -> list[list[str]]:
    """The README's concrete command lines (no placeholders) that start with these arguments."""
    found = [shlex.split(c) for c in COMMANDS if c.startswith(subcommand_start)]
    return [argv for argv in found if not any(_is_placeholder(t) or t.startswith("[") for t in argv)]


def test_readme_lint_command_runs_on_a_tiny_export(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from export.onnx_export import export_onnx

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    model = export_onnx(net, torch.randn(1, 1, 8, 8), tmp_path / "model.onnx")
    [synopsis] = [c for c in COMMANDS if c.startswith("export --lint")]
    argv = [str(model) if _is_placeholder(t) else t for t in shlex.split(synopsis)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0 and "clean" in result.output, result.output


def _small_report(metric: float) -> dict:
    """A passing report.json with one stage and two exports, as a run writes them (keys: ../shared/DESIGN.md)."""
    return {
        "status": "passed",
        "recipe": {"name": "ci"},
        "stages": [{"name": "prune", "pass": "prune.magnitude", "metric": metric, "sparsity": 0.8}],
        "export": {
            "fp32": {"metric": metric, "size_bytes": 1_000_000, "latency_ms": {"batch1": 1.0, "batch64": 20.0}},
            "int8-ort": {"metric": metric, "size_bytes": 300_000, "latency_ms": {"batch1": 0.5, "batch64": 9.0}},
        },
    }


def test_readme_gate_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI lines as the README writes them, in a scratch directory with a report where run would put it."""
    write, check = _readme_lines("gate --write-baseline"), [a for a in _readme_lines("gate ") if "--baseline" in a]
    assert write and check, "the README shows no concrete gate command lines"
    monkeypatch.chdir(tmp_path)
    report = Path(write[0][write[0].index("--write-baseline") + 1])
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps(_small_report(0.98)))
    Path(write[0][write[0].index("--out") + 1]).parent.mkdir(parents=True)
    for argv in write:
        assert runner.invoke(app, argv).exit_code == 0
    for argv in check:
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
        if "--junit" in argv:
            assert Path(argv[argv.index("--junit") + 1]).is_file()
    report.write_text(json.dumps(_small_report(0.90)))  # a regression of 8 points must fail the same lines
    for argv in check:
        assert runner.invoke(app, argv).exit_code == 3


def test_readme_results_block_is_results_md() -> None:
    """The "Measured figures" block is what bench/all.py makes from the committed bench/RESULTS.md."""
    assert current_block(README) == render_block(RESULTS_PATH.read_text())


def test_results_md_has_every_quick_bench_passing() -> None:
    sections = parse_sections(RESULTS_PATH.read_text())
    for bench in benches_for("quick"):
        assert bench.name in sections, f"bench/RESULTS.md has no {bench.name} section"
        assert sections[bench.name].passed, f"bench/RESULTS.md: {bench.name} failed"
