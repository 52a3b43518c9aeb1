"""bench/all.py's bookkeeping, without running a bench: the RESULTS.md format reads back what it wrote,
--only keeps the other sections byte for byte, the README block quotes the headline paragraphs."""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # appended: bench/export.py must not shadow the export package

from _plan import BENCHES, command_line  # noqa: E402
from _readme_block import BEGIN, END, current_block, headline, render_block, splice  # noqa: E402
from _results_file import RunHeader, Section, parse_sections, raw_sections, render_file, render_section  # noqa: E402

bench_all = importlib.import_module("all")

DISTILL_OUTPUT = """teacher ResNet-20: test top-1 0.9860
  (b) ResNet-20 -> ResNet-8 w8, 1 ep | kd | seed 0: 0.9300 (9.0 s/epoch)

mnist5k test split (1,000 images), batch 64
| task | trainer | test top-1 mean | std | per seed | s/epoch |
|---|---|---|---|---|---|
| (b) ResNet-20 -> ResNet-8 w8, 1 ep | kd | 0.9300 | 0.0000 | 0.930 | 9.0 |

one step's gradients (forward, teacher, backward), median of 10 interleaved steps:
(b) ResNet-20 -> ResNet-8 w8, 1 ep: kd 20 ms, dot 30 ms; dot/kd 1.50x
total 40 s
"""


def section(name: str = "distill", output: str = DISTILL_OUTPUT, exit_code: int = 0, **changes: object) -> Section:
    fields = dict(
        name=name, command=f"python bench/{name}.py --quick", measured="2026-01-02 03:04 UTC",
        commit="0123456789ab (clean)", mode="quick", machine="Some CPU; flags: avx2; 2 logical CPUs (2 usable)",
        versions="python 3.11.7, torch 2.14.1", wall_seconds=40.0, exit_code=exit_code, load_at_start="0.50",
        output=output,
    )  # fmt: skip
    fields.update(changes)
    return Section(**fields)  # type: ignore[arg-type]


HEADER = RunHeader("2026-01-02 03:04 UTC", "0123456789ab (clean)", "quick", "Some CPU", "torch 2.14.1",
                   ["`python bench/distill.py --quick`: 40 s, exit 0"], [], "ready in 1 s", 40.0)  # fmt: skip


def test_a_section_reads_back_as_written_even_with_fences_and_headings_in_its_output() -> None:
    tricky = section(output="## Exported ResNet-20\n```\n<!-- /bench:distill -->x\n- mode: full\n")
    plain = section(name="export")
    text = render_file(HEADER, [render_section(tricky), render_section(plain)])
    assert parse_sections(text) == {"distill": tricky, "export": plain}


def test_a_section_missing_a_field_is_refused() -> None:
    text = render_section(section()).replace("- commit: 0123456789ab (clean)\n", "")
    with pytest.raises(ValueError, match="commit"):
        parse_sections(text)


def test_only_keeps_the_other_sections_byte_for_byte_in_plan_order() -> None:
    old_export = render_section(section(name="export", measured="2025-12-31 23:59 UTC")).replace("40 s", "41 s")
    old_distill = render_section(section(wall_seconds=99.0))
    previous = render_file(HEADER, [old_export, old_distill])  # out of plan order on purpose
    fresh = section(wall_seconds=12.0)
    text = bench_all.assemble(previous, {"distill": fresh}, HEADER)
    kept = raw_sections(text)
    assert list(kept) == ["distill", "export"]  # plan order: distill before export
    assert kept["export"] == old_export
    assert parse_sections(text)["distill"] == fresh


def test_headline_quotes_the_chosen_paragraphs_verbatim() -> None:
    quoted = headline(section())
    assert len(quoted) == 2
    assert quoted[0].startswith("mnist5k test split") and "| kd | 0.9300 |" in quoted[0]
    assert quoted[1].endswith("total 40 s") and "dot/kd 1.50x" in quoted[1]
    assert "seed 0: 0.9300" not in "\n".join(quoted)  # the progress paragraph is left out


def test_the_block_names_the_provenance_and_flags_a_failed_bench() -> None:
    text = render_file(HEADER, [render_section(section()), render_section(section(name="export", exit_code=1))])
    block = render_block(text)
    assert "**distill**: `python bench/distill.py --quick` (quick mode, 2026-01-02 03:04 UTC, commit 0123456789ab" in block
    assert "FAILED (exit code 1)" in block and block.count("FAILED") == 1


def test_splice_replaces_only_the_block() -> None:
    readme = f"# t\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n"
    spliced = splice(readme, "new\n")
    assert spliced == f"# t\n\nbefore\n{BEGIN}\nnew\n{END}\nafter\n"
    assert current_block(spliced) == "new\n"
    with pytest.raises(ValueError):
        splice("# no markers\n", "new\n")


def test_the_estimate_uses_only_timings_of_the_same_command() -> None:
    distill, export = (next(b for b in BENCHES if b.name == n) for n in ("distill", "export"))
    same = section(command=" ".join(command_line(distill, "quick")), wall_seconds=300.0)
    other = section(name="export", command="python bench/export.py --bits 8,4", wall_seconds=999.0)
    estimate = bench_all.Estimate({"distill": same, "export": other}, "quick")
    assert estimate.seconds(distill) == 300.0
    assert estimate.seconds(export) is None
    assert estimate.left(distill, 100.0, [export]) == "~3 min left by the last RESULTS.md timings (none for export)"
    failed = bench_all.Estimate({"distill": dataclasses.replace(same, exit_code=1)}, "quick")
    assert failed.seconds(distill) is None
