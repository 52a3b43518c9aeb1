"""Export of models that are not image classifiers (issue 18): int64 token ids, dict samples, tuple and dict
outputs. Each goes torch -> ONNX (fp32, fp16, int8-trt, int8-ort) -> ONNX Runtime with every output named,
batched on axis 0 and checked against torch, in real ONNX Runtime."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from compress.batches import call_model, flat_outputs, map_tensors
from compress.quant.modules import ActQuant, QuantLayer
from export.fp16 import convert_to_fp16
from export.lint import lint_onnx
from export.onnx_export import OUTPUT_LEAVES_KEY, export_onnx, output_leaves
from export.ort_runner import measure_latencies, ort_session, parity, predict_outputs
from export.qdq import convert_to_int8
from export.tensorrt import BuildOptions, inspect_onnx, write_scripts

TOKENS, VOCAB, BATCH = 16, 50, 7


class QuantTable(nn.Module):
    """An Embedding whose table is int8 per row (axis 0): Gather(DequantizeLinear(int8 table), ids)."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        weight = table.weight.detach()
        self.register_buffer("weight", weight.clone())
        self.register_buffer("scale", weight.abs().amax(1).clamp_min(1e-8) / 127)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros(self.scale.shape, dtype=torch.int32)
        return F.embedding(ids, torch.fake_quantize_per_channel_affine(self.weight, self.scale, zero, 0, -128, 127))


