"""The model-zoo matrix (compress.zoo): every step of the pipeline on each model, real Torch-Pruning
and ONNX Runtime, random weights and data.

Default run: the small ViT and Swin (torchvision's own classes), the nn.TransformerEncoder classifier and
transformers' ViTForImageClassification and GPT2LMHeadModel from small configs (a ModelOutput whose
logits the metrics read; GPT-2 on token ids, its heads pruned out of the packed Conv1D c_attn), with
minimal settings. The twelve full-size models of issue 10 are marked `zoo` (and slow): minutes each
on two cores, so `make test` leaves them out; run them with `pytest -m zoo` or bench/zoo.py.
"""
from __future__ import annotations

import pytest

from compress.zoo import STEPS, TINY, ZOO, Settings, ZooResult, format_table, run_zoo_model

pytest.importorskip("torchvision")

FAST = Settings(train_samples=16, val_samples=8, parity_samples=128, iterations=2, calibration_samples=16, latency_runs=0)


def _check(result: ZooResult) -> None:
    failed = {name: step.error for name, step in result.steps.items() if step.status != "ok"}
    assert not failed, failed
    assert result.parity["top1_agreement"] >= 0.99
    assert result.steps["prune-ch"].info["reload_diff"] <= 1e-4
    assert result.steps["quantize"].info["reload_diff"] <= 1e-5
    assert result.steps["lint"].info["findings"] == []
    assert result.size_ratio is not None and result.size_ratio < 0.5  # int8 weights, a quarter pruned


@pytest.mark.parametrize("zoo", TINY, ids=[z.name for z in TINY])
def test_small_transformers_through_every_step(zoo) -> None:  # noqa: ANN001
    result = run_zoo_model(zoo, FAST)
    _check(result)
    # whole heads went, structurally, and the pruned model exported and ran (parity above)
    assert result.heads
    before = sum(b for b, _ in result.heads.values())
    after = sum(a for _, a in result.heads.values())
    assert after == before - int(before * FAST.channel_sparsity)


def test_failed_step_is_recorded_with_module_and_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from compress.zoo import ZooModel

    module = types.ModuleType("zoo_test_models")
    module.branchy = branchy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zoo_test_models", module)
    # a model whose forward branches on data: every pass runs (quantization places its quantizers by module
    # swap where torch.fx cannot trace), but an ONNX trace would freeze the branch: export fails, named
    result = run_zoo_model(ZooModel("branchy", "python:zoo_test_models:branchy"), FAST)
    assert result.steps["prune-un"].status == "ok" and result.steps["distill"].status == "ok"
    assert result.steps["quantize"].status == "ok"
    export = result.steps["export"]
    assert export.status == "fail"
    assert "data-dependent control flow" in export.error and "test_zoo.py" in export.error
    assert result.steps["lint"].status == "skip" and not result.passed
    table = format_table([result])
    assert "branchy" in table and "gaps:" in table and "data-dependent control flow" in table


def branchy():  # noqa: ANN201
    import torch
    from torch import nn

    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.mean() > 0 else -x

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = Gate()
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gate(self.conv(x)).mean((2, 3)))

    return Branchy()


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("zoo", ZOO, ids=[z.name for z in ZOO])
def test_zoo_model_through_every_step(zoo) -> None:  # noqa: ANN001
    result = run_zoo_model(zoo)
    _check(result)
    if zoo.name in ("vit_b_16", "swin_t"):  # whole heads pruned, and the model still exported and ran
        assert sum(a for _, a in result.heads.values()) < sum(b for b, _ in result.heads.values())
    assert list(result.steps) == list(STEPS)


def test_channel_shuffle_prunes_branch_channels_only() -> None:
    """ShuffleNet: the channels a shuffle permutes (those reaching its concat/split) stay whole, the
    channels inside the branches are pruned, and the pruned model runs with the real shuffle."""
    import torch
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    from compress.channels import ChannelPruner, channel_counts
    from compress.sparsity import PRUNABLE_TYPES

    torch.manual_seed(0)
    model = ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = channel_counts(model)
    selected = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    pruner = ChannelPruner(model, x[:1], ratios=[0.25], global_ranking=False, selected=selected, classifier="fc", round_to=None)
    pruner.step()
    after = channel_counts(model)
    assert model(x).shape == (2, 10)
    changed = {n for n in before if after[n] != before[n]}
    assert {"stage2.0.branch2.0", "stage3.0.branch2.0", "stage4.0.branch2.0"} <= changed
    assert not [n for n in changed if n.endswith(("branch1.2", "branch2.5"))]  # the shuffled channels


def test_class_head_fits_squeezenets_convolution_head_behind_its_relu() -> None:
    """SqueezeNet's output layer is a 1x1 convolution followed by ReLU and average pooling: class_head
    fits it on the pooled features and lifts its biases so that the ReLU clips nothing on the prototypes,
    so each prototype is classified as its own class (a random head's logits barely vary)."""
    import torch
    from torchvision.models import squeezenet1_1

    from compress.zoo import class_head

    torch.manual_seed(0)
    model = squeezenet1_1(num_classes=10).eval()
    centres = torch.randn(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert class_head(model, centres)
        logits = model(centres)
        head_out = model.classifier[1](model.features(centres))
    assert bool((head_out >= 0).all())  # the ReLU after the head passes every position unchanged
    assert logits.argmax(dim=1).tolist() == list(range(10))
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 0.05
