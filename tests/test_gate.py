from compress.gate import check_gate
from compress.recipe import GateConfig


def test_max_drop_against_baseline() -> None:
    verdict = check_gate(GateConfig(max_drop=0.01), 0.975, baseline=0.99, previous=0.98)
    assert not verdict["passed"] and abs(verdict["drop"] - 0.015) < 1e-12
    assert "max_drop" in verdict["reason"]


def test_against_previous_uses_previous_stage() -> None:
    verdict = check_gate(GateConfig(max_drop=0.01, against="previous"), 0.975, baseline=0.99, previous=0.98)
    assert verdict["passed"] and abs(verdict["drop"] - 0.005) < 1e-12


def test_min_metric_floor() -> None:
    assert not check_gate(GateConfig(min_metric=0.9), 0.85, baseline=0.9, previous=0.9)["passed"]
    assert check_gate(GateConfig(min_metric=0.9), 0.95, baseline=0.9, previous=0.9)["passed"]


def test_no_limits_always_passes() -> None:
    assert check_gate(GateConfig(), 0.1, baseline=0.99, previous=0.99)["passed"]