class TokenEmbedder(nn.Module):
    """(a) int64 token ids [B, 16] -> mean of embeddings -> projection [B, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.table: nn.Module = nn.Embedding(VOCAB, 8)
        self.act: nn.Module = nn.Identity()
        self.proj: nn.Module = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.table(ids).mean(1)))


class MaskedTwoHeads(nn.Module):
    """(b) {"ids": int64 [B, 16], "mask": float [B, 16]} -> (class scores [B, 4], projection [B, 8]). The
    forward takes them in the other order than the sample's dict: names must follow the keys."""

    def __init__(self) -> None:
        super().__init__()
        self.table: nn.Module = nn.Embedding(VOCAB, 8)
        self.act: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Linear(8, 4)
        self.proj: nn.Module = nn.Linear(8, 8)

    def forward(self, mask: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = (self.table(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        pooled = self.act(pooled)
        return self.head(pooled), self.proj(pooled)


class TinySegmenter(nn.Module):
    """(c) images [B, 3, 16, 16] -> {"out": [B, 5, 16, 16], "aux": [B, 2, 16, 16]}, as torchvision's
    segmentation models return."""

    def __init__(self) -> None:
        super().__init__()
        self.act_in: nn.Module = nn.Identity()
        self.body: nn.Module = nn.Conv2d(3, 8, 3, padding=1)
        self.act_mid: nn.Module = nn.Identity()
        self.out: nn.Module = nn.Conv2d(8, 5, 1)
        self.aux: nn.Module = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.act_mid(torch.relu(self.body(self.act_in(x))))
        return {"out": self.out(features), "aux": self.aux(features)}


def _quant_layer(layer: nn.Module) -> QuantLayer:
    q = QuantLayer(layer, 8)
    weight = q.float_weight
    scale = weight.abs().flatten(1).amax(1).clamp_min(1e-8) / 127
    q.weight_scale.copy_(scale)
    q.weight_int.copy_(torch.round(weight / scale.view(-1, *[1] * (weight.dim() - 1))).clamp(-128, 127).to(torch.int8))
    q.drop_float_weight()
    return q


def _act(amax: float) -> ActQuant:
    quantizer = ActQuant(8)
    quantizer.set_amax(amax)
    return quantizer


def _quantized(model: nn.Module) -> nn.Module:
    """W8A8 fake quantization as compress.quant ships it: per-channel int8 weights, per-tensor activations."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Embedding):
            setattr(model, name, QuantTable(child))
        elif isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(model, name, _quant_layer(child))
        elif name.startswith("act"):
            setattr(model, name, _act(4.0))
    return model.eval()


def _ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))


def _sample(kind: str, batch: int, seed: int = 0) -> Any:
    if kind == "tokens":
        return _ids(batch, seed)
    if kind == "dict":
        mask = (torch.rand(batch, TOKENS, generator=torch.Generator().manual_seed(seed + 1)) > 0.3).float()
        return {"ids": _ids(batch, seed), "mask": mask}
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


CASES = {
    # kind: (model class, ONNX inputs and their types, ONNX outputs, output leaves, output shapes at BATCH)
    "tokens": (TokenEmbedder, [("input", TensorProto.INT64)], ["logits"], [""], [(BATCH, 8)]),
    "dict": (
        MaskedTwoHeads, [("ids", TensorProto.INT64), ("mask", TensorProto.FLOAT)], ["output_0", "output_1"],
        ["0", "1"], [(BATCH, 4), (BATCH, 8)],
    ),
    "segmenter": (
        TinySegmenter, [("input", TensorProto.FLOAT)], ["out", "aux"], ["out", "aux"],
        [(BATCH, 5, 16, 16), (BATCH, 2, 16, 16)],
    ),
}


def _torch_outputs(model: nn.Module, sample: Any) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in flat_outputs(call_model(model, sample)).items()}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kind = request.param
    torch.manual_seed(0)
    model = CASES[kind][0]().eval()
    base = tmp_path_factory.mktemp(kind)
    example = _sample(kind, 1)
    files = {"fp32": export_onnx(model, example, base / "model.fp32.onnx")}
    files["fp16"] = convert_to_fp16(files["fp32"], base / "model.fp16.onnx")
    files["fp16-io"] = convert_to_fp16(files["fp32"], base / "model.fp16io.onnx", io_fp16=True)
    quantized = _quantized(copy.deepcopy(model))
    fake = export_onnx(quantized, example, base / "fake.onnx")
    for flavor in ("int8-trt", "int8-ort"):
        files[flavor] = base / f"model.{flavor}.onnx"
        onnx.save(convert_to_int8(fake, flavor), str(files[flavor]))
    return {"kind": kind, "model": model, "quantized": quantized, "example": example, "files": files}


def test_fp32_names_types_dynamic_batch_and_parity(case: dict[str, Any]) -> None:
    _, inputs, outputs, leaves_names, shapes = CASES[case["kind"]]
    proto = onnx.load(str(case["files"]["fp32"]))
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == inputs
    assert [o.name for o in proto.graph.output] == outputs
    assert all(v.type.tensor_type.shape.dim[0].dim_param for v in [*proto.graph.input, *proto.graph.output])
    assert output_leaves(proto) == leaves_names
    assert any(e.key == OUTPUT_LEAVES_KEY for e in proto.metadata_props) == (outputs != ["logits"])

    sample = _sample(case["kind"], BATCH, seed=3)
    reference = _torch_outputs(case["model"], sample)
    got = predict_outputs(ort_session(case["files"]["fp32"]), sample, batch_size=3)  # torch leaves, 3 + 3 + 1
    assert list(got) == outputs and [a.shape for a in got.values()] == shapes
    # numpy leaves in the same structure give the same arrays
    as_numpy = predict_outputs(ort_session(case["files"]["fp32"]), map_tensors(sample, lambda t: t.numpy()), batch_size=3)
    for name in outputs:
        np.testing.assert_array_equal(as_numpy[name], got[name])
    match = parity(list(reference.values()), got)
    assert match["max_abs_diff"] < 1e-5 and match["top1_agreement"] == 1.0, match
    if len(outputs) > 1:
        assert list(match["outputs"]) == outputs
        assert all(m["max_abs_diff"] < 1e-5 and m["top1_agreement"] == 1.0 for m in match["outputs"].values())
    else:
        assert "outputs" not in match


@pytest.mark.parametrize("precision", ["fp16", "fp16-io"])
def test_fp16_keeps_integer_inputs_and_every_output(case: dict[str, Any], precision: str) -> None:
    _, inputs, outputs, _, shapes = CASES[case["kind"]]
    proto = onnx.load(str(case["files"][precision]))
    half = TensorProto.FLOAT16 if precision == "fp16-io" else TensorProto.FLOAT
    want = [(name, half if kind == TensorProto.FLOAT else kind) for name, kind in inputs]
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == want
    assert [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output] == [(o, half) for o in outputs]
    sample = _sample(case["kind"], BATCH, seed=4)
    got = predict_outputs(ort_session(case["files"][precision]), sample)
    assert [a.shape for a in got.values()] == shapes and all(a.dtype == np.float32 for a in got.values())
    match = parity(list(_torch_outputs(case["model"], sample).values()), got)
    assert match["max_abs_diff"] < 2e-2 and match["top1_agreement"] >= 0.9, match


@pytest.mark.parametrize("flavor", ["int8-trt", "int8-ort"])
def test_int8_flavors_keep_names_and_match_the_quantized_model(case: dict[str, Any], flavor: str) -> None:
    _, inputs, outputs, _, shapes = CASES[case["kind"]]
    proto = onnx.load(str(case["files"][flavor]))
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == inputs
    assert [o.name for o in proto.graph.output] == outputs
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dequantized = [inits[n.input[0]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert dequantized and all(w.dtype in (np.int8, np.uint8, np.int32) for w in dequantized)
    # integer inputs are never quantized
    integer_inputs = {name for name, kind in inputs if kind != TensorProto.FLOAT}
    assert not [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in integer_inputs]
    if case["kind"] != "segmenter":
        # the embedding table is looked up, never multiplied: signed int8 in both flavors (no u8 x s8 saturation)
        gathers = [n for n in proto.graph.node if n.op_type == "Gather"]
        producers = {o: n for n in proto.graph.node for o in n.output}
        tables = [producers[g.input[0]] for g in gathers if g.input[0] in producers]
        assert tables and all(t.op_type == "DequantizeLinear" and inits[t.input[0]].dtype == np.int8 for t in tables)
    if flavor == "int8-trt":
        assert lint_onnx(proto) == []

    sample = _sample(case["kind"], BATCH, seed=5)
    reference = _torch_outputs(case["quantized"], sample)
    got = predict_outputs(ort_session(case["files"][flavor]), sample)
    assert [a.shape for a in got.values()] == shapes
    match = parity(list(reference.values()), got)
    # ONNX Runtime fuses Q/DQ into integer kernels whose requantization may round a value one step apart
    scale = max(float(np.abs(r).max()) for r in reference.values())
    assert match["max_abs_diff"] < 0.05 * scale and match["top1_agreement"] >= 0.95, match


def test_latency_feeds_the_example_structure(case: dict[str, Any]) -> None:
    sessions = {name: ort_session(path, threads=1) for name, path in case["files"].items()}
    timings = measure_latencies(sessions, case["example"], batch_sizes=(1, 4), warmup=1, runs=2, rounds=2)
    for timing in timings.values():
        assert 0 < timing["batch1"] <= timing["batch1_p90"] and 0 < timing["batch4"] <= timing["batch4_p90"]


def test_tensorrt_scripts_give_every_input_a_profile(case: dict[str, Any], tmp_path: Path) -> None:
    _, inputs, _, _, _ = CASES[case["kind"]]
    facts = inspect_onnx(case["files"]["int8-trt"])
    assert [name for name, _ in facts.inputs] == [name for name, _ in inputs]
    scripts = write_scripts([facts], case["files"]["int8-trt"].parent, BuildOptions(batch=(1, 2, 8)))
    trtexec = Path(scripts["trtexec"]).read_text()
    polygraphy = Path(scripts["polygraphy"]).read_text()
    rest = {"tokens": [TOKENS], "dict": [TOKENS], "segmenter": [3, 16, 16]}[case["kind"]]
    for batch, flag in ((1, "minShapes"), (2, "optShapes"), (8, "maxShapes")):
        dims = ",".join(f"{name}:{'x'.join(map(str, [batch, *rest]))}" for name, _ in inputs)
        assert f"--{flag}={dims}" in trtexec
    assert all(f"{name}:[8," in polygraphy for name, _ in inputs)


def test_unused_input_is_left_out_and_not_fed(tmp_path: Path) -> None:
    class IgnoresMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(VOCAB, 4)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.table(ids).sum(1)

    model = IgnoresMask().eval()
    path = export_onnx(model, _sample("dict", 1), tmp_path / "m.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["ids"]
    sample = _sample("dict", 5)
    got = predict_outputs(ort_session(path), sample)
    np.testing.assert_allclose(got["logits"], _torch_outputs(model, sample)[""], atol=1e-6)


def test_feeding_the_wrong_structure_names_both_sides(tmp_path: Path) -> None:
    path = export_onnx(MaskedTwoHeads().eval(), _sample("dict", 1), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="takes inputs ids, mask; the data gives input$"):
        predict_outputs(ort_session(path), np.zeros((2, TOKENS), dtype=np.int64))


def test_parity_per_output_and_class_axes() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((4, 6, 3))  # [N, L, C]: classes on the last axis
    flipped = tokens.copy()
    flipped[0, 0] = tokens[0, 0][::-1] * 10  # one token's arg-max moves (unless tied)
    moved = int(np.argmax(tokens[0, 0]) != np.argmax(flipped[0, 0]))
    scores = rng.standard_normal(5)  # [N]: no class axis
    match = parity({"tokens": tokens, "score": scores}, {"tok": flipped, "s": scores + 0.5})
    assert list(match["outputs"]) == ["tok", "s"]  # the ONNX side's names
    assert match["outputs"]["tok"]["top1_agreement"] == pytest.approx(1 - moved / 24)
    assert match["outputs"]["s"]["top1_agreement"] is None
    assert match["outputs"]["s"]["max_abs_diff"] == pytest.approx(0.5)
    assert match["max_abs_diff"] == max(m["max_abs_diff"] for m in match["outputs"].values())
    assert match["mean_abs_diff"] == pytest.approx(np.mean([m["mean_abs_diff"] for m in match["outputs"].values()]))
    assert match["top1_agreement"] == match["outputs"]["tok"]["top1_agreement"]
    # a 1-D first output has no arg-max to agree on
    assert parity([scores, tokens], [scores, tokens])["top1_agreement"] is None
    with pytest.raises(ValueError, match="2 outputs, the ONNX file 1"):
        parity([tokens, scores], [tokens])
    with pytest.raises(ValueError, match="output_1"):
        parity([tokens, scores], [tokens, scores[:2]])
    nan = scores.copy()
    nan[0] = np.nan
    assert parity([tokens, scores], [tokens, nan])["max_abs_diff"] == math.inf


@pytest.mark.parametrize("compressed", ["float", "quantized"])
def test_export_and_verify_scores_and_checks_every_output(case: dict[str, Any], compressed: str, tmp_path: Path) -> None:
    """The run's export step on each kind, float (fp32, fp16) and quantized (int8 flavors, beside the
    original): every file scored through the run's metric (here cosine against the torch outputs, by the
    torch outputs' names), parity per output, timed with the example's structure, TensorRT scripts for every
    input."""
    import json

    from compress.export_stage import OriginalModel, export_and_verify
    from compress.metrics import cosine
    from compress.progress import RunProgress
    from compress.recipe import ExportConfig

    kind = case["kind"]
    _, inputs, outputs, _, _ = CASES[kind]
    precisions = ["fp32", "fp16"] if compressed == "float" else ["fp32", "int8-trt", "int8-ort"]
    cfg = ExportConfig.model_validate({
        "onnx": {"precisions": precisions}, "tensorrt": {"build": "never"},
        "verify": {"max_drop": 0.01, "latency_runs": 2, "latency_rounds": 1, "threads": 1},
    })  # fmt: skip
    model = case["model"] if compressed == "float" else case["quantized"]
    test_inputs = _sample(kind, 16, seed=7)
    with torch.no_grad():
        torch_outputs = flat_outputs(call_model(model, test_inputs))
        original = None if compressed == "float" else OriginalModel(
            case["model"], flat_outputs(call_model(case["model"], test_inputs))
        )  # fmt: skip
    scored: list[list[str]] = []

    def score(flat: dict[str, torch.Tensor]) -> float:
        scored.append(list(flat))
        return cosine(flat, torch_outputs)

    with RunProgress(quiet=True) as progress:
        results = export_and_verify(
            model, cfg, None, tmp_path, example=case["example"], test_inputs=test_inputs,
            torch_outputs=torch_outputs, score=score, progress=progress, original=original,
        )  # fmt: skip
    assert scored and all(names == list(torch_outputs) for names in scored)  # ONNX outputs take the torch names
    files = ([] if original is None else ["original"]) + precisions
    assert [k for k in results if k != "tensorrt"] == files
    for name in files:
        entry = results[name]
        assert entry["gate"]["passed"], (name, entry["gate"])
        assert entry["metric"] > 0.99 and entry["latency_ms"]["batch1"] > 0 and entry["latency_ms"]["batch64"] > 0
        assert [o.name for o in onnx.load(str(tmp_path / f"model.{name}.onnx")).graph.output] == outputs
        if len(outputs) > 1:
            assert list(entry["parity"]["outputs"]) == outputs
    # the quantized graph runs on ONNX Runtime's fused integer kernels: a rounding step apart at most
    step = 1e-4 if compressed == "float" else 0.05 * max(float(t.abs().max()) for t in torch_outputs.values())
    assert results["fp32"]["parity"]["max_abs_diff"] < step
    assert json.loads((tmp_path / "parity.json").read_text())[files[-1]] == results[files[-1]]["parity"]
    trtexec = (tmp_path / "trtexec.sh").read_text()
    assert all(f"{name}:1x" in trtexec for name, _ in inputs)
    assert "model.int8-ort" not in trtexec and "skipped" in results["tensorrt"]


def test_compress_eval_of_an_onnx_file_feeds_dict_samples_and_selects_the_output(tmp_path: Path) -> None:
    from compress.errors import BadInput
    from compress.evaluate import _evaluate_onnx
    from compress.metrics import resolve_metric

    torch.manual_seed(0)
    model = MaskedTwoHeads().eval()
    path = export_onnx(model, _sample("dict", 1), tmp_path / "model.fp32.onnx")
    samples = _sample("dict", 20, seed=9)
    with torch.no_grad():
        scores = model(**samples)[0]
    targets = scores.argmax(1)
    targets[:5] = (targets[:5] + 1) % 4  # 5 of 20 wrong
    items = [({k: v[i] for k, v in samples.items()}, targets[i]) for i in range(20)]
    assert _evaluate_onnx(path, items, resolve_metric("top1"), "0") == pytest.approx(0.75)
    with pytest.raises(BadInput, match="model.output: '2' is not among"):
        _evaluate_onnx(path, items, resolve_metric("top1"), "2")
    with pytest.raises(BadInput, match="compress eval: metric cosine compares with the uncompressed model"):
        _evaluate_onnx(path, items, resolve_metric("cosine"), None)
    with pytest.raises(BadInput, match="cannot run on the data's samples: the ONNX file takes inputs ids, mask"):
        _evaluate_onnx(path, [(samples["ids"][i], targets[i]) for i in range(20)], resolve_metric("top1"), "0")


def test_transformers_model_output_exports_with_its_names_and_masks(tmp_path: Path) -> None:
    """A small BERT from a config (no download): dict of int64 ids and mask in, ModelOutput out. Exported
    with an all-ones mask, the file must still apply a padding mask (transformers skips it in eager mode
    when the mask is all ones, but not while tracing)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    example = {"input_ids": _ids(1, 0), "attention_mask": torch.ones(1, TOKENS, dtype=torch.int64)}
    path = export_onnx(model, example, tmp_path / "bert.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "pooler_output"]
    mask = torch.ones(BATCH, TOKENS, dtype=torch.int64)
    mask[:, TOKENS // 2 :] = 0  # padded halves
    sample = {"input_ids": _ids(BATCH, 1), "attention_mask": mask}
    match = parity(list(_torch_outputs(model, sample).values()), predict_outputs(ort_session(path), sample))
    assert match["max_abs_diff"] < 1e-4, match
