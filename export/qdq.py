"""int8 ONNX files from the Q/DQ graph a quantized torch model exports to.

The torch export of a quantized stage carries every weight as a float initializer going through
QuantizeLinear -> DequantizeLinear (the fake quantization) and every quantized activation as a Q/DQ pair
with a signed zero point 0. That graph is exact but stores weights in fp32. This module rewrites it into
the files that ship, from the same integers:

- ``int8-trt``: each weight becomes an int8 initializer feeding its DequantizeLinear directly (per-channel
  scale, axis unchanged); activations stay signed int8 with zero point 0, as TensorRT's explicit
  quantization requires.
- ``int8-ort``: the encoding ONNX Runtime's x86 kernels run fastest. Activations are uint8: zero point 128
  (round(x/s) + 128 clamped to [0, 255] is the signed grid shifted, dequantizing to the same values), and
  zero point 0 where the tensor comes out of a ReLU, so that ONNX Runtime folds the ReLU into the integer
  op before it (DQ -> Conv -> Q becomes QLinearConv); there the unsigned grid saturates at 255 * s rather
  than 127 * s, the only difference from int8-trt. Weights stay int8 (ONNX Runtime's fast u8 x s8
  kernels) except where those could saturate: x86 without VNNI adds products pairwise in int16. A layer
  fed straight from a ReLU sees activations of 0..127 steps (the calibrated range; only values beyond it
  reach 128..255), and 2 * 127 * 127 = 32258 fits in int16. Any other input (the network's input, a
  pooled or flattened tensor: zero point 128) spans 0..255, so a layer reading one stores weights wider
  than +-64 as uint8 with zero point 128 (the same grid shifted; ONNX Runtime runs its exact u8 x u8
  kernel there). Measured on ResNet-20 W8A8 (AVX2): every layer signed agreed with torch on 96.5% of test
  predictions; unsigned only where needed 99.9%, as fast as all-signed and ~1.8x faster than all-unsigned.

  Two more int8-ort rewrites let ONNX Runtime run the network's tail on integers as well (its own
  quantize_static output does): a per-tensor quantizer reading a Flatten/Reshape moves before it (a
  reshape commutes with per-tensor rounding, so the values are unchanged, and DQ -> GlobalAveragePool -> Q
  becomes QLinearGlobalAveragePool); and each Gemm bias that lies on its int32 grid (input scale x weight
  scale, where calibration snaps it) is stored as int32 through a DequantizeLinear, which ONNX Runtime
  requires before it fuses a Gemm into QGemm (Conv biases it converts itself when it loads the file, so
  they stay float: an int32 copy would only add its per-channel scales to the file).

Weights below 8 bits ship as their small integers in int8 containers (no int4 packing). Graphs with several
inputs and outputs convert alike; integer inputs (token ids, a Gather's indices) are never quantized, and a
quantized table that is only looked up (an Embedding's Gather) keeps signed weights in int8-ort. Imports no
torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper

from export.errors import ExportError

Flavor = Literal["int8-trt", "int8-ort"]
FLAVORS: tuple[Flavor, ...] = ("int8-trt", "int8-ort")
_UINT8_ZERO = "qdq_activation_zero_point_u8"
_UINT8_ZERO_RELU = "qdq_activation_zero_point_u8_relu"
# ONNX Runtime's u8 x s8 kernels on x86 without VNNI add pairs of products in int16 (VPMADDUBSW), which
# saturates once 2 * a * |w| > 32767: with inputs up to 255, weights up to 64 in magnitude are safe.
U8S8_SAFE_WEIGHT = 64
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


def convert_to_int8(
    source: str | Path | onnx.ModelProto, flavor: Flavor, *, saturation_safe: bool = True
) -> onnx.ModelProto:
    """The ``flavor`` int8 model of a fake-quantized Q/DQ export (see the module docstring).

    saturation_safe=False keeps every int8-ort weight signed, also where the layer's input is not a ReLU's
    output: faster there on x86 without VNNI (u8 x s8 instead of u8 x u8) but results can differ where
    int16 pair sums saturate; exact on CPUs with VNNI and on ARM.
    """
    if flavor not in FLAVORS:
        raise ExportError(f"unknown int8 flavor {flavor!r}; expected one of {', '.join(FLAVORS)}")
    proto = onnx.load(str(source)) if not isinstance(source, onnx.ModelProto) else _copy(source)
    graph = proto.graph
    _constants_to_initializers(graph)
    inits = {t.name: t for t in graph.initializer}
    _bypass_identities_of_initializers(graph, inits)
    consumers = _consumers(graph)
    nodes_by_output = _producers(graph)
    weights = 0
    activations = 0
    removed: list[onnx.NodeProto] = []
    integer_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type not in _FLOAT_TYPES}
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        if node.input[0] in integer_inputs:  # token ids, indices: never quantized
            raise ExportError(f"{node.name}: quantizes the integer input {node.input[0]!r}; only float tensors quantize")
        if node.input[0] in inits:
            unsigned_wide = flavor == "int8-ort" and saturation_safe and not _reads_relu(node, consumers, nodes_by_output)
            _fold_weight_quantizer(graph, node, inits, consumers, unsigned_wide=unsigned_wide)
            removed.append(node)
            weights += 1
        else:
            if flavor == "int8-ort":
                _to_unsigned(node, inits, consumers, after_relu=_quantizes_relu(node, nodes_by_output))
            elif (zero := _activation_zero_point(node, inits)) is not None and np.any(zero != 0):
                raise ExportError(
                    f"int8-trt: activation quantizer {node.name} has zero point {zero} (an unsigned grid: "
                    "quantize's unsigned_symmetric); TensorRT's int8 needs zero point 0, export int8-ort"
                )
            activations += 1
    if weights == 0:
        raise ExportError("the model has no quantized weights: int8 export needs a quantize stage before it")
    for node in removed:
        graph.node.remove(node)
    if flavor == "int8-ort":
        _quantize_before_reshapes(graph)
        _int32_biases(graph)
    if flavor == "int8-ort" and activations:
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), _UINT8_ZERO))
        graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), _UINT8_ZERO_RELU))
    _drop_unused_initializers(graph)  # the float weights, and a zero point no activation uses
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"int8 rewrite produced an invalid model: {str(exc).splitlines()[0]}") from exc
    return proto


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes (the exporter writes zero points as Constants) become initializers, so each
    quantization parameter is looked up one way."""
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)


