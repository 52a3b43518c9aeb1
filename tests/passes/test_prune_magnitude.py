"""prune.magnitude called directly: exact counts, schedules, N:M, randomized mode, structured channels."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compress.errors import BadInput
from compress.models.registry import get_builtin
from compress.passes import get_pass
from compress.sparsity import nm_ineligible_reason, nm_violations, prunable_layers
from compress.state import ModelState

SPEC = get_pass("prune.magnitude")


def _resnet8(width: int = 8, in_channels: int = 1, input_size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return get_builtin("resnet8")(in_channels=in_channels, num_classes=10, width=width, input_size=input_size)


@pytest.fixture
def small_context(random_context):
    """Random 8x8 one-channel images: none of these tests needs the network to learn anything."""
    return random_context(shape=(1, 8, 8), samples=64)


def _prune(model: nn.Module, ctx, **params) -> tuple[ModelState, dict]:
    params.setdefault("finetune", {"epochs": 0})
    state = ModelState(model)
    result = SPEC.apply(state, SPEC.config_type.model_validate(params), ctx)
    return result.state, result.info


def _zeros(module: nn.Module) -> int:
    return int((module.weight == 0).sum())


def test_global_scope_prunes_the_exact_count_and_leaves_the_classifier(small_context) -> None:
    model = _resnet8()
    state, info = _prune(model, small_context, sparsity=0.7)
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(_zeros(m) for m in layers.values()) == round(0.7 * total)
    assert _zeros(model.fc) == 0 and "fc" not in info["pruned_layers"]
    assert info["weights_zero_after"] == round(0.7 * total)
    assert info["params_nonzero_after"] == info["params_nonzero_before"] - round(0.7 * total)
    assert info["macs_before"] == info["macs_after"] > 0


def test_layer_scope_prunes_each_layer_exactly(small_context) -> None:
    model = _resnet8()
    _prune(model, small_context, sparsity=0.7, scope="layer")
    for name, module in prunable_layers(model).items():
        assert _zeros(module) == round(0.7 * module.weight.numel()), name


def test_masks_hold_through_finetuning(small_context) -> None:
    model = _resnet8()
    state, info = _prune(model, small_context, sparsity=0.6, finetune={"epochs": 1, "lr": 0.05})
    params = dict(model.named_parameters())
    assert state.masks
    for key, mask in state.masks.items():
        assert torch.all(params[key][~mask] == 0), key
        assert torch.all(params[key][mask] != 0), key  # trained weights never land on exactly 0.0
    assert info["finetune_epochs_total"] == 1
    assert 0 <= info["dnr_before"] <= 1 and 0 <= info["dnr_after"] <= 1


def _relabelled(ctx, shift: int):
    """The same images with every label moved by `shift` classes."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    x, y = ctx.data.train.tensors
    dataset = TensorDataset(x, (y + shift) % ctx.data.num_classes)
    return replace(ctx, data=replace(ctx.data, train=dataset, val=dataset, test=dataset))


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_finetune_distill_learns_from_the_input_model_not_the_labels(small_context, distill: float) -> None:
    """distill 1: the loss is the input model's soft targets only, so the labels cannot change the result."""
    weights = []
    for shift in (0, 3):
        model = _resnet8()
        _prune(model, _relabelled(small_context, shift), sparsity=0.5,
               finetune={"epochs": 1, "lr": 0.05, "distill": distill})  # fmt: skip
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    if distill == 1.0:
        torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    else:
        assert not torch.equal(weights[0], weights[1])


def test_nm_pattern_holds_in_every_reported_layer_and_the_rest_are_explained(small_context) -> None:
    model = _resnet8()
    state, info = _prune(model, small_context, granularity="nm", nm_rule="divisible", finetune={"epochs": 1})
    nm = info["nm"]
    assert nm["skipped"] == {"conv1": "1 input channels (per group) are not a multiple of m=4"}
    modules = dict(model.named_modules())
    assert set(nm["layers"]) | set(nm["skipped"]) == set(prunable_layers(model))
    for name in nm["layers"]:
        weight = modules[name].weight
        assert nm_violations(weight, 2, 4) == 0, name
        assert _zeros(modules[name]) == weight.numel() // 2, name  # exactly 2 of 4 kept, even after fine-tuning
    assert _zeros(modules["conv1"]) == 0


def test_nm_asp_rule_is_explicit(small_context) -> None:
    assert nm_ineligible_reason(torch.zeros(16, 16, 3, 3), 2, 4, "asp") is None
    assert "ASP" in nm_ineligible_reason(torch.zeros(12, 16, 3, 3), 2, 4, "asp")
    assert "ASP" in nm_ineligible_reason(torch.zeros(16, 8, 3, 3), 2, 4, "asp")
    assert nm_ineligible_reason(torch.zeros(16, 8, 3, 3), 2, 4, "divisible") is None
    # no conv with 16 input channels: ASP's rule leaves nothing to prune, an error rather than a no-op
    narrow = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    with pytest.raises(BadInput, match="nm_rule asp"):
        _prune(narrow, small_context, granularity="nm")
    model = _resnet8(width=16)
    _, info = _prune(model, small_context, granularity="nm")
    assert "layer1.0.conv1" in info["nm"]["layers"]
    assert "multiple of m=4" in info["nm"]["skipped"]["conv1"]
    assert sorted(info["nm"]["layers"] + list(info["nm"]["skipped"])) == sorted(prunable_layers(model))


