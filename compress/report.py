"""report.json (the contract CI reads), report.md and the terminal table, all from one report dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compress.atomic import atomic_write_json, atomic_write_text

STAGE_COLUMNS = ("stage", "pass", "val", "test", "drop", "gate", "sparsity", "params (nonzero)", "size", "seconds")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _gate_text(entry: dict[str, Any]) -> str:
    gate = entry.get("gate") or {}
    if "passed" not in gate:
        return "-"
    return "pass" if gate["passed"] else "FAIL"


def stage_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    base = report.get("baseline") or {}
    if base:
        rows.append(
            (
                "baseline", "-", _pct(base.get("metric")), _pct(base.get("test_metric")), "-", "-",
                _pct(base.get("sparsity")), f"{base.get('params', 0):,} ({base.get('params_nonzero', 0):,})",
                _size(base.get("size_bytes")), "-",
            )
        )
    for stage in report.get("stages", []):
        seconds = "resumed" if stage.get("resumed") else f"{stage.get('seconds', 0):.1f}"
        rows.append(
            (
                stage["name"], stage["pass"], _pct(stage.get("metric")), _pct(stage.get("test_metric")),
                f"{100 * stage.get('drop', 0):+.2f} pt", _gate_text(stage), _pct(stage.get("sparsity")),
                f"{stage.get('params', 0):,} ({stage.get('params_nonzero', 0):,})",
                _size(stage.get("size_bytes")), seconds,
            )
        )
    return rows


EXPORT_COLUMNS = ("format", "test", "drop vs torch", "top-1 agreement", "max |diff|", "batch 1", "batch 64", "size", "gate")


def export_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for fmt, entry in (report.get("export") or {}).items():
        if "skipped" in entry:
            rows.append((fmt, "-", "-", "-", "-", "-", "-", "-", f"skipped: {entry['skipped']}"))
            continue
        latency = entry.get("latency_ms") or {}
        parity = entry.get("parity") or {}
        rows.append(
            (
                fmt, _pct(entry.get("metric")), f"{100 * entry.get('drop', 0):+.2f} pt",
                _pct(parity.get("top1_agreement")), f"{parity.get('max_abs_diff', float('nan')):.2e}",
                f"{latency['batch1']:.3f} ms" if "batch1" in latency else "-",
                f"{latency['batch64']:.3f} ms" if "batch64" in latency else "-",
                _size(entry.get("size_bytes")), _gate_text(entry),
            )
        )
    return rows


def _markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    recipe = report.get("recipe", {})
    parts = [
        f"# compress run: {recipe.get('name', '?')}",
        "",
        f"Status: **{report.get('status')}**"
        + (f" (failed at {report['failed_stage']})" if report.get("failed_stage") else ""),
        "",
        "Metrics: `val` is the validation split the gates judge; `test` is the held-out split, used only here.",
        "",
        "## Stages",
        "",
        _markdown_table(STAGE_COLUMNS, stage_rows(report)),
    ]
    if report.get("export"):
        parts += ["", "## Export (ONNX Runtime, test split)", "", _markdown_table(EXPORT_COLUMNS, export_rows(report))]
    versions = report.get("versions", {})
    parts += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(parts)


def write_reports(report: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))


def print_summary(report: dict[str, Any], out: Path, console: Console) -> None:
    table = Table(title=f"compress: {report.get('recipe', {}).get('name', '')} ({report.get('status')})")
    for column in STAGE_COLUMNS:
        table.add_column(column, justify="left" if column in ("stage", "pass") else "right")
    for row in stage_rows(report):
        table.add_row(*row, style="red" if "FAIL" in row else None)
    console.print(table)
    rows = export_rows(report)
    if rows:
        export_table = Table(title="export (ONNX Runtime, test split)")
        for column in EXPORT_COLUMNS:
            export_table.add_column(column, justify="left" if column == "format" else "right")
        for row in rows:
            export_table.add_row(*row)
        console.print(export_table)
    console.print(f"report: {out / 'report.json'}")
