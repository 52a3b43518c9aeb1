"""report.md / report.html / plots of a real run, redrawn and compared through `compress report`."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from compress.cli import app
from compress.report import headline, headline_text

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


def _file(metric: float, size: int, b1: float, b64: float) -> dict:
    return {"path": "export/x.onnx", "metric": metric, "size_bytes": size,
            "latency_ms": {"batch1": b1, "batch64": b64, "threads": 2}}  # fmt: skip


def test_headline_names_the_fastest_file_against_the_original() -> None:
    report = {
        "recipe": {"metric": "top1"},
        "export": {
            "original": _file(0.985, 1_000_000, 1.0, 40.0),
            "int8-trt": _file(0.982, 100_000, 1.2, 50.0),
            "int8-ort": _file(0.980, 110_000, 0.5, 10.0),
            "tensorrt": {"skipped": "no TensorRT", "engines": {}},
        },
    }
    line = headline(report)
    assert line is not None and line["format"] == "int8-ort"
    assert line["smaller"] == pytest.approx(1_000_000 / 110_000)
    assert line["faster"] == {"batch1": pytest.approx(2.0), "batch64": pytest.approx(4.0)}
    assert line["test_change"] == pytest.approx(-0.005)
    text = headline_text(line)
    assert "9.1x smaller" in text and "2.0x faster at batch 1 and 4.0x at batch 64" in text and "-0.5 pt" in text
    # without latency the smallest file is named, and no speed is claimed
    for entry in report["export"].values():
        entry.pop("latency_ms", None)
    untimed = headline(report)
    assert untimed is not None and untimed["format"] == "int8-trt" and untimed["faster"] == {}
    assert "faster" not in headline_text(untimed)
    # nothing to compare with: no headline
    del report["export"]["original"]
    assert headline(report) is None
