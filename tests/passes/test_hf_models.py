"""prune.magnitude (unstructured, 2:4, heads and MLP channels) and distill.dot's feature distillation on
unmodified Hugging Face `transformers` models (issue 19): BERT (dict samples of token ids and a padding
mask, label-free), ViT for image classification (class targets, a ModelOutput with logits) and GPT-2
(transformers' Conv1D layers, weight [in, out], and an lm_head tied to the word embedding).

Small configs with random weights (hidden 32, 2 layers, 4 heads of 8), a handful of samples, through
the pass entry a run uses.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.batches import call_model, leaves, stack_samples
from compress.errors import BadInput
from compress.losses import FeatureDistillation
from compress.passes import get_pass
from compress.sparsity import input_axis, nm_violations, output_layer_names, prunable_layers, transposed_linear_types
from compress.state import ModelState, StageContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pass_helpers import any_context, run_pass  # noqa: E402

transformers = pytest.importorskip("transformers")

PRUNE, DISTILL = get_pass("prune.magnitude"), get_pass("distill.dot")
HEADS, HEAD_DIM = 4, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def bert(samples: int = 8) -> tuple[nn.Module, StageContext]:
    """BertModel on {input_ids, attention_mask} with padding, no targets, gated on cosine."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    items = [
        ({"input_ids": torch.randint(0, 100, (12,), generator=generator), "attention_mask": (torch.arange(12) < 8 + i % 5).long()},)
        for i in range(samples)
    ]
    return model, any_context(model, items, "cosine", "none")


def vit(samples: int = 10, labelled: bool = True) -> tuple[nn.Module, StageContext]:
    """ViTForImageClassification on 16x16 images with class targets, gated on top-1 (unlabelled: agreement)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    items = [(torch.randn(3, 16, 16, generator=generator), i % 5)[: 2 if labelled else 1] for i in range(samples)]
    if not labelled:
        return model, any_context(model, items, "agreement", "none", (3, 16, 16))
    return model, any_context(model, items, "top1", "classes", (3, 16, 16))


def gpt2(samples: int = 8) -> tuple[nn.Module, StageContext]:
    """GPT2LMHeadModel on token ids, no targets, gated on next-token agreement."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=HEADS, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    items = [({"input_ids": torch.randint(0, 100, (12,), generator=generator)},) for _ in range(samples)]
    return model, any_context(model, items, "agreement", "none")


MODELS = {"bert": bert, "vit": vit, "gpt2": gpt2}
EMBEDDINGS = {"bert": "embeddings.word_embeddings", "vit": "vit.embeddings.cls_token", "gpt2": "transformer.wte"}


def _shapes(model: nn.Module, ctx: StageContext) -> list[tuple[str, tuple[int, ...]]]:
    with torch.no_grad():
        return [(name, tuple(t.shape)) for name, t in leaves(call_model(model.eval(), ctx.example()))]


def _pruned(model: nn.Module, info: dict) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in info["pruned_layers"]}


def _zeros(layers: dict[str, nn.Module]) -> float:
    return sum(int((m.weight == 0).sum()) for m in layers.values()) / sum(m.weight.numel() for m in layers.values())


def _embedding_weight(model: nn.Module, name: str) -> torch.Tensor:
    found = dict(model.named_parameters())
    return found.get(f"{name}.weight", found.get(name))


# --- unstructured and 2:4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_unstructured_half_of_every_selected_layer_with_fine_tuning(name: str) -> None:
    model, ctx = MODELS[name]()
    shapes = _shapes(model, ctx)
    heads = set(output_layer_names(model, ctx.example()))
    embedding_zeros = int((_embedding_weight(model, EMBEDDINGS[name]) == 0).sum())  # BERT's padding row
    state, info = run_pass(PRUNE, model, ctx, sparsity=0.5, measure_dnr=False, finetune={"epochs": 1, "lr": 0.01})
    layers = _pruned(model, info)
    assert abs(_zeros(layers) - 0.5) < 1e-3  # held through the fine-tuning, on every kind of layer
    assert not heads & set(layers)  # BERT's pooler, ViT's classifier, GPT-2's lm_head: dense
    assert sorted(state.masks) == sorted(f"{layer}.weight" for layer in layers)
    assert int((_embedding_weight(model, EMBEDDINGS[name]) == 0).sum()) == embedding_zeros
    if name == "gpt2":
        assert all(isinstance(m, transposed_linear_types()) for m in layers.values()) and len(layers) == 8
    assert _shapes(model, ctx) == shapes
    assert 0 <= ctx.evaluate(model) <= 1