def test_gradual_schedule_follows_the_cubic(small_context) -> None:
    model = _resnet8()
    _, info = _prune(model, small_context, sparsity=0.8, schedule="gradual", steps=4)
    total = info["weights_total_after"] - model.fc.weight.numel()
    expected = [0.8 + (0.0 - 0.8) * (1 - t / 4) ** 3 for t in range(1, 5)]
    assert [s["sparsity"] for s in info["steps"]] == pytest.approx(expected, abs=1 / total)
    assert info["steps"][-1]["sparsity"] == pytest.approx(0.8, abs=1 / total)


def test_gradual_prunes_while_training_over_the_ramp(small_context) -> None:
    model = _resnet8()
    # 64 samples in batches of 8: 8 optimizer steps; ramp 0.5 puts the 4 events at steps 0, 1, 2, 3
    state, info = _prune(model, small_context, sparsity=0.8, schedule="gradual", steps=4, ramp=0.5,
                         finetune={"epochs": 1, "lr": 0.05})  # fmt: skip
    assert [s["iteration"] for s in info["steps"]] == [0, 1, 2, 3]
    total = info["weights_total_after"] - model.fc.weight.numel()
    assert info["weights_zero_after"] == round(0.8 * total)
    params = dict(model.named_parameters())
    for key, mask in state.masks.items():
        assert torch.all(params[key][~mask] == 0) and torch.all(params[key][mask] != 0), key
    assert info["finetune_epochs_total"] == 1


def test_iterative_schedule_prunes_a_fifth_of_what_remains(small_context) -> None:
    model = _resnet8()
    target = 1 - 0.8**4
    _, info = _prune(model, small_context, sparsity=target, schedule="iterative", rate=0.2)
    total = info["weights_total_after"] - model.fc.weight.numel()
    assert [s["sparsity"] for s in info["steps"]] == pytest.approx([1 - 0.8**n for n in range(1, 5)], abs=1 / total)


def test_iterative_rewind_resets_surviving_weights(small_context) -> None:
    model = _resnet8()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    state, _ = _prune(model, small_context, sparsity=0.36, schedule="iterative", rewind=True)
    for key, mask in state.masks.items():
        assert torch.equal(model.state_dict()[key][mask], start[key][mask]), key


def test_randomized_mode_keeps_the_expected_fraction(small_context) -> None:
    model = _resnet8(width=16)
    layers = prunable_layers(model)
    original = {name: m.weight.detach().clone() for name, m in layers.items()}
    alpha = 0.5
    # expected pruned share per weight: exp(-w^2 / (alpha * Var(W))), Var over the weight's own layer
    probabilities = torch.cat(
        [torch.exp(-w.square() / (alpha * w.var(unbiased=False))).flatten() for w in original.values()]
    )
    _, info = _prune(model, small_context, mode="randomized", alpha=alpha)
    pruned = sum(_zeros(m) for m in layers.values())
    mean = float(probabilities.sum())
    sigma = math.sqrt(float((probabilities * (1 - probabilities)).sum()))
    assert abs(pruned - mean) < 4 * sigma
    for name, module in layers.items():  # kept weights are not rescaled
        kept = module.weight != 0
        assert torch.equal(module.weight[kept], original[name][kept]), name

    model = _resnet8(width=16)
    total = sum(m.weight.numel() for m in prunable_layers(model).values())
    _, info = _prune(model, small_context, mode="randomized", sparsity=0.6)
    realised = sum(_zeros(m) for m in prunable_layers(model).values()) / total
    assert abs(realised - 0.6) < 4 * math.sqrt(0.6 * 0.4 / total) + 1e-3
    assert info["alpha"] > 0


@pytest.mark.parametrize(
    "params, field",
    [
        ({"granularity": "nm", "sparsity": 0.3}, "sparsity"),
        ({"granularity": "nm", "schedule": "gradual"}, "schedule"),
        ({"granularity": "nm", "mode": "randomized"}, "mode"),
        ({"sparsity": 0.5, "alpha": 1.0}, "alpha"),
        ({"granularity": "unstructured"}, "sparsity"),
        ({"granularity": "nm", "n": 4, "m": 4}, "n"),
        ({"sparsity": 0.5, "rewind": True}, "rewind"),
    ],
)
def test_inconsistent_params_are_refused_naming_the_field(params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=rf"{field}:"):
        SPEC.config_type.model_validate(params)


