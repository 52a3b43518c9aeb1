"""`compress gate` on a real run's report, and on copies of it made worse in one respect at a time."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app

runner = CliRunner()


@pytest.fixture
def real_report(tiny_run: tuple[dict, Path]) -> dict:
    report = copy.deepcopy(tiny_run[0])
    # a second compressed file, twice as fast as the original model's (the latency reference)
    report["export"]["int8-ort"] = copy.deepcopy(report["export"]["fp32"])
    for key in ("batch1", "batch64"):
        report["export"]["int8-ort"]["latency_ms"][key] = report["export"]["original"]["latency_ms"][key] * 0.5
    return report


def _gate(tmp_path: Path, report: dict, baseline: Path, *extra: str):
    path = tmp_path / "candidate.json"
    path.write_text(json.dumps(report))
    return runner.invoke(app, ["gate", str(path), "--baseline", str(baseline), *extra])


def _baseline(tmp_path: Path, report: dict) -> Path:
    source = tmp_path / "base-report.json"
    source.write_text(json.dumps(report))
    out = tmp_path / "baseline.json"
    result = runner.invoke(app, ["gate", "--write-baseline", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_report_passes_against_its_own_baseline(real_report: dict, tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, real_report)
    junit = tmp_path / "junit.xml"
    result = _gate(tmp_path, real_report, baseline, "--junit", str(junit))
    assert result.exit_code == 0, result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == int(suite.get("tests")) >= 6
    assert suite.get("failures") == "0" and not any(c.find("failure") is not None for c in cases)
    names = {c.get("name") for c in cases}
    assert {
        "run status", "stage prune: metric", "export fp32: size_bytes", "export int8-ort: latency batch64 / original",
        "export fp32: latency batch1 / original", "export fp32: lint findings", "export original: metric",
    } <= names  # fmt: skip


@pytest.mark.parametrize(
    ("worsen", "failing"),
    [
        (lambda r: r["stages"][0].update(metric=r["stages"][0]["metric"] - 0.02), "stage prune: metric"),
        (lambda r: r["export"]["fp32"].update(size_bytes=int(r["export"]["fp32"]["size_bytes"] * 1.2)), "export fp32: size_bytes"),
        (
            lambda r: r["export"]["int8-ort"]["latency_ms"].update(batch64=r["export"]["original"]["latency_ms"]["batch64"]),
            "export int8-ort: latency batch64 / original",
        ),
        (
            lambda r: r["export"]["fp32"]["lint"]["findings"].append({"node": "n", "rule": "r", "message": "m"}),
            "export fp32: lint findings",
        ),
        (lambda r: r["stages"][0].update(sparsity=r["stages"][0]["sparsity"] - 0.05), "stage prune: sparsity"),
        (lambda r: r.update(status="gate_failed"), "run status"),
    ],
)
def test_a_regression_fails_with_exit_3(real_report: dict, tmp_path: Path, worsen, failing: str) -> None:
    baseline = _baseline(tmp_path, real_report)
    worse = copy.deepcopy(real_report)
    worsen(worse)
    junit = tmp_path / "junit.xml"
    result = _gate(tmp_path, worse, baseline, "--junit", str(junit))
    assert result.exit_code == 3, result.output
    assert "FAIL" in result.output and failing in result.output
    failed = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None]
    assert failed == [failing]


def test_tolerance_flag_lets_a_small_drop_pass(real_report: dict, tmp_path: Path) -> None:
    baseline = _baseline(tmp_path, real_report)
    worse = copy.deepcopy(real_report)
    worse["stages"][0]["metric"] -= 0.02
    assert _gate(tmp_path, worse, baseline, "--tolerance", "metric=0.03").exit_code == 0


@pytest.mark.parametrize("flag", ["metric", "metric=abc", "speed=0.1", "metric=-1"])
def test_bad_tolerance_is_bad_input(real_report: dict, tmp_path: Path, flag: str) -> None:
    baseline = _baseline(tmp_path, real_report)
    result = _gate(tmp_path, real_report, baseline, "--tolerance", flag)
    assert result.exit_code == 2 and "--tolerance" in result.output


def test_missing_files_are_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["gate", str(tmp_path / "none.json"), "--baseline", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "not found" in result.output


def test_latency_ratios_fall_back_to_fp32_without_an_original_file(real_report: dict, tmp_path: Path) -> None:
    del real_report["export"]["original"]
    baseline = _baseline(tmp_path, real_report)
    assert json.loads(baseline.read_text())["latency_reference"] == "fp32"
    result = _gate(tmp_path, real_report, baseline)
    assert result.exit_code == 0, result.output
    assert "int8-ort: latency batch64 / fp32" in result.output
