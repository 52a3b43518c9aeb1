"""`compress gate`: a run's report.json against a committed baseline, as CI's pass/fail.

Latency is compared as a ratio to a reference file of the same run (the original model's file, or the
fp32 export where the run wrote no original): CI machines differ in speed, the ratio between two files
measured on one machine, in alternating rounds, travels.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.atomic import atomic_write_json, atomic_write_text
from compress.errors import BadInput
from compress.report import ORIGINAL

BASELINE_FORMAT = "compress.baseline/1"

# metric: absolute points (fraction); size and latency: relative; sparsity: absolute fraction
DEFAULT_TOLERANCES = {"metric": 0.005, "size": 0.05, "latency": 0.5, "sparsity": 0.001}


@dataclass
class Check:
    name: str
    value: Any
    baseline: Any
    tolerance: str
    passed: bool


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a readable {what} ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: not a {what} (expected a JSON object)")
    return data


LATENCY_REFERENCES = (ORIGINAL, "fp32")


def latency_reference(report: dict[str, Any]) -> str | None:
    """The export every other file's latency is divided by: the original model's file, else fp32."""
    exports = report.get("export") or {}
    return next((name for name in LATENCY_REFERENCES if (exports.get(name) or {}).get("latency_ms")), None)


def latency_ratios(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each export's latency divided by the reference file's, per batch size; empty without a reference."""
    exports = report.get("export") or {}
    reference_name = latency_reference(report)
    reference = (exports.get(reference_name) or {}).get("latency_ms") or {} if reference_name else {}
    ratios: dict[str, dict[str, float]] = {}
    for fmt, entry in exports.items():
        latency = (entry or {}).get("latency_ms") or {}
        per_batch = {
            key: latency[key] / reference[key]
            for key in ("batch1", "batch64")
            if key in latency and reference.get(key)
        }
        if per_batch and fmt != reference_name:
            ratios[fmt] = per_batch
    return ratios


def make_baseline(report: dict[str, Any]) -> dict[str, Any]:
    if report.get("status") != "passed":
        raise BadInput(f"report status is {report.get('status')!r}: a baseline is made from a passing run")
    ratios = latency_ratios(report)
    return {
        "format": BASELINE_FORMAT,
        "recipe": (report.get("recipe") or {}).get("name"),
        "status": report["status"],
        "stages": {
            s["name"]: {k: s[k] for k in ("metric", "sparsity", "bits", "size_bytes") if k in s}
            for s in report.get("stages", [])
        },
        "latency_reference": latency_reference(report),
        "export": {
            fmt: {
                **{k: e[k] for k in ("metric", "size_bytes") if k in e},
                **({"lint_findings": len(e["lint"]["findings"])} if "lint" in e else {}),
                **({"latency_ratio": ratios[fmt]} if fmt in ratios else {}),
            }
            for fmt, e in (report.get("export") or {}).items()
            if "metric" in e
        },
    }


def parse_tolerances(items: list[str]) -> dict[str, float]:
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_TOLERANCES:
            raise BadInput(f"--tolerance {item!r}: expected KEY=VALUE with KEY one of {', '.join(DEFAULT_TOLERANCES)}")
        try:
            tolerances[key] = float(value)
        except ValueError:
            raise BadInput(f"--tolerance {item!r}: {value!r} is not a number") from None
        if tolerances[key] < 0:
            raise BadInput(f"--tolerance {item!r}: must not be negative")
    return tolerances


def _at_least(name: str, value: Any, base: float, tol: float, unit: str = "") -> Check:
    ok = value is not None and value >= base - tol - 1e-12
    return Check(name, value, base, f"-{tol:g}{unit}", ok)


def _at_most_relative(name: str, value: Any, base: float, tol: float) -> Check:
    ok = value is not None and value <= base * (1 + tol) + 1e-12
    return Check(name, value, base, f"+{100 * tol:g}%", ok)


def compare(report: dict[str, Any], baseline: dict[str, Any], tolerances: dict[str, float]) -> list[Check]:
    if baseline.get("format") != BASELINE_FORMAT:
        raise BadInput(f"baseline: not a compress baseline (format {baseline.get('format')!r})")
    checks = [Check("run status", report.get("status"), "passed", "exact", report.get("status") == "passed")]
    stages = {s["name"]: s for s in report.get("stages", [])}
    for name, base in baseline.get("stages", {}).items():
        stage = stages.get(name, {})
        if "metric" in base:
            checks.append(_at_least(f"stage {name}: metric", stage.get("metric"), base["metric"], tolerances["metric"]))
        if "sparsity" in base:
            checks.append(
                _at_least(f"stage {name}: sparsity", stage.get("sparsity"), base["sparsity"], tolerances["sparsity"])
            )
        if "bits" in base:
            checks.append(Check(f"stage {name}: bits", stage.get("bits"), base["bits"], "exact", stage.get("bits") == base["bits"]))
    exports = report.get("export") or {}
    ratios = latency_ratios(report)
    for fmt, base in baseline.get("export", {}).items():
        entry = exports.get(fmt, {})
        if "metric" in base:
            checks.append(_at_least(f"export {fmt}: metric", entry.get("metric"), base["metric"], tolerances["metric"]))
        if "size_bytes" in base:
            checks.append(
                _at_most_relative(f"export {fmt}: size_bytes", entry.get("size_bytes"), base["size_bytes"], tolerances["size"])
            )
        if "lint_findings" in base:
            findings = len((entry.get("lint") or {}).get("findings", [])) if "lint" in entry else None
            ok = findings is not None and findings <= base["lint_findings"]
            checks.append(Check(f"export {fmt}: lint findings", findings, base["lint_findings"], "at most", ok))
        reference = baseline.get("latency_reference", "fp32")
        for batch, base_ratio in (base.get("latency_ratio") or {}).items():
            checks.append(
                _at_most_relative(
                    f"export {fmt}: latency {batch} / {reference}", ratios.get(fmt, {}).get(batch), base_ratio,
                    tolerances["latency"],
                )
            )
    return checks


def junit_xml(checks: list[Check], suite: str = "compress gate") -> str:
    failures = sum(not c.passed for c in checks)
    root = ET.Element("testsuites", tests=str(len(checks)), failures=str(failures))
    suite_el = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(failures))
    for check in checks:
        case = ET.SubElement(suite_el, "testcase", classname="compress.gate", name=check.name)
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=f"{check.value} vs baseline {check.baseline} ({check.tolerance})")
            failure.text = f"value {check.value}, baseline {check.baseline}, tolerance {check.tolerance}"
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_baseline(report_path: Path, out: Path) -> dict[str, Any]:
    baseline = make_baseline(read_json(report_path, "report"))
    atomic_write_json(out, baseline)
    return baseline


def run_gate(report_path: Path, baseline_path: Path, tolerance_items: list[str], junit: Path | None) -> list[Check]:
    tolerances = parse_tolerances(tolerance_items)
    checks = compare(read_json(report_path, "report"), read_json(baseline_path, "baseline"), tolerances)
    if junit is not None:
        atomic_write_text(junit, junit_xml(checks))
    return checks
