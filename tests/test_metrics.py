"""Metrics for any task: class metrics on per-sample and per-pixel scores, fidelity metrics against the
uncompressed model's outputs, and their one-line errors."""
from __future__ import annotations

import math

import pytest
import torch

from compress.errors import BadInput
from compress.metrics import SQNR_CAP_DB, resolve_metric


def test_top1_top5_on_class_scores() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 2])
    assert resolve_metric("top1")(scores, labels) == pytest.approx(2 / 3)
    assert resolve_metric("top5")(scores, labels) == 1.0  # k is capped at the number of classes


def test_top1_per_pixel_ignores_labels_outside_the_classes() -> None:
    scores = torch.zeros(1, 2, 2, 2)
    scores[0, 1, 0, :] = 1.0  # class 1 in the top row, class 0 below
    mask = torch.tensor([[[1, 255], [0, 1]]])  # 255: VOC-style 'ignore'
    assert resolve_metric("top1")(scores, mask) == pytest.approx(2 / 3)


def test_miou_is_mean_intersection_over_union() -> None:
    scores = torch.zeros(1, 2, 1, 4)
    scores[0, 1, 0, :2] = 1.0  # predicted: 1 1 0 0
    mask = torch.tensor([[[1, 0, 0, 0]]])  # class 1: I=1, U=2; class 0: I=2, U=3
    assert resolve_metric("miou")(scores, mask) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_token_scores_use_the_last_axis() -> None:
    scores = torch.randn(2, 5, 7)  # [N, L, C]
    labels = scores.argmax(-1)
    assert resolve_metric("top1")(scores, labels) == 1.0
    assert resolve_metric("agreement")(scores, None, scores.clone()) == 1.0


def test_fidelity_metrics_against_the_reference() -> None:
    torch.manual_seed(0)
    reference = torch.randn(64, 16)
    noisy = reference + 0.1 * torch.randn(64, 16)
    cosine, sqnr, mse = (resolve_metric(m) for m in ("cosine", "sqnr", "mse"))
    assert cosine(reference, None, reference) == pytest.approx(1.0)
    assert 0.98 < cosine(noisy, None, reference) < 1.0
    expected_db = 10 * math.log10(float(reference.pow(2).sum() / (noisy - reference).pow(2).sum()))
    assert sqnr(noisy, None, reference) == pytest.approx(expected_db)
    assert sqnr(reference, None, reference) == SQNR_CAP_DB
    assert mse(noisy, None, reference) == pytest.approx(-float((noisy - reference).pow(2).mean()), rel=1e-6)
    # higher is better for every metric: the closer model scores higher
    worse = reference + 0.5 * torch.randn(64, 16)
    for metric in (cosine, sqnr, mse):
        assert metric(noisy, None, reference) > metric(worse, None, reference)


def test_fidelity_over_several_outputs_averages_them() -> None:
    torch.manual_seed(0)
    boxes, scores = torch.randn(8, 10, 4), torch.randn(8, 10, 3)
    reference = {"0": boxes, "1": scores}
    got = {"0": boxes, "1": -scores}  # second output exactly opposite
    assert resolve_metric("cosine")(got, None, reference) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("metric", "outputs", "other", "message"),
    [
        ("top1", {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long), "set model.output"),
        ("top1", torch.zeros(2, 3), torch.zeros(2, 4), "integer class targets"),
        ("top1", torch.zeros(2, 3), None, "needs targets"),
        ("miou", torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 5, dtype=torch.long), "do not match"),
    ],
)
def test_class_metric_errors_are_one_line(metric: str, outputs, other, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        resolve_metric(metric)(outputs, other)


def test_fidelity_metric_shapes_must_match_the_reference() -> None:
    with pytest.raises(BadInput, match="do not match the reference"):
        resolve_metric("cosine")(torch.zeros(2, 3), None, torch.zeros(2, 4))


def test_unknown_metric_names_the_known_ones() -> None:
    with pytest.raises(BadInput, match="agreement, cosine, sqnr, mse"):
        resolve_metric("f1")