def _bypass_identities_of_initializers(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> None:
    """The exporter deduplicates identical weights (layers deep-copied from one, all-zero pruned layers) and
    feeds the copies through Identity nodes; read the initializer directly so each is folded as a weight."""
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    if not aliases:
        return
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in aliases]:
        if node.output[0] not in graph_outputs:
            graph.node.remove(node)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _quantizes_relu(quant: onnx.NodeProto, nodes_by_output: dict[str, onnx.NodeProto]) -> bool:
    producer = nodes_by_output.get(quant.input[0])
    return producer is not None and producer.op_type == "Relu"


def _reads_relu(
    weight_quant: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], nodes_by_output: dict[str, onnx.NodeProto]
) -> bool:
    """Whether every layer using this weight takes its activation from Q(DQ) right after a ReLU:
    weight Q -> DQ -> layer, whose input 0 is DQ <- Q <- Relu. A table only looked up (an Embedding's
    Gather reads it at input 0 with integer indices) multiplies nothing, so it cannot saturate either."""
    users = [(dq, layer) for dq in consumers.get(weight_quant.output[0], []) for layer in consumers.get(dq.output[0], [])]
    layers = [layer for dq, layer in users if not (layer.op_type == "Gather" and layer.input[0] == dq.output[0])]
    if not layers:
        return bool(users)
    for layer in layers:
        dequant = nodes_by_output.get(layer.input[0])
        quant = nodes_by_output.get(dequant.input[0]) if dequant is not None and dequant.op_type == "DequantizeLinear" else None
        if quant is None or quant.op_type != "QuantizeLinear" or not _quantizes_relu(quant, nodes_by_output):
            return False
    return True


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _fold_weight_quantizer(
    graph: onnx.GraphProto,
    quant: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    consumers: dict[str, list[onnx.NodeProto]],
    *,
    unsigned_wide: bool,
) -> None:
    """Store QuantizeLinear(W) as its int8 result, computed as ONNX does: W / scale, round half to even,
    plus the zero point, saturated."""
    weight = numpy_helper.to_array(inits[quant.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[quant.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[quant.input[2]]) if len(quant.input) > 2 and quant.input[2] else None
    if zero is not None and zero.dtype != np.int8:
        raise ExportError(f"{quant.name}: weight zero point is {zero.dtype}, expected int8")
    axis = _attr(quant, "axis", 1)
    shape = [1] * weight.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis % weight.ndim] = scale.size
    q = np.rint(weight / scale.reshape(shape))
    if zero is not None:
        q = q + zero.astype(np.float32).reshape(shape)
    integers = np.clip(q, -128, 127).astype(np.int8)
    name = f"{quant.input[0]}_int8"
    zero_name = None
    if unsigned_wide and np.abs(integers.astype(np.int16)).max() > U8S8_SAFE_WEIGHT:
        integers = (integers.astype(np.int16) + 128).astype(np.uint8)
        name = f"{quant.input[0]}_uint8"
        zero_name = f"{name}_zero_point"
        count = scale.size if scale.ndim == 1 else 1
        zeros = np.full(count, 128, dtype=np.uint8) if scale.ndim == 1 else np.array(128, dtype=np.uint8)
        graph.initializer.append(numpy_helper.from_array(zeros, zero_name))
    graph.initializer.append(numpy_helper.from_array(integers, name))
    for user in consumers.get(quant.output[0], []):
        if user.op_type != "DequantizeLinear":
            raise ExportError(f"{quant.name}: weight QuantizeLinear feeds {user.op_type}, expected DequantizeLinear")
        user.input[0] = name
        if zero_name is not None:
            user.input[2] = zero_name


def _activation_zero_point(quant: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    return numpy_helper.to_array(inits[quant.input[2]]) if len(quant.input) > 2 and quant.input[2] else None


def _to_unsigned(
    quant: onnx.NodeProto,
    inits: dict[str, onnx.TensorProto],
    consumers: dict[str, list[onnx.NodeProto]],
    after_relu: bool,
) -> None:
    """A signed activation quantizer as uint8: zero point 0 -> 128 (0 after a ReLU, see the module
    docstring); an unsigned one (int8 zero point -128, unsigned_symmetric) is exactly uint8 with zero point 0."""
    zero = _activation_zero_point(quant, inits)
    if zero is None or zero.dtype != np.int8 or zero.size != 1 or int(zero) not in (0, -128):
        raise ExportError(f"{quant.name}: expected an int8 activation quantizer with zero point 0 or -128")
    name = _UINT8_ZERO_RELU if after_relu or int(zero) == -128 else _UINT8_ZERO
    quant.input[2] = name
    for user in consumers.get(quant.output[0], []):
        if user.op_type != "DequantizeLinear":
            raise ExportError(f"{quant.name}: activation QuantizeLinear feeds {user.op_type}, expected DequantizeLinear")
        user.input[2] = name


def _quantize_before_reshapes(graph: onnx.GraphProto) -> None:
    """Q(Flatten(x)) -> Flatten(Q(x)) for per-tensor activation quantizers whose Flatten/Reshape feeds
    nothing else: the reshape then moves integers, and the op before it meets its Q directly."""
    consumers = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    nodes_by_output = _producers(graph)
    for quant in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]:
        reshape = nodes_by_output.get(quant.input[0])
        if reshape is None or reshape.op_type not in ("Flatten", "Reshape") or len(consumers[reshape.output[0]]) != 1:
            continue
        if numpy_helper.to_array(inits[quant.input[1]]).size != 1:
            continue
        integers = quant.output[0]
        quant.input[0], quant.output[0] = reshape.input[0], f"{integers}_before_{reshape.op_type.lower()}"
        reshape.input[0], reshape.output[0] = quant.output[0], integers
        graph.node.remove(quant)  # keep the node list topologically sorted: Q now runs before the reshape
        index = list(graph.node).index(reshape)
        graph.node.insert(index, quant)


def _int32_biases(graph: onnx.GraphProto) -> None:
    """Float biases of Gemm layers whose input and weight are dequantized, stored as int32 at scale input
    scale x weight scale where they lie on that grid (off-grid ones stay float: rounding them here would
    change the result)."""
    inits = {t.name: t for t in graph.initializer}
    nodes_by_output = _producers(graph)
    for layer in [n for n in graph.node if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in inits]:
        if _float_attr(layer, "beta", 1.0) != 1.0 or _attr(layer, "transB", 0) != 1:
            continue
        dequant_x, dequant_w = (nodes_by_output.get(name) for name in layer.input[:2])
        if not (dequant_x and dequant_w and dequant_x.op_type == dequant_w.op_type == "DequantizeLinear"):
            continue
        scale = (numpy_helper.to_array(inits[dequant_x.input[1]]).astype(np.float64)
                 * numpy_helper.to_array(inits[dequant_w.input[1]]).astype(np.float64)).reshape(-1)  # fmt: skip
        bias = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64)
        steps = bias / scale
        # float32 biases and scales carry ~1e-7 relative error: large step counts sit that far off the grid
        off_grid = np.abs(steps - np.rint(steps)) > 1e-3 + 1e-6 * np.abs(steps)
        if np.any(scale <= 0) or np.any(off_grid) or np.abs(steps).max() >= 2**31:
            continue
        name = f"{layer.output[0]}_bias_int32"  # per layer: the exporter may share one bias among several
        graph.initializer.extend([
            numpy_helper.from_array(np.rint(steps).astype(np.int32), name),
            numpy_helper.from_array((scale if scale.size > 1 else scale.reshape(())).astype(np.float32), f"{name}_scale"),
        ])  # fmt: skip
        dequant = onnx.helper.make_node("DequantizeLinear", [name, f"{name}_scale"], [f"{name}_dequantized"],
                                        name=f"{name}_dequantize", axis=0)  # fmt: skip
        graph.node.insert(list(graph.node).index(layer), dequant)
        layer.input[2] = dequant.output[0]


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((float(a.f) for a in node.attribute if a.name == name), default)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


__all__ = ["FLAVORS", "Flavor", "convert_to_int8"]
