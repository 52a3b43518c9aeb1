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


def test_a_drop_of_exactly_max_drop_passes_despite_float32_metrics() -> None:
    import torch

    baseline = float((torch.arange(500) < 492).float().mean())  # 492/500 as a float32 mean
    metric = float((torch.arange(500) < 487).float().mean())  # 487/500: exactly one point lower
    assert baseline - metric > 0.01  # the float32 rounding that used to fail the gate
    assert check_gate(GateConfig(max_drop=0.01), metric, baseline=baseline, previous=baseline)["passed"]
    one_more = float((torch.arange(500) < 486).float().mean())
    assert not check_gate(GateConfig(max_drop=0.01), one_more, baseline=baseline, previous=baseline)["passed"]
