"""report.md / report.html / plots of a real run, redrawn and compared through `compress report`."""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()
PLOTS = {"stages.png", "layers.png", "latency.png", "metric_vs_size.png"}


def test_run_writes_html_and_plots(tiny_run: tuple[dict, Path]) -> None:
    _, out = tiny_run
    assert {p.name for p in (out / "plots").iterdir()} == PLOTS
    for plot in (out / "plots").iterdir():
        width, height = Image.open(plot).size
        assert width >= 400 and height >= 250, plot
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "<td>prune</td>" in page and "prune.magnitude" in page
    markdown = (out / "report.md").read_text()
    assert "![latency](plots/latency.png)" in markdown and "## Recipe" in markdown


def test_report_command_redraws_from_json(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run[1], copy)
    shutil.rmtree(copy / "plots")
    (copy / "report.html").unlink()
    result = runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (copy / "plots").iterdir()} == PLOTS and (copy / "report.html").is_file()


def test_report_compares_runs(tiny_run: tuple[dict, Path], tmp_path: Path) -> None:
    second = tmp_path / "second"
    shutil.copytree(tiny_run[1], second)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["report", str(tiny_run[1]), str(second), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    assert str(second) in table and str(tiny_run[1]) in table
    assert (out / "plots" / "comparison.png").is_file()


def test_report_of_missing_dir_is_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "report.json" in result.output
