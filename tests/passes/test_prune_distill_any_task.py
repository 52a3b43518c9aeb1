"""prune.magnitude, prune.ap and distill.dot on models that are not image classifiers (issue 18): a
segmenter with a dict output and per-pixel class targets, a detector head returning (boxes, scores) on
unlabelled data, and an embedder taking a dict of int64 token ids with float embedding targets.

Real torchvision models, real Torch-Pruning; tiny data (8 samples, one epoch) so each runs in seconds.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.batches import call_model, leaves
from compress.errors import BadInput
from compress.passes import get_pass
from compress.sparsity import nm_violations, output_layer_names
from compress.state import ModelState, StageContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pass_helpers import any_context, run_pass  # noqa: E402

torchvision = pytest.importorskip("torchvision")

PRUNE, AP, DISTILL = get_pass("prune.magnitude"), get_pass("prune.ap"), get_pass("distill.dot")
UNLABELLED = "none (unlabelled data): distillation loss alone"


pytestmark = pytest.mark.usefixtures("one_thread")


class DetectorHead(nn.Module):
    """SSDLite without post-processing: raw box regressions [B, N, 4] and class scores [B, N, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=5
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.ssd.backbone(x)
        head = self.ssd.head(list(features.values()))
        return head["bbox_regression"], head["cls_logits"]


class Embedder(nn.Module):
    """Token ids (int64) and a mask, as keyword inputs -> one pooled embedding per sample."""

    def __init__(self, vocab: int = 50, dim: int = 32, out: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, out))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.embed(ids) + self.mlp(self.embed(ids)))
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def _segmentation(samples: int = 8):
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    generator = torch.Generator().manual_seed(1)
    items = [
        (torch.randn(3, 64, 64, generator=generator), torch.randint(0, 4, (64, 64), generator=generator))
        for _ in range(samples)
    ]
    return model, any_context(model, items, "miou", "other", (3, 64, 64))


def _detector(samples: int = 8, metric: str = "cosine"):
    torch.manual_seed(0)
    model = DetectorHead().eval()
    generator = torch.Generator().manual_seed(1)
    items = [(torch.randn(3, 64, 64, generator=generator),) for _ in range(samples)]
    return model, any_context(model, items, metric, "none", (3, 64, 64))


def _embedder(samples: int = 16, labelled: bool = True):
    torch.manual_seed(0)
    model = Embedder()
    teacher = Embedder()  # targets: another model's embeddings (float, [16] per sample)
    generator = torch.Generator().manual_seed(1)
    items = []
    for _ in range(samples):
        sample = {"ids": torch.randint(0, 50, (12,), generator=generator), "mask": torch.ones(12)}
        with torch.no_grad():
            target = teacher(sample["ids"][None], sample["mask"][None])[0]
        items.append((sample, target) if labelled else (sample,))
    return model, any_context(model, items, "mse", "other" if labelled else "none")


def _outputs(model: nn.Module, ctx: StageContext) -> list[tuple[str, tuple[int, ...]]]:
    with torch.no_grad():
        return [(name, tuple(t.shape)) for name, t in leaves(call_model(model.eval(), ctx.example()))]


# --- output layers ---------------------------------------------------------------------------------------


def test_every_output_head_has_its_prediction_layers_found() -> None:
    model, ctx = _segmentation(2)
    assert output_layer_names(model, ctx.example()) == ["classifier.low_classifier", "classifier.high_classifier"]
    deeplab = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    assert output_layer_names(deeplab, ctx.example()) == ["classifier.4"]
    model, ctx = _detector(2)
    found = output_layer_names(model, ctx.example())
    assert len(found) == 12  # six feature levels, a box conv and a class conv each
    assert all(name.startswith("ssd.head.") and name.endswith(".1") for name in found)
    model, ctx = _embedder(2)
    assert output_layer_names(model, ctx.example()) == ["head.2"]


# --- prune.magnitude -------------------------------------------------------------------------------------


