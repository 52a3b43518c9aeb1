"""quantize.rtn / quantize.adaround on unmodified Hugging Face `transformers` models (small configs, random
weights): BERT (token ids and an attention mask), GPT-2 (transformers' Conv1D, causal attention) and ViT
(pixels, a ModelOutput). torch.fx cannot trace them, so the quantizers are placed by module swap
(compress/quant/swap.py): every Linear/Conv1D/Conv2d quantizes its own input, both inputs of the two
attention matmuls are quantized, LayerNorm and softmax stay float. Checked: what was quantized, fidelity
to the float model, the ONNX int8 files against the torch model in ONNX Runtime, a stage checkpoint
rebuilt on the original architecture, and pruned zeros kept through Conv1D's transposed weight."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from compress.batches import call_model, flat_outputs
from compress.metrics import cosine
from compress.passes.quantize_adaround import AdaroundConfig, QuantizeConfig, quantize_adaround, quantize_rtn
from compress.quant.graph import act_quantizers, quant_embeddings, quant_layers
from compress.quant.modules import QuantEmbedding, QuantLayer
from compress.quant.swap import MATMUL_MODULE
from compress.state import ModelState
from compress.train import predict
from export.onnx_export import export_onnx
from export.qdq import convert_to_int8

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_helpers import DictSamples, cosine_context  # noqa: E402

transformers = pytest.importorskip("transformers")


def _tokens(vocab: int, mask: bool, count: int = 16, length: int = 12) -> DictSamples:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (count, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[: count // 2, length - 3 :] = 0  # padded sentences
    return DictSamples(input_ids=ids, attention_mask=attention if mask else None)


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=200, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config).eval()


CASES = {
    "bert": (bert, lambda: _tokens(200, mask=True)),
    "gpt2": (gpt2, lambda: _tokens(200, mask=False)),
    "vit": (vit, lambda: TensorDataset(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)))),
}


def _quantize(model: nn.Module, data: Dataset, method: str = "rtn", **params: Any) -> Any:
    common = {"weight_bits": 8, "activation_bits": 8, "weight_range": "minmax", **params}
    ctx = cosine_context(model, data)
    if method == "rtn":
        return quantize_rtn(ModelState(copy.deepcopy(model)), QuantizeConfig(**common), ctx)
    cfg = AdaroundConfig(**common, iterations=20, batch_size=4, threads=1)
    return quantize_adaround(ModelState(copy.deepcopy(model)), cfg, ctx)


@pytest.mark.parametrize("name", list(CASES))
def test_unmodified_transformers_quantize_by_module_swap(name: str) -> None:
    build, dataset = CASES[name]
    model, data = build(), dataset()
    result = _quantize(model, data)
    quantized, plan, info = result.state.model, result.state.quant, result.info
    assert plan["placement"] == "modules" and "torch.fx" in plan["placement_reason"]
    assert info["placement"] == "modules"
    # every projection of every block, its input quantized by its own quantizer
    layers = quant_layers(quantized)
    per_block = {"bert": 6, "gpt2": 4, "vit": 6}[name]
    assert len([n for n in layers if ".0." in n]) == per_block
    assert all(layer.input_quant is not None for layer in layers.values())
    # both attention matmuls of each of the two blocks, two quantizers each
    owners = [m for m in quantized.modules() if hasattr(m, MATMUL_MODULE)]
    assert len(owners) == 2 and plan["matmuls"] and set(plan["matmuls"].values()) == {2}
    assert len(act_quantizers(quantized)) == len(layers) + 2 * 2 * 2
    if name == "gpt2":  # Conv1D stores [in, out]; the quantized layer holds [out, in] like a Linear
        assert any(n.endswith("attn.c_attn") for n in plan["transposed"])
        c_attn = layers["transformer.h.0.attn.c_attn"]
        assert c_attn.weight_int.shape == (96, 32)
    want, _ = predict(model, data)
    got, _ = predict(quantized, data)
    assert list(flat_outputs(got)) == list(flat_outputs(want))
    fidelity = cosine(got, want)
    print(f"{name}: cosine {fidelity:.4f}")
    assert fidelity > 0.99


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_int8_files_match_the_torch_model_in_onnx_runtime(name: str, tmp_path: Path) -> None:
    build, dataset = CASES[name]
    model, data = build(), dataset()
    quantized = _quantize(model, data, quantize_embeddings=True).state.model
    assert quant_embeddings(quantized)  # word and position tables at least
    example = data[0][0]
    batch = {k: torch.stack([data[i][0][k] for i in range(8)]) for k in example}
    with torch.no_grad():
        want = flat_outputs(call_model(quantized, batch))
    export_onnx(quantized, {k: v[None] for k, v in example.items()}, tmp_path / "q.onnx")
    fp32_size = (tmp_path / "q.onnx").stat().st_size
    for flavor in ("int8-trt", "int8-ort"):
        proto = convert_to_int8(tmp_path / "q.onnx", flavor)
        path = tmp_path / f"{flavor}.onnx"
        onnx.save(proto, str(path))
        ops = [node.op_type for node in proto.graph.node]
        assert ops.count("MatMul") >= 2 * 2 + 4 * 2  # projections and the attention matmuls
        assert path.stat().st_size < 0.6 * fp32_size  # weights and tables int8 (scales and graph: the rest, tiny model)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in batch.items()})
        first = next(iter(want.values())).numpy()
        assert np.abs(got[0] - first).max() <= 1e-4 * max(1.0, np.abs(first).max())


def test_a_checkpoint_rebuilds_the_swapped_model_and_keeps_gpt2_pruned_zeros() -> None:
    model, data = gpt2(), _tokens(200, mask=False)
    # zeros in Conv1D's own [in, out] layout, as the pruning passes keep masks
    weight = model.transformer.h[0].attn.c_attn.weight
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        weight.mul_(mask)
    state = ModelState(copy.deepcopy(model), {"transformer.h.0.attn.c_attn.weight": mask})
    cfg = AdaroundConfig(weight_bits=4, activation_bits=8, weight_range="minmax", iterations=20, batch_size=4,
                         threads=1, quantize_embeddings=True)
    result = quantize_adaround(state, cfg, cosine_context(model, data))
    quantized = result.state.model
    layer = quant_layers(quantized)["transformer.h.0.attn.c_attn"]
    assert torch.equal(layer.weight_int == 0, (mask.t() == 0) | (layer.weight_int == 0))
    assert int((layer.weight_int[mask.t() == 0] != 0).sum()) == 0
    assert result.info["smoothed"] is not None and result.info["quantized_matmuls"] == 4
    payload = result.state.checkpoint()
    rebuilt = ModelState.from_checkpoint(gpt2(), payload).model
    assert isinstance(rebuilt.get_submodule("transformer.h.0.attn.c_attn"), QuantLayer)
    assert isinstance(rebuilt.get_submodule("transformer.wte"), QuantEmbedding)
    batch = {"input_ids": data.inputs["input_ids"][:4]}
    assert torch.equal(call_model(rebuilt, batch).logits, call_model(quantized, batch).logits)
