"""prune.ap: the AP selection rule, the cycle arithmetic, and a whole pass on a small ResNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.models.registry import get_builtin
from compress.passes import get_pass
from compress.passes.prune_ap import ap_masks, cycle_sparsities
from compress.sparsity import prunable_layers
from compress.state import ModelState

SPEC = get_pass("prune.ap")


def test_ap_prunes_the_alive_negative_weights_that_moved_least() -> None:
    layer = nn.Linear(4, 2, bias=False)
    start = torch.tensor([[-1.0, -1.0, 1.0, -2.0], [-1.0, 0.5, -3.0, -1.0]])
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.1, -0.5, 0.9, -2.05], [0.0, 0.4, -2.0, -1.3]]))
    # [1, 0] was pruned earlier (mask False), positives never qualify
    masks = {"fc.weight": torch.tensor([[True, True, True, True], [False, True, True, True]])}
    keep, candidates = ap_masks({"fc": layer}, masks, {"fc.weight": start}, count=2)
    assert candidates == 5  # -1.1, -0.5, -2.05, -2.0, -1.3
    # movements: -1.1 -> 0.1, -0.5 -> 0.5, -2.05 -> 0.05, -2.0 -> 1.0, -1.3 -> 0.3
    expected = torch.ones(2, 4, dtype=torch.bool)
    expected[0, 3] = expected[0, 0] = False
    assert torch.equal(keep["fc.weight"], expected)
    keep, _ = ap_masks({"fc": layer}, masks, {"fc.weight": start}, count=10)
    assert int((~keep["fc.weight"]).sum()) == 5  # never more than the candidates


def test_cycles_remove_the_same_fraction_of_what_remains() -> None:
    targets = cycle_sparsities(0.0, 1 - 0.8**3, 3)
    assert targets == pytest.approx([0.2, 0.36, 0.488])
    assert cycle_sparsities(0.5, 0.75, 2) == pytest.approx([1 - 0.5 * 0.5**0.5, 0.75])


@pytest.fixture
def pruned(random_context):
    def run(ap_share: float) -> tuple[nn.Module, dict, ModelState]:
        torch.manual_seed(0)
        model = get_builtin("resnet8")(in_channels=1, num_classes=10, width=8, input_size=8)
        ctx = random_context(shape=(1, 8, 8), samples=64)
        cfg = SPEC.config_type.model_validate(
            {"sparsity": 0.8, "cycles": 2, "ap_share": ap_share, "finetune": {"epochs": 1, "lr": 0.05}}
        )
        result = SPEC.apply(ModelState(model), cfg, ctx)
        return model, result.info, result.state

    return run


def test_ap_pass_hits_the_exact_sparsity_and_reports_dnr(pruned) -> None:
    model, info, state = pruned(ap_share=0.2)
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.8 * total)
    assert [c["sparsity"] for c in info["cycles"]] == pytest.approx(cycle_sparsities(0.0, 0.8, 2), abs=1 / total)
    for cycle in info["cycles"]:
        new = cycle["base_pruned"] + cycle["ap_pruned"]
        assert cycle["ap_pruned"] == round(0.2 * new) and cycle["ap_shortfall"] == 0
    for key in ("dnr_before", "dnr_after"):
        assert 0.0 <= info[key] <= 1.0
    assert info["finetune_epochs_total"] == 3
    # BatchNorm is never pruned (the official code prunes BN gamma by selecting on 'weight')
    assert all(not key.startswith(("bn", "layer1.0.bn")) for key in state.masks)
    assert set(state.masks) == {f"{name}.weight" for name in layers}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight != 0)
    params = dict(model.named_parameters())
    for key, mask in state.masks.items():
        assert torch.all(params[key][~mask] == 0), key


def test_zero_ap_share_is_the_plain_base(pruned) -> None:
    _, info, _ = pruned(ap_share=0.0)
    assert all(c["ap_pruned"] == 0 for c in info["cycles"])