def test_segmenter_channels_finetune_on_pixel_classes_distilling_from_the_input_model() -> None:
    model, ctx = _segmentation()
    shapes = _outputs(model, ctx)
    _, info = run_pass(
        PRUNE, model, ctx, granularity="channels", sparsity=0.25, finetune={"epochs": 1, "distill": 0.5}
    )  # fmt: skip
    assert info["finetune_loss"] == "ce" and info["finetune_kd_loss"] == "kl"  # miou reads class scores
    assert info["macs_ratio"] > 1.3
    assert _outputs(model, ctx) == shapes == [("out", (1, 4, 64, 64))]
    assert model.classifier.low_classifier.out_channels == model.classifier.high_classifier.out_channels == 4
    assert 0 <= ctx.evaluate(model) <= 1


def test_unlabelled_detector_head_channels_finetune_on_distillation_alone() -> None:
    model, ctx = _detector()
    shapes = _outputs(model, ctx)
    before = copy.deepcopy(model.state_dict())
    _, info = run_pass(PRUNE, model, ctx, granularity="channels", sparsity=0.25, measure_dnr=False, finetune={"epochs": 1})
    assert info["finetune_loss"] == UNLABELLED and info["finetune_kd_loss"] == "cosine"
    assert info["macs_ratio"] > 1.3
    assert _outputs(model, ctx) == shapes == [("0", (1, 144, 4)), ("1", (1, 144, 5))]
    heads = output_layer_names(model, ctx.example())
    assert len(heads) == 12
    for name in heads:  # every head's final conv keeps its outputs (its inputs may shrink)
        assert model.get_submodule(name).out_channels == before[f"{name}.weight"].shape[0], name
    assert 0.0 < ctx.evaluate(model) < 1.0


@pytest.mark.parametrize("granularity", ["unstructured", "nm"])
def test_unlabelled_detector_head_unstructured_and_2to4_leave_every_head_dense(granularity: str) -> None:
    model, ctx = _detector(8)
    params = {"sparsity": 0.5} if granularity == "unstructured" else {"nm_rule": "divisible"}
    _, info = run_pass(PRUNE, model, ctx, granularity=granularity, measure_dnr=False, finetune={"epochs": 1}, **params)
    heads = set(output_layer_names(model, ctx.example()))
    assert not heads & set(info["pruned_layers"])
    assert all(int((model.get_submodule(name).weight == 0).sum()) == 0 for name in heads)
    for name in info["pruned_layers"]:
        weight = model.get_submodule(name).weight
        if granularity == "nm" and name in info["nm"]["layers"]:
            assert nm_violations(weight, 2, 4) == 0, name
    assert info["weights_zero_after"] > info["weights_zero_before"]
    assert info["finetune_loss"] == UNLABELLED


def test_token_id_embedder_channels_finetune_on_float_targets() -> None:
    model, ctx = _embedder()
    _, info = run_pass(
        PRUNE, model, ctx, granularity="channels", sparsity=0.5, scope="layer", round_to=None, finetune={"epochs": 1}
    )  # fmt: skip
    assert info["finetune_loss"] == "mse" and "finetune_kd_loss" not in info
    assert model.mlp[0].out_features == 32 and model.head[0].out_features == 32
    assert model.mlp[2].out_features == 32  # writes the normalised residual stream: kept
    assert model.head[2].out_features == 16
    assert _outputs(model, ctx) == [("", (1, 16))]


def test_an_explicit_loss_without_targets_is_one_line() -> None:
    model, ctx = _embedder(4, labelled=False)
    with pytest.raises(BadInput, match=r"params\.finetune\.loss: mse needs targets, and the data has none"):
        run_pass(PRUNE, model, ctx, sparsity=0.5, finetune={"epochs": 1, "loss": "mse"})


def test_unknown_losses_are_refused_naming_the_field() -> None:
    with pytest.raises(Exception, match=r"loss"):
        PRUNE.config_type.model_validate({"sparsity": 0.5, "finetune": {"loss": "huber"}})
    with pytest.raises(Exception, match=r"kd_loss"):
        DISTILL.config_type.model_validate({"kd_loss": "l1"})


# --- prune.ap --------------------------------------------------------------------------------------------


