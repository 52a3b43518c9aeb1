"""A lint for TensorRT's explicit-quantization rules over an ONNX file (ALGORITHMS.md section 5).

TensorRT builds int8 engines from Q/DQ graphs only when the graph follows its rules; a file that
breaks one either fails to parse on the device or silently runs layers in float. Checking here
catches that on the machine that exports, long before someone builds on a Jetson.

Rules (each finding names the node and the rule):
  opset            the default-domain opset is within TensorRT's range (13..21)
  qoperator        no QOperator ops (QLinearConv, ConvInteger, MatMulInteger, QLinearMatMul, ...)
  int8-zero-point  every QuantizeLinear/DequantizeLinear is int8 with a constant zero point of 0
  per-tensor       activations are quantized per tensor (one scale)
  weight-axis      per-channel weight scales run along the consumer's output channels: axis 0 for Conv
                   and Gemm with transB=1, axis 1 for a [K,N] MatMul or Gemm with transB=0, and for ConvTranspose
  unquantized      in a model with any Q/DQ, every Conv/Gemm/MatMul data and weight input comes from a
                   DequantizeLinear (TensorRT would otherwise run that layer in float)

Imports no torch: it runs wherever onnx does.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from export.errors import ExportError

OPSET_RANGE = (13, 21)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Compute ops whose data and weight inputs TensorRT needs quantized; the value is how many inputs count
# (Conv/Gemm's third input is the bias, which TensorRT keeps in float by design).
QUANTIZED_INPUTS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2, "MatMul": 2}
QOPERATOR_OPS = frozenset(
    {
        "ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization",
    }
)
RULES = ("opset", "qoperator", "int8-zero-point", "per-tensor", "weight-axis", "unquantized")


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: [{self.rule}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


def lint_onnx(model: str | Path | onnx.ModelProto) -> list[Finding]:
    """Every place where ``model`` breaks a TensorRT explicit-quantization rule; empty when clean."""
    proto = _load(model)
    graph = _Graph(proto)
    findings = list(_check_opset(proto))
    for index, node in enumerate(proto.graph.node):
        label = _label(node, index)
        if node.op_type in QOPERATOR_OPS or node.op_type.startswith("QLinear"):
            findings.append(
                Finding("qoperator", label, f"{node.op_type} is a QOperator op, which TensorRT does not parse; use Q/DQ")
            )
        elif node.op_type in QDQ_OPS:
            findings.extend(_check_qdq(node, label, graph))
    if graph.has_qdq:
        findings.extend(_check_quantized_inputs(proto, graph))
    return findings


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx others: all mean "not an ONNX model"
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


class _Graph:
    """Constants, producers and consumers of the main graph, the lookups every rule needs."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        g = proto.graph
        self.constants: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in g.node:
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.constants[node.output[0]] = value
            for out in node.output:
                self.producer[out] = node
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers.setdefault(name, []).append((node, slot))
        self.has_qdq = any(n.op_type in QDQ_OPS for n in g.node)
        self.elem_types: dict[str, int] = {}
        try:  # types of intermediate tensors, for a DequantizeLinear fed by something other than a constant
            inferred = onnx.shape_inference.infer_shapes(proto).graph
        except Exception:  # a graph that fails inference still gets every other check
            inferred = g
        for vi in [*inferred.input, *inferred.output, *inferred.value_info]:
            if vi.type.HasField("tensor_type"):
                self.elem_types[vi.name] = vi.type.tensor_type.elem_type

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def weight(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The constant a Q/DQ node quantizes (a weight), or None for an activation.

        Weights come either as integers feeding DequantizeLinear, or as floats through a
        QuantizeLinear -> DequantizeLinear pair (what torch's fake-quantize export writes).
        """
        found = self.constant(node.input[0])
        if found is None and node.op_type == "DequantizeLinear":
            producer = self.producer.get(node.input[0])
            if producer is not None and producer.op_type == "QuantizeLinear":
                found = self.constant(producer.input[0])
        return found

    def layer_consumers(self, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
        """Who reads the dequantized value: for a QuantizeLinear, the consumers of its DequantizeLinears."""
        direct = self.consumers.get(node.output[0], [])
        if node.op_type != "QuantizeLinear":
            return direct
        return [pair for dq, _ in direct if dq.op_type == "DequantizeLinear" for pair in self.consumers.get(dq.output[0], [])]

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type a Q/DQ node works in, or None when the file does not say."""
        if len(node.input) > 2 and node.input[2]:
            zero = self.constants.get(node.input[2])
            return zero.data_type if zero is not None else self.elem_types.get(node.input[2])
        if node.op_type == "QuantizeLinear":
            # Without a zero point the output is uint8 unless opset 21's output_dtype says otherwise.
            declared = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            return declared or TensorProto.UINT8
        source = node.input[0]
        if source in self.constants:
            return self.constants[source].data_type
        producer = self.producer.get(source)
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self.quantized_type(producer)
        return self.elem_types.get(source)


def _check_opset(proto: onnx.ModelProto) -> Iterable[Finding]:
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = OPSET_RANGE
    if version is None or not low <= version <= high:
        yield Finding("opset", "(model)", f"opset {version} is outside TensorRT's range {low}..{high}")


def _check_qdq(node: onnx.NodeProto, label: str, graph: _Graph) -> Iterable[Finding]:
    qtype = graph.quantized_type(node)
    if qtype != TensorProto.INT8:
        name = TensorProto.DataType.Name(qtype) if qtype else "unknown"
        hint = ""
        if any(slot == 2 for _, slot in graph.layer_consumers(node)):
            hint = " (a quantized bias: TensorRT takes biases in float; quantize_static has QuantizeBias=False)"
        yield Finding("int8-zero-point", label, f"{node.op_type} works in {name}; TensorRT needs int8{hint}")
    if len(node.input) > 2 and node.input[2]:
        zero = graph.constant(node.input[2])
        if zero is None:
            yield Finding("int8-zero-point", label, f"zero point {node.input[2]!r} is not a constant")
        elif np.any(zero != 0):
            yield Finding("int8-zero-point", label, f"zero point is {_brief(zero)}; TensorRT needs 0 (symmetric)")

    scale = graph.constant(node.input[1]) if len(node.input) > 1 else None
    scales = 1 if scale is None else scale.size  # a non-constant scale is not TensorRT's concern here
    weight = graph.weight(node)
    if weight is None:
        if scales > 1:
            yield Finding("per-tensor", label, f"activation quantized with {scales} scales; TensorRT needs one")
        return
    if scales == 1:
        return
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis + weight.ndim if axis < 0 else axis
    for consumer, slot in graph.layer_consumers(node):
        expected = _weight_axis(consumer, slot, weight.ndim)
        if expected is not None and axis != expected:
            yield Finding(
                "weight-axis", label,
                f"per-channel axis {axis} for the weight of {consumer.op_type} {consumer.name or '(unnamed)'}; "
                f"TensorRT needs axis {expected} (its output channels)",
            )
    if 0 <= axis < weight.ndim and weight.shape[axis] != scales:
        yield Finding("weight-axis", label, f"{scales} scales for {weight.shape[axis]} channels along axis {axis}")


def _weight_axis(consumer: onnx.NodeProto, slot: int, rank: int) -> int | None:
    """The output-channel axis of a weight at ``slot`` of ``consumer``, or None when it is not a weight."""
    if slot != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if consumer.op_type == "MatMul":
        return rank - 1
    return None


def _check_quantized_inputs(proto: onnx.ModelProto, graph: _Graph) -> Iterable[Finding]:
    for index, node in enumerate(proto.graph.node):
        count = QUANTIZED_INPUTS.get(node.op_type)
        if count is None:
            continue
        for slot, name in enumerate(node.input[:count]):
            producer = graph.producer.get(name)
            if producer is None or producer.op_type != "DequantizeLinear":
                role = "weight" if slot == 1 else "data"
                yield Finding(
                    "unquantized", _label(node, index),
                    f"{role} input {name!r} of {node.op_type} does not come from a DequantizeLinear",
                )


def _brief(values: np.ndarray) -> str:
    flat = values.reshape(-1)
    shown = ", ".join(str(v) for v in flat[:4])
    return shown if flat.size <= 4 else f"[{shown}, ...] ({flat.size} values)"
