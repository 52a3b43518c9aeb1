"""Explicit attention (compress.attention): same function as torch's, heads pruned whole through
Torch-Pruning, Q/DQ placed for transformer blocks, and clear errors for what is not handled."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.attention import SelfAttention, UnsupportedLayer, WindowAttention, attention_modules, convert_attention
from compress.channels import ChannelPruner
from compress.models.transformer import TransformerClassifier
from compress.quant import build, make_plan
from compress.sparsity import classifier_name, prunable_layers
from compress.zoo import tiny_swin, tiny_vit

pytest.importorskip("torchvision")


def _randomize(model: nn.Module) -> nn.Module:
    """Random values everywhere (torchvision zero-initialises heads and biases), so any mistake shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    return {
        "vit": (_randomize(tiny_vit()), 32),
        "swin": (_randomize(tiny_swin()), 32),
        "encoder": (_randomize(TransformerClassifier()), 32),
    }


@pytest.mark.parametrize("name", ["vit", "swin", "encoder"])
def test_conversion_computes_the_same_function_and_loads_original_checkpoints(name: str) -> None:
    model, size = _models()[name]
    original = copy.deepcopy(model)
    converted = convert_attention(model)
    assert converted and all(isinstance(m, (SelfAttention, WindowAttention)) for m in attention_modules(model).values())
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-5, rtol=1e-5)
    fresh = convert_attention(m := copy.deepcopy(original)) and m
    with torch.no_grad():  # scramble, then load the original (unconverted) state_dict: same outputs again
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), atol=1e-5, rtol=1e-5)


def _kept_heads(before: nn.Module, after: nn.Module) -> list[int]:
    """Which original heads survive, found by matching each remaining head's query rows."""
    d = after.head_dim
    old_q = before.qkv.weight[: before.num_heads * d].view(before.num_heads, d, -1)
    new_q = after.qkv.weight[: after.num_heads * d].view(after.num_heads, d, -1)
    kept = []
    for head in new_q:
        matches = [i for i, old in enumerate(old_q) if torch.equal(old, head)]
        assert len(matches) == 1
        kept.append(matches[0])
    return kept


@pytest.mark.parametrize("name", ["vit", "swin", "encoder"])
def test_head_pruning_removes_whole_heads_and_equals_masking_them(name: str) -> None:
    model, size = _models()[name]
    convert_attention(model)
    original = copy.deepcopy(model)
    # only the attention projections are selected: the pruned model must equal the original with the
    # removed heads' contribution (their output-projection columns) zeroed
    qkv_only = {n: m for n, m in prunable_layers(model).items() if n.endswith(".qkv")}
    x = torch.randn(2, 3, size, size)
    pruner = ChannelPruner(
        model, x[:1], ratios=[0.5], global_ranking=False, selected=qkv_only, classifier=classifier_name(model), round_to=None
    )
    pruner.step()
    before, after = attention_modules(original), attention_modules(model)
    assert sum(a.num_heads for a in after.values()) == sum(b.num_heads for b in before.values()) // 2
    with torch.no_grad():
        for path, attention in after.items():
            reference = before[path]
            assert attention.qkv.out_features == 3 * attention.num_heads * attention.head_dim
            assert attention.head_dim == reference.head_dim  # heads go whole; their width stays
            kept = _kept_heads(reference, attention)
            out = reference.out_proj if hasattr(reference, "out_proj") else reference.proj
            for head in set(range(reference.num_heads)) - set(kept):
                out.weight[:, head * reference.head_dim : (head + 1) * reference.head_dim] = 0
            if isinstance(attention, WindowAttention):
                torch.testing.assert_close(
                    attention.relative_position_bias_table, reference.relative_position_bias_table[:, kept]
                )
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def test_head_pruning_with_mlp_channels_keeps_the_residual_width() -> None:
    model, size = _models()["vit"]
    convert_attention(model)
    x = torch.randn(2, 3, size, size)
    pruner = ChannelPruner(
        model, x[:1], ratios=[0.5], global_ranking=True, selected=prunable_layers(model),
        classifier=classifier_name(model), round_to=None,
    )
    pruner.step()
    assert model.conv_proj.out_channels == 64  # the LayerNorm-normalised residual stream is kept
    assert sum(a.num_heads for a in attention_modules(model).values()) == 4  # of 2 x 4, ranked globally
    assert model.encoder.layers[0].mlp[0].out_features < 128
    assert model(x).shape == (2, 10)


def _plan(model: nn.Module) -> dict:
    return make_plan(model, weight_bits=8, activation_bits=8, layer_bits={}, skip=[], first_last_8bit=False)


def test_transformer_quantizer_placement_and_its_onnx(tmp_path) -> None:  # noqa: ANN001
    from export.lint import lint_onnx
    from export.onnx_export import export_onnx
    from export.ort_runner import ort_session, predict
    from export.qdq import convert_to_int8

    torch.manual_seed(0)
    model = TransformerClassifier().eval()
    convert_attention(model)
    plan = _plan(model)
    assert {n for n in plan["bits"] if ".self_attn." in n} == {
        f"encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("qkv", "out_proj")
    }
    quantized = build(model, plan).eval()
    for q in quantized.act_quant.values():
        q.set_amax(4.0)
    for layer in (m for m in quantized.modules() if hasattr(m, "weight_int")):
        from compress.quant.adaround import set_rtn
        from compress.quant.grid import weight_scales

        layer.weight_scale.copy_(weight_scales(layer.float_weight, 7, "minmax"))
        set_rtn(layer, None)
    x = torch.randn(64, 3, 32, 32)
    export_onnx(quantized, x[:1], tmp_path / "qdq.onnx")
    proto = convert_to_int8(tmp_path / "qdq.onnx", "int8-trt")
    assert lint_onnx(proto) == []
    producer = {o: n for n in proto.graph.node for o in n.output}
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) == 2 * 6 + 1  # per layer 4 projections + 2 attention products; the head's Gemm
    for node in matmuls:  # Q/DQ before every MatMul/Gemm input, weights stored as int8
        assert all(producer[i].op_type == "DequantizeLinear" for i in node.input[:2]), node.name
    for node in proto.graph.node:  # LayerNorm and softmax run in float
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 2 * 4 + 1  # every Linear's weight
    path = tmp_path / "int8.onnx"
    path.write_bytes(proto.SerializeToString())
    with torch.no_grad():
        reference = quantized(x).numpy()
    got = predict(ort_session(path, threads=1), x.numpy())
    # ONNX Runtime's int8 kernels against the torch model: most samples agree to float rounding (an
    # activation exactly at a rounding boundary may land one level off and move that sample a little)
    assert np.median(np.abs(got - reference).max(axis=1)) < 1e-4
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.99


def test_cross_attention_is_refused_with_its_path() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)})
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory = x[..., :8]
            return self.head(self.block["attn"](x, memory, memory)[0].mean(1))

    model = Cross()
    assert convert_attention(model) == []  # left as it is: float passes still run it
    with pytest.raises(UnsupportedLayer, match=r"module 'block\.attn' \(MultiheadAttention\): quantization: kdim/vdim"):
        _plan(model)


def test_swin_v2_is_refused_with_its_path() -> None:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
        block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=4,
    )
    convert_attention(model)
    with pytest.raises(UnsupportedLayer, match=r"module 'features\.1\.0\.attn' \(ShiftedWindowAttentionV2\): .*Swin V2"):
        _plan(model)


def test_untraceable_module_is_named_in_the_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(DataDependent()))
    with pytest.raises(UnsupportedLayer, match=r"module '1\.0' \(DataDependent\): quantization needs torch\.fx"):
        _plan(model)
