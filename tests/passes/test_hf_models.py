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


def _kept_columns(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which of `before`'s columns `after` kept (each column of `after` equals one of them)."""
    return [int((before - column[:, None]).abs().sum(dim=0).argmin()) for column in after.t()]


def _gpt2_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    return [(block.attn, block.mlp) for block in model.transformer.h]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gpt2_channels_remove_whole_packed_heads_and_mlp_channels(scope: str) -> None:
    """GPT-2's Conv1D blocks (compress.conv1d_channels): whole heads out of the packed c_attn (the same
    columns of q, k and v) with c_proj's rows, MLP channels out of c_fc and c_proj, the lowest-ranked ones:
    the pruned model computes exactly what the original does with those heads' and channels' outputs
    zeroed, and its checkpoint rebuilds it from a fresh model."""
    model, ctx = gpt2()
    original = copy.deepcopy(model)
    shapes = _shapes(model, ctx)
    _, info = run_pass(
        PRUNE, model, ctx, granularity="channels", sparsity=0.5, scope=scope, measure_dnr=False, finetune={"epochs": 0}
    )  # fmt: skip
    width, mlp_width = HEADS * HEAD_DIM, 4 * HEADS * HEAD_DIM
    paths = [f"transformer.h.{i}.attn" for i in range(2)]
    if scope == "layer":
        assert info["heads"] == {path: [HEADS, HEADS // 2] for path in paths}
        assert {n: c for n, c in info["channels"].items() if n.endswith("c_fc")} == {
            f"transformer.h.{i}.mlp.c_fc": [mlp_width, mlp_width // 2] for i in range(2)
        }
    else:  # half of all heads, half of all MLP channels wherever they rank lowest, each block's rounded down to 8
        assert sum(after for _, after in info["heads"].values()) == HEADS  # of 2 x 4
        widths = [c[1] for n, c in info["channels"].items() if n.endswith("c_fc")]
        assert all(k % 8 == 0 for k in widths) and mlp_width - 2 * 8 < sum(widths) <= mlp_width
    assert info["macs_ratio"] > 1.2  # Conv1D MACs counted (Torch-Pruning's counter has no rule for them)
    zeroed = copy.deepcopy(original).requires_grad_(False)
    original.requires_grad_(False)
    for (attn, mlp), (old_attn, old_mlp), (z_attn, z_mlp) in zip(*map(_gpt2_blocks, (model, original, zeroed))):
        kept = _kept_columns(old_attn.c_attn.weight, attn.c_attn.weight)
        heads = sorted({c // HEAD_DIM for c in kept[: len(kept) // 3]})
        channels = [h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)]
        assert kept == [c + part * width for part in range(3) for c in channels]  # q, k, v alike
        assert attn.num_heads == len(heads) and attn.split_size == len(channels) and attn.head_dim == HEAD_DIM
        assert attn.c_attn.nf == 3 * len(channels) and attn.c_proj.nx == len(channels)
        assert torch.equal(attn.c_proj.weight, old_attn.c_proj.weight[channels])
        assert attn.embed_dim == 32 and attn.c_proj.nf == 32  # the residual width stays
        fc_kept = _kept_columns(old_mlp.c_fc.weight, mlp.c_fc.weight)
        assert torch.equal(mlp.c_proj.weight, old_mlp.c_proj.weight[fc_kept]) and mlp.c_fc.nf == len(fc_kept)
        # the lowest-ranked went: group L2 (c_attn's q, k, v columns and c_proj's rows) per head, mean over its dims
        per_dim = old_attn.c_attn.weight.pow(2).sum(0).view(3, width).sum(0) + old_attn.c_proj.weight.pow(2).sum(1)
        head_scores = per_dim.view(HEADS, HEAD_DIM).mean(1)
        if scope == "layer":
            assert heads == sorted(head_scores.topk(HEADS // 2).indices.tolist())
        mlp_scores = old_mlp.c_fc.weight.pow(2).sum(0) + old_mlp.c_proj.weight.pow(2).sum(1)
        dropped = [j for j in range(mlp_width) if j not in fc_kept]
        assert float(mlp_scores[fc_kept].min()) >= float(mlp_scores[dropped].max())
        z_attn.c_proj.weight[[c for c in range(width) if c not in channels]] = 0
        z_mlp.c_proj.weight[dropped] = 0
    assert _shapes(model, ctx) == shapes
    with torch.no_grad():
        got, want = call_model(model.eval(), ctx.example()), call_model(zeroed.eval(), ctx.example())
    assert torch.allclose(got["logits"], want["logits"], atol=1e-5)
    # the checkpoint (weights_only) rebuilds the pruned model from a fresh one: Conv1D sizes, head counts, split_size
    payload = ModelState(model).checkpoint()
    assert payload["structure"]["transformer.h.0.attn"]["split_size"] == model.transformer.h[0].attn.split_size
    fresh = ModelState.from_checkpoint(gpt2()[0], payload).model
    assert [a.num_heads for a, _ in _gpt2_blocks(fresh)] == [a.num_heads for a, _ in _gpt2_blocks(model)]
    with torch.no_grad():
        assert torch.equal(call_model(fresh.eval(), ctx.example())["logits"], got["logits"])


class _Adapted(nn.Module):
    """GPT-2 blocks with a plain Linear between them and the head."""

    def __init__(self, config) -> None:  # noqa: ANN001
        super().__init__()
        self.gpt2, self.adapter, self.head = transformers.GPT2Model(config), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.adapter(self.gpt2(input_ids).last_hidden_state))


@pytest.mark.parametrize(
    ("build", "refused"),
    [
        (
            transformers.GPT2LMHeadModel,
            "module 'transformer.h.0.crossattention' (GPT2Attention): granularity channels: cross-attention",
        ),
        (
            _Adapted,
            "module 'adapter' (Linear): granularity channels: this model's Conv1D blocks (GPT-2's) are pruned by slicing",
        ),
    ],
    ids=["cross-attention", "linear-beside-conv1d"],
)
def test_gpt2_channels_refused_in_one_line_naming_the_module(build, refused: str) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    cross = build is transformers.GPT2LMHeadModel
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=HEADS, add_cross_attention=cross
    )
    model = build(config).eval()
    _, ctx = gpt2(4)
    before = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(BadInput) as caught:
        run_pass(PRUNE, model, ctx, granularity="channels", sparsity=0.5, measure_dnr=False, finetune={"epochs": 0})
    assert str(caught.value).startswith(refused) and "\n" not in str(caught.value)
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
