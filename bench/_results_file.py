"""bench/RESULTS.md: its format, read and written in one place so that the two cannot drift apart.

The file is a header about the last run, then one section per bench between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`. A section carries its own provenance (date, commit, mode, command, machine,
versions, wall time), so a section kept from an earlier run (`all.py --only`) still says when and on
what it was measured. The bench's stdout stands verbatim in a fenced block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

TITLE = "# Bench results"
_SECTION = re.compile(r"^<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /bench:(?P=name) -->\n", re.S | re.M)
_FIELD = re.compile(r"^- (?P<key>[a-z ]+): (?P<value>.*)$", re.M)
_FENCE_OPEN = re.compile(r"^(?P<fence>`{3,})text\n", re.M)


@dataclass(frozen=True)
class Section:
    """One bench's result: how it was run, on what, and what it printed."""

    name: str
    command: str
    measured: str  # UTC date and time
    commit: str  # hash and (clean) / (dirty: paths)
    mode: str
    machine: str
    versions: str
    wall_seconds: float
    exit_code: int
    load_at_start: str
    output: str  # the bench's stdout, verbatim

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


# the header lines of a section, in order: (label in the file, attribute)
_LABELS = (
    ("command", "command"),
    ("measured", "measured"),
    ("commit", "commit"),
    ("mode", "mode"),
    ("machine", "machine"),
    ("versions", "versions"),
    ("wall time", "wall_seconds"),
    ("exit code", "exit_code"),
    ("load average at start", "load_at_start"),
)


def _fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so output can never close it early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_section(section: Section) -> str:
    lines = [f"<!-- bench:{section.name} -->", f"## {section.name}", ""]
    for label, attribute in _LABELS:
        value = getattr(section, attribute)
        if attribute == "command":
            value = f"`{value}`"
        elif attribute == "wall_seconds":
            value = f"{value:.0f} s"
        lines.append(f"- {label}: {value}")
    fence = _fence_for(section.output)
    lines += ["", f"{fence}text", section.output.rstrip("\n"), fence, f"<!-- /bench:{section.name} -->"]
    return "\n".join(lines) + "\n"


def _parse_section(name: str, body: str) -> Section:
    opened = _FENCE_OPEN.search(body)
    if opened is None:
        raise ValueError(f"RESULTS.md section {name}: no ```text block")
    fence = opened.group("fence")
    end = body.find(f"\n{fence}\n", opened.end() - 1)
    if end < 0:
        raise ValueError(f"RESULTS.md section {name}: the {fence}text block is not closed")
    output = body[opened.end() : end + 1]
    found = {m.group("key"): m.group("value") for m in _FIELD.finditer(body[: opened.start()])}
    values: dict[str, object] = {"name": name, "output": output}
    for label, attribute in _LABELS:
        if label not in found:
            raise ValueError(f"RESULTS.md section {name}: no '- {label}:' line")
        raw = found[label]
        if attribute == "command":
            values[attribute] = raw.strip("`")
        elif attribute == "wall_seconds":
            values[attribute] = float(raw.removesuffix(" s"))
        elif attribute == "exit_code":
            values[attribute] = int(raw)
        else:
            values[attribute] = raw
    return Section(**values)  # type: ignore[arg-type]


def parse_sections(text: str) -> dict[str, Section]:
    """The sections of a RESULTS.md text, by bench name, in file order."""
    return {m.group("name"): _parse_section(m.group("name"), m.group("body")) for m in _SECTION.finditer(text)}


def raw_sections(text: str) -> dict[str, str]:
    """Each section's text exactly as it stands, so that a section kept by --only is kept byte for byte."""
    return {m.group("name"): m.group(0) for m in _SECTION.finditer(text)}


def read_sections(path: Path = RESULTS_PATH) -> dict[str, Section]:
    return parse_sections(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class RunHeader:
    """The last run of bench/all.py: what it ran (the sections it did not run keep their own headers)."""

    measured: str
    commit: str
    mode: str
    machine: str
    versions: str
    commands: list[str]  # one line per bench run: the command and its wall time
    kept: list[str]  # sections kept from earlier runs: name, date, commit
    references: str  # how making the benches' reference models went, and how long it took
    total_seconds: float


def render_header(header: RunHeader) -> str:
    lines = [
        TITLE,
        "",
        "Written by `python bench/all.py` (do not edit by hand; `--only NAME,...` reruns some benches and keeps",
        "the other sections). Each section says when, at which commit, in which mode and on what it was",
        "measured. README.md's \"Measured figures\" block quotes headline rows from this file.",
        "",
        "## Last run",
        "",
        f"- date: {header.measured}",
        f"- commit: {header.commit}",
        f"- mode: {header.mode}",
        f"- machine: {header.machine}",
        f"- versions: {header.versions}",
        f"- reference models: {header.references}",
        f"- total wall time: {header.total_seconds:.0f} s",
        "- benches run:",
        *(f"  - {line}" for line in header.commands),
    ]
    if header.kept:
        lines += ["- sections kept from earlier runs:", *(f"  - {line}" for line in header.kept)]
    return "\n".join(lines) + "\n"


def render_file(header: RunHeader, sections: list[str]) -> str:
    """The whole file: the header, then the sections' texts (rendered or kept verbatim) in plan order."""
    return render_header(header) + "".join("\n" + text for text in sections)
