"""The accuracy gate between stages: compare a metric with the baseline or the previous stage."""
from __future__ import annotations

from typing import Any

from compress.recipe import GateConfig

# Metrics are float32 means (492/500 is 0.98400002): a drop of exactly max_drop must not fail on the
# last bits, while one sample on the smallest split a recipe can have moves a metric by far more.
METRIC_TOLERANCE = 1e-6


def check_gate(cfg: GateConfig, metric: float, *, baseline: float, previous: float) -> dict[str, Any]:
    reference = baseline if cfg.against == "baseline" else previous
    drop = reference - metric
    reasons = []
    if cfg.max_drop is not None and drop > cfg.max_drop + METRIC_TOLERANCE:
        reasons.append(f"drop {drop:.4f} > max_drop {cfg.max_drop:.4f} against {cfg.against}")
    if cfg.min_metric is not None and metric < cfg.min_metric - METRIC_TOLERANCE:
        reasons.append(f"metric {metric:.4f} < min_metric {cfg.min_metric:.4f}")
    return {
        "passed": not reasons,
        "against": cfg.against,
        "reference_metric": reference,
        "drop": drop,
        "max_drop": cfg.max_drop,
        "min_metric": cfg.min_metric,
        "on_fail": cfg.on_fail,
        "reason": "; ".join(reasons) or None,
    }
