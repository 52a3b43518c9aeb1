"""The TensorRT Q/DQ lint: a clean QDQ model passes, each rule broken on purpose is caught and named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from compress.cli import app
from export.lint import lint_onnx

rng = np.random.default_rng(0)


def _init(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(values, name)


def _qdq_model(
    *,
    act_zero: np.ndarray | None = None,
    weight_axis: int = 0,
    weight_scales: int = 4,
    act_scales: int = 1,
    quantize_conv_input: bool = True,
    opset: int = 17,
    extra_nodes: list[onnx.NodeProto] | None = None,
    gemm_trans_b: int = 1,
    gemm_axis: int = 0,
    matmul_axis: int = 1,
) -> onnx.ModelProto:
    """input -> Q/DQ -> Conv(int8 weight via DQ) -> Q/DQ -> Flatten -> Q/DQ -> Gemm(DQ weight) -> MatMul(DQ weight).

    Every keyword breaks (or keeps) one rule; the defaults are TensorRT-clean.
    """
    act_zero = np.zeros((), np.int8) if act_zero is None else act_zero
    inits = [
        _init("act_scale", np.full(act_scales, 0.05, np.float32) if act_scales > 1 else np.array(0.05, np.float32)),
        _init("act_zero", act_zero),
        _init("w_conv", rng.integers(-127, 128, (4, 1, 3, 3), dtype=np.int8)),
        _init("w_conv_scale", np.full(weight_scales, 0.01, np.float32)),
        _init("w_conv_zero", np.zeros(weight_scales, np.int8)),
        _init("w_gemm", rng.integers(-127, 128, (3, 16) if gemm_trans_b else (16, 3), dtype=np.int8)),
        _init("w_gemm_scale", np.full(3, 0.01, np.float32)),
        _init("w_gemm_zero", np.zeros(3, np.int8)),
        _init("w_mm", rng.integers(-127, 128, (3, 2), dtype=np.int8)),
        _init("w_mm_scale", np.full(2, 0.01, np.float32)),
        _init("w_mm_zero", np.zeros(2, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "act_scale", "act_zero"], ["x_q"], name="in_q"),
        helper.make_node("DequantizeLinear", ["x_q", "act_scale", "act_zero"], ["x_dq"], name="in_dq"),
        helper.make_node("DequantizeLinear", ["w_conv", "w_conv_scale", "w_conv_zero"], ["w_conv_dq"],
                         name="conv_w_dq", axis=weight_axis),
        helper.make_node("Conv", ["x_dq" if quantize_conv_input else "input", "w_conv_dq"], ["c"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "act_scale", "act_zero"], ["c_q"], name="c_q"),
        helper.make_node("DequantizeLinear", ["c_q", "act_scale", "act_zero"], ["c_dq"], name="c_dq"),
        helper.make_node("Flatten", ["c_dq"], ["f"], name="flatten"),
        helper.make_node("QuantizeLinear", ["f", "act_scale", "act_zero"], ["f_q"], name="f_q"),
        helper.make_node("DequantizeLinear", ["f_q", "act_scale", "act_zero"], ["f_dq"], name="f_dq"),
        helper.make_node("DequantizeLinear", ["w_gemm", "w_gemm_scale", "w_gemm_zero"], ["w_gemm_dq"],
                         name="gemm_w_dq", axis=gemm_axis),
        helper.make_node("Gemm", ["f_dq", "w_gemm_dq"], ["g"], name="gemm", transB=gemm_trans_b),
        helper.make_node("QuantizeLinear", ["g", "act_scale", "act_zero"], ["g_q"], name="g_q"),
        helper.make_node("DequantizeLinear", ["g_q", "act_scale", "act_zero"], ["g_dq"], name="g_dq"),
        helper.make_node("DequantizeLinear", ["w_mm", "w_mm_scale", "w_mm_zero"], ["w_mm_dq"],
                         name="mm_w_dq", axis=matmul_axis),
        helper.make_node("MatMul", ["g_dq", "w_mm_dq"], ["logits"], name="matmul"),
        *(extra_nodes or []),
    ]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _rules(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(f.rule, f.node) for f in lint_onnx(model)}


def test_hand_made_clean_model_passes_checker_and_lint() -> None:
    model = _qdq_model()
    onnx.checker.check_model(model, full_check=True)
    assert lint_onnx(model) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"act_zero": np.array(3, np.int8)}, {("int8-zero-point", "in_q"), ("int8-zero-point", "c_dq")}),
        ({"act_zero": np.array(128, np.uint8)}, {("int8-zero-point", "in_q"), ("int8-zero-point", "g_dq")}),
        ({"weight_axis": 1, "weight_scales": 1 * 4}, {("weight-axis", "conv_w_dq")}),
        ({"gemm_trans_b": 0, "gemm_axis": 0}, {("weight-axis", "gemm_w_dq")}),  # [K,N] Gemm needs axis 1
        ({"matmul_axis": 0}, {("weight-axis", "mm_w_dq")}),  # a [K,N] MatMul weight needs axis 1
        ({"act_scales": 4}, {("per-tensor", "in_q"), ("per-tensor", "in_dq")}),
        ({"quantize_conv_input": False}, {("unquantized", "conv")}),
        ({"opset": 12}, {("opset", "(model)")}),
        ({"opset": 22}, {("opset", "(model)")}),
    ],
)
def test_each_broken_rule_is_caught_and_names_the_node(kwargs: dict, expected: set[tuple[str, str]]) -> None:
    found = _rules(_qdq_model(**kwargs))
    assert expected <= found, found


def test_qoperator_ops_are_caught() -> None:
    extra = [
        helper.make_node("ConvInteger", ["a", "b"], ["c1"], name="conv_integer"),
        helper.make_node("MatMulInteger", ["a", "b"], ["c2"], name="matmul_integer"),
        helper.make_node("QLinearConv", ["a"] * 8, ["c3"], name="qlinear_conv"),
        helper.make_node("QLinearMatMul", ["a"] * 8, ["c4"], name="qlinear_matmul"),
    ]
    found = _rules(_qdq_model(extra_nodes=extra))
    assert {("qoperator", n) for n in ("conv_integer", "matmul_integer", "qlinear_conv", "qlinear_matmul")} <= found


def test_missing_zero_point_means_uint8_and_is_caught() -> None:
    model = _qdq_model()
    q = next(n for n in model.graph.node if n.name == "in_q")
    del q.input[2]
    assert ("int8-zero-point", "in_q") in _rules(model)


def test_float_graph_is_clean_and_unnamed_nodes_get_a_label() -> None:
    node = helper.make_node("Relu", ["input"], ["logits"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
    )
    assert lint_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])) == []
    bad = helper.make_graph(
        [helper.make_node("ConvInteger", ["input", "input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.INT8, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.INT32, [1, 1, 1, 1])],
    )
    assert [str(f) for f in lint_onnx(helper.make_model(bad, opset_imports=[helper.make_opsetid("", 17)]))] == [
        "ConvInteger#0: [qoperator] ConvInteger is a QOperator op, which TensorRT does not parse; use Q/DQ"
    ]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small conv net exported by us, quantized by ONNX Runtime: symmetric int8 (TensorRT's form) and
    ONNX Runtime's CPU default (unsigned activations, zero point != 0)."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from torch import nn

    from export.onnx_export import export_onnx

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"input": np.random.default_rng(i).standard_normal((2, 1, 8, 8)).astype(np.float32)} for i in range(4)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    base = tmp_path_factory.mktemp("lint")
    fp32 = export_onnx(net, torch.randn(1, 1, 8, 8), base / "fp32.onnx")
    paths = {"fp32": fp32, "trt": base / "int8-trt.onnx", "ort": base / "int8-ort.onnx"}
    quantize_static(
        str(fp32), str(paths["trt"]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        # TensorRT takes float biases: an int32 bias DequantizeLinear is not int8 and is caught otherwise
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    quantize_static(
        str(fp32), str(paths["ort"]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )
    return paths


def test_onnxruntime_symmetric_int8_qdq_passes(quantized: dict[str, Path]) -> None:
    ops = {n.op_type for n in onnx.load(str(quantized["trt"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert lint_onnx(quantized["trt"]) == []
    assert lint_onnx(quantized["fp32"]) == []


def test_onnxruntime_default_qdq_is_not_a_tensorrt_file(quantized: dict[str, Path]) -> None:
    rules = {f.rule for f in lint_onnx(quantized["ort"])}
    assert "int8-zero-point" in rules


def test_cli_lint_exit_codes(quantized: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    clean = runner.invoke(app, ["export", "--lint", str(quantized["trt"])])
    assert clean.exit_code == 0 and "clean" in clean.output
    dirty = runner.invoke(app, ["export", "--lint", str(quantized["ort"])])
    assert dirty.exit_code == 3, dirty.output
    assert "[int8-zero-point]" in dirty.output and "input_QuantizeLinear" in dirty.output
    missing = runner.invoke(app, ["export", "--lint", str(tmp_path / "absent.onnx")])
    assert missing.exit_code == 2 and "no such ONNX file" in missing.output
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model")
    assert runner.invoke(app, ["export", "--lint", str(garbage)]).exit_code == 2
    assert runner.invoke(app, ["export"]).exit_code == 2
