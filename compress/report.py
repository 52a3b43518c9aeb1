"""report.json (the contract CI reads), report.md and the terminal table, all from one report dict."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import yaml

from rich.console import Console
from rich.table import Table

from compress.atomic import atomic_write_json, atomic_write_text

# The export entry of the unmodified model's own file (export/model.original.onnx), which the headline
# and the CI gate's latency ratios compare the compressed files with.
ORIGINAL = "original"

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


def headline(report: dict[str, Any]) -> dict[str, Any] | None:
    """What the run bought, against the original model's own fp32 file in the same runtime and run.

    The compressed file named is the fastest at batch 64 (the smallest when latency was not measured):
    the one a CPU deployment would ship. None when the run exported no original (no stages, no export).
    """
    exports = {k: v for k, v in (report.get("export") or {}).items() if "metric" in (v or {})}
    original = exports.pop(ORIGINAL, None)
    if original is None or not exports:
        return None

    def batch64(entry: dict[str, Any]) -> float | None:
        return (entry.get("latency_ms") or {}).get("batch64")

    timed = all(batch64(e) for e in [original, *exports.values()])
    fmt = min(exports, key=lambda k: (batch64(exports[k]) if timed else 0, exports[k]["size_bytes"]))
    entry = exports[fmt]
    faster = (
        {b: original["latency_ms"][b] / entry["latency_ms"][b] for b in ("batch1", "batch64") if b in entry["latency_ms"]}
        if timed
        else {}
    )
    return {
        "format": fmt,
        "file": entry.get("path"),
        "smaller": original["size_bytes"] / entry["size_bytes"],
        "faster": faster,
        "threads": (entry.get("latency_ms") or {}).get("threads"),
        "metric_name": (report.get("recipe") or {}).get("metric", "metric"),
        "test_metric": entry["metric"],
        "original_test_metric": original["metric"],
        "test_change": entry["metric"] - original["metric"],
    }


def headline_text(line: dict[str, Any]) -> str:
    """One sentence: N.Nx smaller, N.Nx faster (batch 1 and 64), the test metric's change in points."""
    speed = ""
    if line["faster"]:
        threads = f", {line['threads']} threads" if line.get("threads") else ""
        speed = (
            f", {line['faster'].get('batch1', float('nan')):.1f}x faster at batch 1 and "
            f"{line['faster'].get('batch64', float('nan')):.1f}x at batch 64 (ONNX Runtime{threads})"
        )
    return (
        f"{line['format']}: {line['smaller']:.1f}x smaller{speed}, test {line['metric_name']} "
        f"{100 * line['test_change']:+.1f} pt ({_pct(line['test_metric'])} vs {_pct(line['original_test_metric'])}), "
        "against the original model's fp32 file"
    )


SEARCH_COLUMNS = ("trial", "phase", "changes", "val", "drop", "gate", "sparsity", "avg bits", "float", "size", "seconds")


def _changes_text(changes: dict[str, Any]) -> str:
    parts = []
    for key, value in changes.items():
        if isinstance(value, dict):
            parts.append(f"{key}: {len(value)} layers")
        elif isinstance(value, list):
            parts.append(f"{key}: {', '.join(map(str, value))}")
        else:
            parts.append(f"{key}: {value}")
    return "; ".join(parts) or "(as written)"