@pytest.mark.parametrize("name", MODELS)
def test_2_to_4_along_the_input_dimension_conv1d_included(name: str) -> None:
    model, ctx = MODELS[name]()
    original = copy.deepcopy(model)
    shapes = _shapes(model, ctx)
    _, info = run_pass(PRUNE, model, ctx, granularity="nm", measure_dnr=False, finetune={"epochs": 0})
    layers = _pruned(model, info)
    assert info["nm"]["rule"] == "asp" and info["nm"]["layers"] == sorted(layers)
    assert len(layers) == (8 if name == "gpt2" else 12)  # every q, k, v, output and MLP layer
    for layer_name, module in layers.items():
        axis = input_axis(module)
        assert axis == (0 if name == "gpt2" else 1), layer_name
        assert nm_violations(module.weight, 2, 4, axis) == 0, layer_name
        assert float((module.weight == 0).float().mean()) == 0.5, layer_name
        # the two largest |w| of every group of four inputs are the ones kept
        before = original.get_submodule(layer_name).weight.detach().abs().movedim(axis, -1).reshape(-1, 4)
        kept = (module.weight != 0).movedim(axis, -1).reshape(-1, 4)
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, before.topk(2, dim=1).indices, True)), layer_name
    if name == "gpt2":  # along the output axis the pattern does not hold: the groups ran along axis 0
        assert all(nm_violations(m.weight, 2, 4, axis=1) > 0 for m in layers.values())
    assert _shapes(model, ctx) == shapes


def test_gpt2_tied_lm_head_stays_dense_even_with_prune_classifier() -> None:
    model, ctx = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head" not in prunable_layers(model, include_classifier=True)
    _, info = run_pass(PRUNE, model, ctx, sparsity=0.5, prune_classifier=True, measure_dnr=False, finetune={"epochs": 0})
    assert info["tied_dense"] == {"lm_head": "transformer.wte.weight"}
    assert "lm_head" not in info["pruned_layers"]
    assert bool((model.transformer.wte.weight != 0).all())
    assert abs(_zeros(_pruned(model, info)) - 0.5) < 1e-3


# --- heads and MLP channels ----------------------------------------------------------------------------------


