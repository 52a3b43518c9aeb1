"""Task and distillation losses for outputs of any shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.errors import BadInput
from compress.losses import cross_entropy, kd_cosine, kd_mse, kl, resolve_kd_loss, resolve_loss
from compress.metrics import resolve_metric


def test_auto_loss_follows_the_targets() -> None:
    assert resolve_loss("auto", torch.tensor(3)) is cross_entropy
    assert resolve_loss("auto", torch.zeros(384)) is not cross_entropy
    assert resolve_loss("auto", None) is None  # no targets: distillation alone


def test_cross_entropy_per_pixel_ignores_out_of_range_labels() -> None:
    scores = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, 0, 0] = 255
    expected = F.cross_entropy(scores, torch.where(mask == 255, -100, mask), ignore_index=-100)
    assert cross_entropy(scores, mask) == pytest.approx(float(expected))


def test_cross_entropy_with_too_few_classes_is_one_line() -> None:
    with pytest.raises(BadInput, match="targets reach 930 but the model gives 384 class scores"):
        cross_entropy(torch.randn(4, 384), torch.tensor([1, 2, 930, 3]))


def test_kl_matches_batchmean_kl_for_class_scores() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    expected = F.kl_div(F.log_softmax(student / 4, 1), F.log_softmax(teacher / 4, 1), log_target=True, reduction="batchmean") * 16
    assert float(kl(student, teacher, 4.0)) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_losses_are_zero_when_student_equals_teacher() -> None:
    outputs = (torch.randn(4, 10, 4), torch.randn(4, 10, 3))
    for loss in (kl, kd_mse, kd_cosine):
        assert float(loss(outputs, outputs, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_auto_kd_loss_follows_the_metric() -> None:
    assert resolve_kd_loss("auto", resolve_metric("top1")) is kl
    assert resolve_kd_loss("auto", resolve_metric("cosine")) is kd_cosine
    assert resolve_kd_loss("auto", resolve_metric("sqnr")) is kd_mse


def test_python_loss_failures_name_the_callable(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_losses.py").write_text(
        "def boom(outputs, targets):\n    raise KeyError('logits')\n\ndef vector(outputs, targets):\n    return outputs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BadInput, match="loss: python:my_losses:boom failed: KeyError"):
        resolve_loss("python:my_losses:boom", None)(torch.zeros(2, 3), None)
    with pytest.raises(BadInput, match="expected a scalar float tensor"):
        resolve_loss("python:my_losses:vector", None)(torch.zeros(2, 3), None)