def test_ap_on_the_unlabelled_detector_head_recovers_by_distillation() -> None:
    model, ctx = _detector(8)
    _, info = run_pass(AP, model, ctx, sparsity=0.5, cycles=1, finetune={"epochs": 1})
    assert info["finetune_loss"] == UNLABELLED
    assert abs(info["cycles"][-1]["sparsity"] - 0.5) < 1e-3
    assert not set(output_layer_names(model, ctx.example())) & set(info["pruned_layers"])


def test_ap_on_the_segmenter_trains_on_pixel_classes() -> None:
    model, ctx = _segmentation(8)
    _, info = run_pass(AP, model, ctx, sparsity=0.5, cycles=1, finetune={"epochs": 1})
    assert info["finetune_loss"] == "ce"
    assert info["dnr_after"] is not None


# --- distill.dot -----------------------------------------------------------------------------------------


def _shrink(model: nn.Module, ctx: StageContext) -> None:
    """The student: the model channel-pruned without fine-tuning (what distill.dot recovers)."""
    run_pass(PRUNE, model, ctx, granularity="channels", sparsity=0.25, measure_dnr=False, finetune={"epochs": 0})


def test_dot_on_the_segmenter_with_pixel_class_targets() -> None:
    model, ctx = _segmentation()
    _shrink(model, ctx)
    before = copy.deepcopy(model.state_dict())
    _, info = run_pass(DISTILL, model, ctx, epochs=1, lr=0.01)
    assert info["task_loss"] == "ce" and info["kd_loss"] == "kl" and "update" not in info
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dot_on_the_unlabelled_detector_head_runs_on_distillation_alone() -> None:
    model, ctx = _detector()
    _shrink(model, ctx)
    teacher_before = copy.deepcopy(ctx.baseline.model.state_dict())
    _, info = run_pass(DISTILL, model, ctx, epochs=1, lr=0.01)
    assert info["task_loss"] == UNLABELLED and info["kd_loss"] == "cosine"
    assert "DOT's two momenta need a task loss" in info["update"]
    assert all(torch.equal(teacher_before[k], v) for k, v in ctx.baseline.model.state_dict().items())
    assert 0.0 < ctx.evaluate(model) < 1.0


def test_unlabelled_dot_is_sgd_on_the_distillation_loss_and_brings_the_student_closer() -> None:
    model, ctx = _embedder(labelled=False)
    with torch.no_grad():  # a student away from the baseline it distils from
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    start = ctx.evaluate(model)
    twin = copy.deepcopy(model)
    _, dot = run_pass(DISTILL, model, ctx, epochs=8, lr=0.05, trainer="dot")
    _, kd = run_pass(DISTILL, twin, ctx, epochs=8, lr=0.05, trainer="kd")
    assert dot["task_loss"] == kd["task_loss"] == UNLABELLED and dot["kd_loss"] == "mse"  # metric mse
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name
    assert ctx.evaluate(model) > start  # minus the mean squared distance to the baseline's outputs


def test_dot_on_token_ids_with_float_targets() -> None:
    model, ctx = _embedder()
    _shrink(model, ctx)
    _, info = run_pass(DISTILL, model, ctx, epochs=1, lr=0.01)
    assert info["task_loss"] == "mse" and info["kd_loss"] == "mse"


def test_unlabelled_data_refuses_a_task_loss_and_trainer_ce() -> None:
    model, ctx = _embedder(4, labelled=False)
    with pytest.raises(BadInput, match=r"params\.loss: ce needs targets, and the data has none"):
        run_pass(DISTILL, model, ctx, loss="ce")
    with pytest.raises(BadInput, match=r"params\.trainer: ce trains on the task loss alone, and the data has no targets"):
        run_pass(DISTILL, model, ctx, trainer="ce")


def test_a_teacher_of_another_output_structure_is_one_line() -> None:
    model, ctx = _embedder(4)
    ctx.baseline = ModelState(Embedder(out=8))
    with pytest.raises(BadInput, match=r"params\.teacher: baseline gives outputs tensor \[1, 8\], the student tensor \[1, 16\]"):
        run_pass(DISTILL, model, ctx)