def search_tables(report: dict[str, Any]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """One table of trials per searched stage (gate on_fail: search), with the outcome as its title."""
    tables = []
    for stage in report.get("stages", []):
        search = stage.get("search")
        if not search:
            continue
        rows = []
        for t in search["trials"]:
            kept = " (kept)" if t["trial"] == search.get("best_trial") else ""
            rows.append((
                f"{t['trial']}{kept}", t["phase"], _changes_text(t["changes"]), _pct(t["metric"]),
                f"{100 * t['drop']:+.2f} pt", "pass" if t["passed"] else "FAIL", _pct(t.get("sparsity")),
                "-" if t.get("average_bits") is None else f"{t['average_bits']:.2f}", str(t.get("float_layers", 0)),
                _size(t.get("size_bytes")), f"{t['seconds']:.1f}",
            ))
        tables.append((f"search of stage '{stage['name']}': {search['outcome']}", rows))
    return tables


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any], plots: list[Path] | None = None) -> str:
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
        markdown_table(STAGE_COLUMNS, stage_rows(report)),
    ]
    for title, rows in search_tables(report):
        parts += ["", f"## Search: {title}", "", markdown_table(SEARCH_COLUMNS, rows)]
    if report.get("export"):
        parts += ["", "## Export (ONNX Runtime, test split)", "", markdown_table(EXPORT_COLUMNS, export_rows(report))]
    if report.get("headline"):
        parts += ["", f"**{headline_text(report['headline'])}**"]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    versions = report.get("versions", {})
    parts += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items())]
    parts += ["", "## Recipe", "", "```yaml", yaml.safe_dump(report.get("recipe", {}), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(parts)


def _html_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any], plots: list[Path]) -> str:
    """The markdown report's content as one self-contained page (images embedded)."""
    recipe = report.get("recipe", {})
    failed = f" (failed at {html.escape(report['failed_stage'])})" if report.get("failed_stage") else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>compress run: {html.escape(str(recipe.get('name', '?')))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em}</style></head><body>",
        f"<h1>compress run: {html.escape(str(recipe.get('name', '?')))}</h1>",
        f"<p>Status: <b>{html.escape(str(report.get('status')))}</b>{failed}</p>",
        "<p>Metrics: <code>val</code> is the validation split the gates judge; <code>test</code> is the held-out split.</p>",
        "<h2>Stages</h2>",
        _html_table(STAGE_COLUMNS, stage_rows(report)),
    ]
    for title, rows in search_tables(report):
        parts += [f"<h2>Search: {html.escape(title)}</h2>", _html_table(SEARCH_COLUMNS, rows)]
    if report.get("export"):
        parts += ["<h2>Export (ONNX Runtime, test split)</h2>", _html_table(EXPORT_COLUMNS, export_rows(report))]
    if report.get("headline"):
        parts.append(f"<p><b>{html.escape(headline_text(report['headline']))}</b></p>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            encoded = base64.b64encode(plot.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(plot.stem)}' src='data:image/png;base64,{encoded}'>")
    versions = report.get("versions", {})
    parts += [
        "<h2>Versions</h2>",
        "<p>" + html.escape(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>",
        "<h2>Recipe</h2>",
        "<pre>" + html.escape(yaml.safe_dump(recipe, sort_keys=False)) + "</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_reports(report: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "report.json", report)
    render_reports(report, out)


def render_reports(report: dict[str, Any], out: Path) -> list[Path]:
    """report.md, report.html and the plots, all from the report dict (so they can be redrawn later)."""
    from compress.plots import plot_run

    plots = plot_run(report, out)
    atomic_write_text(out / "report.md", render_markdown(report, plots))
    atomic_write_text(out / "report.html", render_html(report, plots))
    return plots


COMPARE_COLUMNS = ("run", "status", "baseline test", "final stage test", "sparsity", "deployed", "deployed test", "size", "batch 1", "batch 64")


def comparison_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run, report in reports.items():
        stages = report.get("stages") or []
        final = stages[-1] if stages else report.get("baseline") or {}
        exports = {k: v for k, v in (report.get("export") or {}).items() if "metric" in (v or {}) and k != ORIGINAL}
        # the deployed file: the smallest exported one
        deployed_fmt = min(exports, key=lambda k: exports[k].get("size_bytes", 0)) if exports else None
        deployed = exports.get(deployed_fmt, {}) if deployed_fmt else {}
        rows.append(
            {
                "run": run,
                "status": report.get("status"),
                "baseline_test": (report.get("baseline") or {}).get("test_metric"),
                "final_test": final.get("test_metric"),
                "sparsity": final.get("sparsity"),
                "format": deployed_fmt,
                "metric": deployed.get("metric"),
                "size_bytes": deployed.get("size_bytes"),
                "latency_ms": deployed.get("latency_ms") or {},
            }
        )
    return rows


def _comparison_cells(row: dict[str, Any]) -> tuple[str, ...]:
    latency = row["latency_ms"]
    return (
        row["run"], str(row["status"]), _pct(row["baseline_test"]), _pct(row["final_test"]), _pct(row["sparsity"]),
        row["format"] or "-", _pct(row["metric"]), _size(row["size_bytes"]),
        f"{latency['batch1']:.3f} ms" if "batch1" in latency else "-",
        f"{latency['batch64']:.3f} ms" if "batch64" in latency else "-",
    )


def write_comparison(reports: dict[str, dict[str, Any]], out: Path, console: Console) -> list[Path]:
    from compress.plots import plot_comparison

    rows = comparison_rows(reports)
    cells = [_comparison_cells(r) for r in rows]
    chart = plot_comparison(rows, out / "plots" / "comparison.png")
    md = ["# compress runs compared", "", markdown_table(COMPARE_COLUMNS, cells)]
    if chart:
        md += ["", f"![comparison](plots/{chart.name})"]
    atomic_write_text(out / "comparison.md", "\n".join(md) + "\n")
    table = Table(title="compress runs compared")
    for column in COMPARE_COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    return [out / "comparison.md"] + ([chart] if chart else [])


def print_summary(report: dict[str, Any], out: Path, console: Console) -> None:
    table = Table(title=f"compress: {report.get('recipe', {}).get('name', '')} ({report.get('status')})")
    for column in STAGE_COLUMNS:
        table.add_column(column, justify="left" if column in ("stage", "pass") else "right")
    for row in stage_rows(report):
        table.add_row(*row, style="red" if "FAIL" in row else None)
    console.print(table)
    for title, search_rows in search_tables(report):
        trials = Table(title=title)
        for column in SEARCH_COLUMNS:
            trials.add_column(column, justify="left" if column in ("trial", "phase", "changes") else "right")
        for row in search_rows:
            trials.add_row(*row, style=None if "pass" in row else "red")
        console.print(trials)
    rows = export_rows(report)
    if rows:
        export_table = Table(title="export (ONNX Runtime, test split)")
        for column in EXPORT_COLUMNS:
            export_table.add_column(column, justify="left" if column == "format" else "right")
        for row in rows:
            export_table.add_row(*row)
        console.print(export_table)
    if report.get("headline"):
        console.print(f"[bold]{headline_text(report['headline'])}[/]", highlight=False)
    console.print(f"report: {out / 'report.json'}")