def test_channels_give_a_smaller_model_that_reloads_weights_only(random_context) -> None:
    ctx = random_context(shape=(1, 16, 16))
    model = _resnet8(width=16, input_size=16)
    state, info = _prune(model, ctx, sparsity=0.5, granularity="channels", scope="layer", finetune={"epochs": 1})
    assert info["params_after"] < info["params_before"] / 3
    assert info["macs_ratio"] > 3.0
    assert info["channels"]["layer3.0.conv1"] == [64, 32]
    assert all(after % 8 == 0 for _, after in info["channels"].values())
    assert model.fc.out_features == 10
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    expected = model(x)

    buffer = io.BytesIO()
    torch.save(state.checkpoint(), buffer)
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=True)
    fresh = _resnet8(width=16, input_size=16)
    reloaded = ModelState.from_checkpoint(fresh, payload)
    assert torch.equal(reloaded.model.eval()(x), expected)


def test_channels_keep_earlier_masks_on_the_smaller_weights(random_context) -> None:
    ctx = random_context(shape=(1, 16, 16))
    model = _resnet8(width=16, input_size=16)
    state, _ = _prune(model, ctx, sparsity=0.5)
    state.model = model
    result = SPEC.apply(state, SPEC.config_type.model_validate({"sparsity": 0.5, "granularity": "channels"}), ctx)
    params = dict(model.named_parameters())
    for key, mask in result.state.masks.items():
        assert mask.shape == params[key].shape, key
        assert torch.all(params[key][~mask] == 0), key


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_channels_on_torchvision_models_export_and_match_in_onnx_runtime(arch: str, random_context, tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    from export.onnx_export import export_onnx
    from export.ort_runner import ort_session, predict

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    ctx = random_context(shape=(3, 32, 32), samples=8)
    _, info = _prune(model, ctx, sparsity=0.5, granularity="channels", scope="layer", measure_dnr=False)
    assert info["params_after"] < info["params_before"] / 2
    assert info["macs_ratio"] > 2.0
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    path = export_onnx(model, x[:1], tmp_path / f"{arch}.onnx")
    got = predict(ort_session(path), x.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_global_scope_never_empties_a_filter_of_a_small_weight_layer(small_context) -> None:
    """Global magnitude on layers of different weight scales (a random EfficientNet's depthwise convs):
    each filter keeps its largest weight, and the pruned count is still exact."""
    model = _resnet8()
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(1e-3)  # every weight below every other layer's
    state, _ = _prune(model, small_context, sparsity=0.5)
    tiny = model.layer1[0].conv1.weight
    assert (tiny.flatten(1) != 0).sum(dim=1).tolist() == [1] * tiny.shape[0]  # one per filter, no more
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(_zeros(m) for m in layers.values()) == round(0.5 * total)


def test_a_convolution_classifier_is_left_dense(small_context) -> None:
    """SqueezeNet's classifier is a 1x1 convolution: found by a forward pass, and not pruned."""

    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.classifier = nn.Sequential(nn.Conv2d(16, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.body(x))

    torch.manual_seed(0)
    model = ConvHead()
    with torch.no_grad():
        model.classifier[0].weight.mul_(1e-3)  # small enough that a global threshold would take all of it
    _, info = _prune(model, small_context, sparsity=0.5)
    assert "classifier.0" not in info["pruned_layers"] and _zeros(model.classifier[0]) == 0
    assert "body.2" in info["pruned_layers"]


def test_batchnorm_statistics_are_measured_again_after_channel_pruning(random_context) -> None:
    """Without fine-tuning, the pruned model's norms hold statistics of inputs that no longer exist:
    recalibrate_bn measures them on the pruned model (each BatchNorm's input has that mean and variance)."""
    ctx = random_context(shape=(1, 16, 16), samples=32)
    ctx.calibration_samples = ctx.batch_size = 32  # one batch: its statistics are the running ones
    x = ctx.data.train.tensors[0]

    def norm_inputs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        seen = {}
        hooks = [
            m.register_forward_hook(lambda m, a, _o, n=n: seen.__setitem__(n, (m, a[0])))
            for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        ]
        with torch.no_grad():
            model.eval()(x)
        for h in hooks:
            h.remove()
        return seen

    def worst_mean_error(model: nn.Module) -> float:
        errors = [
            float((m.running_mean - a.mean(dim=(0, 2, 3))).abs().max()) for m, a in norm_inputs(model).values()
        ]
        return max(errors)

    stale = _resnet8(width=16, input_size=16)
    _prune(stale, ctx, sparsity=0.5, granularity="channels", scope="layer", recalibrate_bn=False)
    fresh = _resnet8(width=16, input_size=16)
    _prune(fresh, ctx, sparsity=0.5, granularity="channels", scope="layer")
    assert worst_mean_error(stale) > 0.05
    assert worst_mean_error(fresh) < 0.01  # (train-mode normalisation divides by the biased variance)
    for m, a in norm_inputs(fresh).values():
        torch.testing.assert_close(m.running_var, a.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-4)
