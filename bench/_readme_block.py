"""README.md's "Measured figures" block: headline paragraphs of bench/RESULTS.md, quoted verbatim.

bench/all.py rewrites the block between the markers after each run, and tests/test_readme.py checks
that the committed README holds exactly what this module makes from the committed RESULTS.md: the
README then quotes no figure that RESULTS.md does not hold.
"""
from __future__ import annotations

import re
from pathlib import Path

from _results_file import Section, parse_sections

README_PATH = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

# Per bench, the paragraphs (runs of non-blank output lines) to quote: each pattern picks every
# paragraph with a line it matches. They name table headers and summary lines the benches print.
HEADLINES: dict[str, tuple[str, ...]] = {
    "demo": (r"^\| format \|", r"^headline:"),
    "ci_variation": (r"^largest (metric difference|change of a gated latency)",),
    "distill": (r"^\| task \| trainer \|", r"dot/kd"),
    "export": (r"^## Exported", r"faster than fp32"),
    "pruning": (r"^### Unstructured", r"^### 2:4"),
    "quantization": (r"^\| model \| bits \|",),
    "mixed_precision": (r"^\| pass \| weights \|",),
    "zoo": (r"^model\s+build\s+prune-ch", r"models pass every step"),
    "tasks": (r"^## ", r"^\| weights \| file \|"),
    "hf": (r"^## all-MiniLM", r"^\| file \| cosine"),
}


def paragraphs(output: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", output) if p.strip()]


def headline(section: Section) -> list[str]:
    """The section's quoted paragraphs, in output order; every one of them if no pattern is known."""
    patterns = [re.compile(p, re.M) for p in HEADLINES.get(section.name, ())]
    found = paragraphs(section.output)
    if not patterns:
        return found
    return [p for p in found if any(pattern.search(p) for pattern in patterns)]


def render_block(results_text: str) -> str:
    """The block's lines between the markers, made from a RESULTS.md text."""
    lines: list[str] = []
    for section in parse_sections(results_text).values():
        status = "" if section.passed else f", FAILED (exit code {section.exit_code})"
        commit = section.commit.split(" ", 1)[0] + (" (dirty)" if "dirty" in section.commit else "")
        lines += [
            f"**{section.name}**: `{section.command}` ({section.mode} mode, {section.measured}, commit {commit}, "
            f"{section.wall_seconds:.0f} s{status})",
            "",
            "```text",
            *"\n\n".join(headline(section)).splitlines(),
            "```",
            "",
        ]
    return "\n".join(lines)


def _block_span(readme: str) -> tuple[int, int]:
    """Where the block's text starts and ends; ValueError when the markers are missing."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md: no {BEGIN} ... {END} markers")
    return start + len(BEGIN) + 1, end


def splice(readme: str, block: str) -> str:
    """README text with the block between the markers replaced."""
    start, end = _block_span(readme)
    return readme[:start] + block + readme[end:]


def current_block(readme: str) -> str:
    """What stands between the markers now."""
    start, end = _block_span(readme)
    return readme[start:end]
