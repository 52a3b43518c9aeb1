"""int8-trt / int8-ort files from a quantized model's Q/DQ export: integer weights, encodings, parity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from compress.models.resnet_cifar import resnet8
from compress.quant import build, make_plan
from compress.quant.adaround import set_rtn
from compress.quant.calibrate import calibrate_activations
from compress.quant.graph import act_quantizers, quant_layers
from compress.quant.grid import weight_scales
from export.errors import ExportError
from export.lint import lint_onnx
from export.onnx_export import export_onnx
from export.ort_runner import ort_session, parity, predict
from export.qdq import U8S8_SAFE_WEIGHT, convert_to_int8


def _quantized_resnet8(bits: int, residual: str, unsigned_symmetric: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet8(in_channels=1, num_classes=10, width=16).eval()
    plan = make_plan(model, weight_bits=bits, activation_bits=8, layer_bits={}, skip=[], first_last_8bit=False,
                     residual=residual)
    q = build(model, plan)
    for layer in quant_layers(q).values():
        layer.weight_scale.copy_(weight_scales(layer.float_weight, layer.bits, "minmax"))
        set_rtn(layer, None)
    calibrate_activations(q, torch.rand(64, 1, 16, 16), "minmax", unsigned_symmetric=unsigned_symmetric)
    for layer in quant_layers(q).values():
        layer.drop_float_weight()
    return q.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("qdq")
    q = _quantized_resnet8(8, "both")
    torch.manual_seed(1)
    float_model = resnet8(in_channels=1, num_classes=10, width=16).eval()
    paths = {
        "float": export_onnx(float_model, torch.rand(1, 1, 16, 16), base / "float.onnx"),
        "fake": export_onnx(q, torch.rand(1, 1, 16, 16), base / "fake.onnx"),
    }
    for flavor in ("int8-trt", "int8-ort"):
        paths[flavor] = base / f"{flavor}.onnx"
        onnx.save(convert_to_int8(paths["fake"], flavor), str(paths[flavor]))
    paths["n_act"] = len(act_quantizers(q))  # type: ignore[assignment]
    paths["n_layers"] = len(quant_layers(q))  # type: ignore[assignment]
    return paths


def _unoptimized(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_weights_are_integer_initializers_feeding_dequantize(files: dict) -> None:
    for flavor in ("int8-trt", "int8-ort"):
        graph = onnx.load(str(files[flavor])).graph
        inits = {t.name: t for t in graph.initializer}
        quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
        assert len(quantize) == files["n_act"], flavor  # only activations are quantized at run time
        assert not any(n.input[0] in inits for n in quantize)
        weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].data_type != TensorProto.INT32]  # int8-ort: int32 biases too
        assert len(weight_dq) == files["n_layers"]
        assert all(inits[n.input[0]].data_type in (TensorProto.INT8, TensorProto.UINT8) for n in weight_dq)
        assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 4 for t in graph.initializer)


def test_int8_files_are_a_quarter_of_fp32(files: dict) -> None:
    fp32 = files["float"].stat().st_size
    for flavor in ("int8-trt", "int8-ort"):
        assert files[flavor].stat().st_size <= 0.3 * fp32, flavor


def test_trt_flavor_is_exactly_the_fake_quant_graph_and_lints_clean(files: dict) -> None:
    x = np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)
    expected = predict(_unoptimized(files["fake"]), x)
    got = predict(_unoptimized(files["int8-trt"]), x)
    assert np.array_equal(got, expected)
    assert lint_onnx(files["int8-trt"]) == []


def test_ort_flavor_encodings_and_parity(files: dict) -> None:
    graph = onnx.load(str(files["int8-ort"])).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n.op_type for n in graph.node for o in n.output}
    for node in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        zero = inits[node.input[2]]
        assert zero.dtype == np.uint8
        # after a ReLU the zero point is 0 (ONNX Runtime folds the ReLU into the integer op), else 128
        assert int(zero) == (0 if producers.get(node.input[0]) == "Relu" else 128), node.name
    # weights that could saturate x86 u8 x s8 kernels are stored unsigned, the same grid shifted by 128:
    # those wider than +-64 in layers whose input is not a ReLU's output (that one spans 0..255 steps)
    trt_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(files["int8-trt"])).graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output}
    kinds = {"unsigned": 0, "signed wide after relu": 0}
    for layer in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        weight = by_output[layer.input[1]].input[0]
        act_quant = by_output[by_output[layer.input[0]].input[0]]
        after_relu = producers.get(act_quant.input[0]) == "Relu"
        signed = trt_inits[weight.replace("_uint8", "_int8")]
        wide = np.abs(signed.astype(int)).max() > U8S8_SAFE_WEIGHT
        if wide and not after_relu:
            assert inits[weight].dtype == np.uint8, layer.name
            assert np.array_equal(inits[weight].astype(int) - 128, signed.astype(int))
            kinds["unsigned"] += 1
        else:
            assert inits[weight].dtype == np.int8, layer.name
            kinds["signed wide after relu"] += int(wide)
    assert all(kinds.values()), kinds  # the random net has both cases: the test sees each rule act
    x = np.random.default_rng(0).random((64, 1, 16, 16), dtype=np.float32)
    reference = predict(_unoptimized(files["int8-trt"]), x)
    for session in (_unoptimized(files["int8-ort"]), ort_session(files["int8-ort"])):
        match = parity(reference, predict(session, x))
        assert match["top1_agreement"] >= 0.95 and match["mean_abs_diff"] < 0.1, match


def test_float_model_has_nothing_to_convert(files: dict) -> None:
    with pytest.raises(ExportError, match="no quantized weights"):
        convert_to_int8(files["float"], "int8-trt")
    with pytest.raises(ExportError, match="unknown int8 flavor"):
        convert_to_int8(files["fake"], "int4")  # type: ignore[arg-type]


def test_residual_both_quantizes_the_layer_side_of_each_add() -> None:
    skip = _quantized_resnet8(4, "skip")
    both = _quantized_resnet8(4, "both")
    blocks = 3  # resnet8: one block per stage
    # plus one: the last block's ReLU output feeds the pooling, not a quantized layer, and is quantized too
    assert len(act_quantizers(both)) == len(act_quantizers(skip)) + blocks + 1
    pooled = [n for n in both.graph.nodes if n.op == "call_module" and "pool" in str(n.target)]
    assert pooled and all(str(n.args[0].target).startswith("act_quant.") for n in pooled)


def test_signed_weights_when_saturation_safety_is_off(files: dict) -> None:
    graph = convert_to_int8(files["fake"], "int8-ort", saturation_safe=False).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if len(t.dims) == 4]
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) > U8S8_SAFE_WEIGHT


def test_weights_reached_through_identity_are_folded(files: dict) -> None:
    # torch's exporter shares identical weights and feeds the copies through Identity nodes
    proto = onnx.load(str(files["fake"]))
    inits = {t.name for t in proto.graph.initializer}
    quant = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits)
    alias = onnx.helper.make_node("Identity", [quant.input[0]], ["shared_weight_copy"], name="dedup")
    proto.graph.node.insert(0, alias)
    quant.input[0] = "shared_weight_copy"
    for flavor in ("int8-trt", "int8-ort"):
        graph = convert_to_int8(proto, flavor).graph
        assert not [n for n in graph.node if n.op_type == "Identity"]
        assert len([n for n in graph.node if n.op_type == "QuantizeLinear"]) == files["n_act"], flavor


def _ort_optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_ort_flavor_runs_the_tail_on_integers(files: dict, tmp_path: Path) -> None:
    graph = onnx.load(str(files["int8-ort"])).graph
    by_output = {o: n for n in graph.node for o in n.output}
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    assert by_output[flatten.input[0]].op_type == "QuantizeLinear"  # moved before the reshape
    inits = {t.name: t for t in graph.initializer}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert inits[by_output[gemm.input[2]].input[0]].data_type == TensorProto.INT32
    ops = _ort_optimized_ops(files["int8-ort"], tmp_path)
    assert "QLinearGlobalAveragePool" in ops and "QGemm" in ops, ops
    assert "Gemm" not in ops and "GlobalAveragePool" not in ops and "Conv" not in ops, ops
    # the rewrites move no value: the file computes what the TensorRT flavor computes, up to the unsigned grid
    x = np.random.default_rng(1).random((64, 1, 16, 16), dtype=np.float32)
    match = parity(predict(_unoptimized(files["int8-trt"]), x), predict(_unoptimized(files["int8-ort"]), x))
    assert match["top1_agreement"] >= 0.95, match


def test_off_grid_biases_stay_float(files: dict) -> None:
    proto = onnx.load(str(files["fake"]))
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    bias = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 1e-3  # far more than float32 error, far less than a step could hide
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    graph = convert_to_int8(proto, "int8-ort").graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert gemm.input[2] == bias.name  # the float bias, not an int32 one rounded away from the model


def test_unsigned_activations_ship_as_int8_ort_exactly_and_never_as_int8_trt(tmp_path: Path) -> None:
    q = _quantized_resnet8(8, "both", unsigned_symmetric=True)
    unsigned = [quantizer for quantizer in act_quantizers(q).values() if quantizer.unsigned]
    assert unsigned, "ReLU outputs (and this test's nonnegative input) calibrate unsigned"
    fake = export_onnx(q, torch.rand(1, 1, 16, 16), tmp_path / "fake.onnx")
    with pytest.raises(ExportError, match="int8-trt: activation quantizer .* zero point -128"):
        convert_to_int8(fake, "int8-trt")
    path = tmp_path / "int8-ort.onnx"
    onnx.save(convert_to_int8(fake, "int8-ort"), str(path))
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zeros = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.uint8 for z in zeros) and sum(int(z) == 0 for z in zeros) >= len(unsigned)
    x = np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)
    with torch.no_grad():
        expected = q(torch.from_numpy(x)).numpy()
    # unoptimized ORT computes the file's Q/DQ arithmetic: the unsigned grid is uint8 with zero point 0 exactly
    assert np.abs(predict(_unoptimized(path), x) - expected).max() < 1e-4