def _attention(model: nn.Module) -> dict[str, tuple[nn.Module, list[nn.Linear], nn.Linear]]:
    """{path: (attention module, [q, k, v], the layer reading the heads)} of BERT's or ViT's layers."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, transformers.models.bert.modeling_bert.BertSelfAttention):
            parent = model.get_submodule(path.rsplit(".", 1)[0])
            found[path] = (module, [module.query, module.key, module.value], parent.output.dense)
        elif isinstance(module, transformers.models.vit.modeling_vit.ViTAttention):
            found[path] = (module, [module.q_proj, module.k_proj, module.v_proj], module.o_proj)
    return found


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_channels_remove_whole_heads_and_mlp_channels(name: str) -> None:
    model, ctx = MODELS[name]()
    shapes = _shapes(model, ctx)
    _, info = run_pass(
        PRUNE, model, ctx, granularity="channels", sparsity=0.5, scope="layer", measure_dnr=False, finetune={"epochs": 1}
    )  # fmt: skip
    attention = _attention(model)
    assert info["heads"] == {path: [HEADS, HEADS // 2] for path in attention}
    for path, (module, qkv, out) in attention.items():
        assert module.num_attention_heads == HEADS // 2, path
        assert [layer.out_features for layer in qkv] == [HEADS // 2 * HEAD_DIM] * 3, path
        assert out.in_features == HEADS // 2 * HEAD_DIM and out.out_features == 32, path
        if name == "bert":
            assert module.all_head_size == HEADS // 2 * HEAD_DIM
    mlp = [n for n in info["channels"] if n.endswith(("intermediate.dense", "mlp.fc1"))]
    assert len(mlp) == 2 and all(info["channels"][n] == [64, 32] for n in mlp)
    assert model.config.hidden_size == 32 and _shapes(model, ctx) == shapes
    assert info["macs_ratio"] > 1.2
    # the checkpoint rebuilds the pruned model from a fresh one (head counts in its structure record)
    fresh = MODELS[name]()[0]
    ModelState.from_checkpoint(fresh, ModelState(model).checkpoint())
    assert [m.num_attention_heads for m, _, _ in _attention(fresh).values()] == [HEADS // 2] * 2
    with torch.no_grad():
        got, want = call_model(fresh.eval(), ctx.example()), call_model(model.eval(), ctx.example())
    assert all(torch.allclose(a, b) for (_, a), (_, b) in zip(leaves(got), leaves(want)))


def test_gpt2_channels_are_refused_in_one_line_naming_the_module() -> None:
    model, ctx = gpt2(4)
    before = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(BadInput) as caught:
        run_pass(PRUNE, model, ctx, granularity="channels", sparsity=0.5, measure_dnr=False, finetune={"epochs": 0})
    message = str(caught.value)
    assert message.startswith("module 'transformer.h.0.attn' (GPT2Attention): granularity channels: head pruning ")
    assert "c_attn (Conv1D)" in message and "\n" not in message
    assert {k: v.shape for k, v in model.state_dict().items()} == before  # nothing half-pruned


# --- feature distillation --------------------------------------------------------------------------------------


def _feature_mse(student: nn.Module, teacher: nn.Module, ctx: StageContext, patterns: list[str]) -> float:
    samples = stack_samples(ctx.data.train)
    with FeatureDistillation(student, teacher, patterns) as features, torch.no_grad():
        call_model(student.eval(), samples)
        call_model(teacher.eval(), samples)
        return features.loss().item()


BLOCKS = {"bert": "encoder.layer.?", "vit": "vit.layers.?", "gpt2": "transformer.h.?"}


@pytest.mark.parametrize("name", MODELS)
def test_label_free_feature_distillation_moves_the_student_toward_the_teachers_blocks(name: str) -> None:
    model, ctx = vit(16, labelled=False) if name == "vit" else MODELS[name](16)
    with torch.no_grad():  # a student away from the baseline (the teacher)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    patterns = [BLOCKS[name]]
    start = _feature_mse(model, ctx.baseline.model, ctx, patterns)
    _, info = run_pass(DISTILL, model, ctx, epochs=8, lr=0.2, w_kd=0.0, features=patterns, w_features=1.0)
    assert info["features"] == [BLOCKS[name].replace("?", str(i)) for i in range(2)]
    assert info["task_loss"] == "none (unlabelled data): distillation loss alone"
    assert _feature_mse(model, ctx.baseline.model, ctx, patterns) < 0.6 * start  # measured: 0.28-0.41


def test_features_after_head_pruning_read_the_blocks_and_refuse_narrowed_modules() -> None:
    model, ctx = vit()
    run_pass(PRUNE, model, ctx, granularity="channels", sparsity=0.5, measure_dnr=False, finetune={"epochs": 0})
    _, info = run_pass(DISTILL, copy.deepcopy(model), ctx, epochs=1, lr=0.01, features=["vit.layers.?"])
    assert info["task_loss"] == "ce" and info["kd_loss"] == "kl" and len(info["features"]) == 2
    with pytest.raises(BadInput, match=r"features: module 'vit\.layers\.0\.mlp\.fc1' outputs \[\d+, 17, \d+\] in the student"):
        run_pass(DISTILL, model, ctx, epochs=1, features=["vit.layers.0.mlp.fc1"])
    with pytest.raises(BadInput, match=r"features: \['decoder\.\*'\] match no module of the student"):
        run_pass(DISTILL, model, ctx, epochs=1, features=["decoder.*"])
    with pytest.raises(Exception, match=r"features: feature distillation needs a teacher"):
        DISTILL.config_type.model_validate({"trainer": "ce", "features": ["vit.layers.?"]})
