"""Quantized modules whose forward is, op for op, the ONNX QDQ graph they export to.

- ActQuant: round(x / scale) half to even, plus the zero point, saturated, minus the zero point, times
  scale: ONNX QuantizeLinear then DequantizeLinear, bit for bit; it exports to that pair. The zero point
  is 0 (symmetric, TensorRT's form) or the grid's minimum (unsigned_symmetric: a tensor calibration found
  nonnegative uses all 256 levels on [0, amax], as AIMET's unsigned symmetric quantizers do).
- QuantLayer: a Conv1d/2d/3d or Linear (or transformers' Conv1D, GPT-2's Linear with its weight stored
  transposed) whose weight is int8 integers times a per-channel scale. The weight goes through
  fake_quantize_per_channel_affine, which returns the same values (they are on the grid already) and
  makes the export carry per-channel weight Q/DQ with axis 0, as TensorRT wants. Placed by module swap
  (compress/quant/swap.py) it carries its own input quantizer (`input_quant`); placed in a traced graph
  the quantizers are graph nodes instead and `input_quant` is None.
- QuantEmbedding: an Embedding whose table is int8 rows times a per-row scale; the export carries the
  table as int8 through a DequantizeLinear (axis 0) into the Gather.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.quant.grid import MIN_SCALE, activation_range
from compress.sparsity import transposed_linear_types

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ActMode = Literal["quant", "float", "observe"]


class QuantDequant(torch.autograd.Function):
    """clamp(round(x / scale)) * scale, round half to even: ONNX QuantizeLinear then DequantizeLinear.

    Not torch.fake_quantize_per_tensor_affine: it multiplies by 1/scale, which differs from ONNX's
    x / scale in the last bit, enough to send exact ties (common: image pixels are binary fractions)
    to the other side. The exporter writes this as a Q/DQ pair with a constant zero point.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, qmin: int, qmax: int, zero_point: int) -> Tensor:  # noqa: ANN001
        q = torch.round(x / scale)
        if zero_point:  # (an added 0 breaks torch's ONNX exporter: its peephole pass fails on the PythonOp)
            q = q + zero_point
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        q = torch.clamp(q, qmin, qmax)
        return (q - zero_point if zero_point else q) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None  # straight-through inside the range

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int, zero_point: int):  # noqa: ANN001, ANN205
        dtype = torch.int8 if qmax <= 127 else torch.int16  # int16 Q/DQ needs opset 21
        zero = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero), scale, zero)


class ActQuant(nn.Module):
    """Per-tensor fake quantization of an activation, symmetric or unsigned (zero point at the grid's
    minimum); `observe` mode feeds a calibrator."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = activation_range(bits)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.mode: ActMode = "quant"
        self.observer = None  # set by compress.quant.calibrate while observing
        self._zero = 0  # the buffer as a Python int: tracing for export reads it without a tensor->int conversion

    @property
    def unsigned(self) -> bool:
        return self._zero != 0

    def set_amax(self, amax: float, *, unsigned: bool = False) -> None:
        levels = self.qmax - self.qmin if unsigned else self.qmax
        self.scale.fill_(max(float(amax), MIN_SCALE) / levels)
        self._zero = self.qmin if unsigned else 0
        self.zero_point.fill_(self._zero)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        # checkpoints written before unsigned quantizers existed have no zero point: theirs is 0
        state_dict.setdefault(prefix + "zero_point", torch.tensor(0, dtype=torch.int32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._zero = int(self.zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "quant":
            return QuantDequant.apply(x, self.scale, self.qmin, self.qmax, self._zero)
        if self.mode == "observe" and self.observer is not None:
            self.observer(x.detach())
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.6g}" + (", unsigned" if self.unsigned else "")


def is_quantizable_layer(module: nn.Module) -> bool:
    """A Conv1d/2d/3d, a Linear, or transformers' Conv1D (a Linear whose weight is stored [in, out])."""
    return isinstance(module, LAYER_TYPES + transposed_linear_types())


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def exported_weight(weight: Tensor, scale: Tensor, axis: int) -> Tensor:
    """`weight` (already integers times `scale`, per channel along `axis`) through a per-channel fake
    quantization with zero point 0 in the int8 container: the same values, and in the export the weight's
    QuantizeLinear -> DequantizeLinear pair (export/qdq.py folds it into an int8 initializer)."""
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, axis, -128, 127)


class QuantLayer(nn.Module):
    """A Conv/Linear with integer weights. The float (BN-folded) weight is kept only while the pass runs,
    as a non-persistent buffer, so AdaRound can compute targets; the checkpoint holds integers and scales."""

    def __init__(self, layer: nn.Module, bits: int) -> None:
        super().__init__()
        if not is_quantizable_layer(layer):
            raise TypeError(f"cannot quantize {type(layer).__name__}")
        transposed = not isinstance(layer, LAYER_TYPES)  # Conv1D: a Linear whose weight is stored [in, out]
        self.kind = "Linear" if transposed else type(layer).__name__
        self.bits = bits
        weight = layer.weight.detach().t() if transposed else layer.weight.detach()
        self.input_quant: ActQuant | None = None  # module placement: the quantizer of this layer's input
        # SmoothQuant (compress/quant/smooth.py): the input's channels times these before its quantizer,
        # the weight's input columns divided by them (float_weight holds the smoothed weight)
        self.register_buffer("input_smooth", None)
        if transposed or isinstance(layer, nn.Linear):
            self.conv_args: dict = {}
        else:
            if layer.padding_mode != "zeros":
                raise TypeError(f"padding_mode {layer.padding_mode!r} is not supported")
            self.conv_args = {
                "stride": layer.stride,
                "padding": layer.padding,
                "dilation": layer.dilation,
                "groups": layer.groups,
            }
        out_channels = weight.shape[0]
        self.register_buffer("weight_int", torch.zeros(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("weight_scale", torch.ones(out_channels, device=weight.device))
        self.register_buffer("float_weight", weight.clone().float(), persistent=False)
        # a Parameter (frozen) rather than a buffer: tools that ask a model for its parameters still find one
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.use_float = False

    @property
    def weight(self) -> Tensor:
        """The weight this layer computes with: integers times scales (read-only view for reports)."""
        if self.use_float:
            return self.float_weight
        return self.weight_int.float() * _per_row(self.weight_scale, self.weight_int)

    def quantized_input(self, x: Tensor) -> Tensor:
        """The input as the weights see it: through this layer's own input quantizer, where it has one."""
        if self.input_smooth is not None:
            x = x * self.input_smooth
        return self.input_quant(x) if self.input_quant is not None else x

    def functional(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.kind == "Linear":
            return F.linear(x, weight, self.bias)
        conv = {"Conv1d": F.conv1d, "Conv2d": F.conv2d, "Conv3d": F.conv3d}[self.kind]
        return conv(x, weight, self.bias, **self.conv_args)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantized_input(x)
        if self.use_float:
            return self.functional(x, self.float_weight)
        if self.kind == "Linear" and x.dim() != 2:
            # tokens [..., in] (transformers): exported as MatMul with the weight stored [in, out] and its
            # per-channel Q/DQ on axis 1, straight into the MatMul, as TensorRT wants (not a Transpose of it)
            out = torch.matmul(x, exported_weight(self.weight.t(), self.weight_scale, 1))
            return out + self.bias if self.bias is not None else out
        return self.functional(x, exported_weight(self.weight, self.weight_scale, 0))

    def drop_float_weight(self) -> None:
        self.float_weight = torch.empty(0, device=self.weight_int.device)
        self.use_float = False

    def extra_repr(self) -> str:
        return f"{self.kind}, bits={self.bits}, weight={tuple(self.weight_int.shape)}"


class QuantEmbedding(nn.Module):
    """An Embedding table stored as int8 rows times one scale per row (symmetric, zero point 0).

    Only the table is quantized (weight-only): the rows looked up are the dequantized values, so the
    tensors after the lookup stay float. The export carries the table as int8 through a DequantizeLinear
    (axis 0) into the Gather."""

    def __init__(self, embedding: nn.Embedding, bits: int = 8) -> None:
        super().__init__()
        if embedding.max_norm is not None or embedding.sparse:
            raise TypeError("embeddings with max_norm or sparse gradients are not supported")
        weight = embedding.weight.detach()
        self.bits = bits
        self.padding_idx = embedding.padding_idx
        self.register_buffer("weight_int", torch.zeros(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("weight_scale", torch.ones(weight.shape[0], device=weight.device))
        self.register_buffer("float_weight", weight.clone().float(), persistent=False)
        self.use_float = False

    @property
    def weight(self) -> Tensor:
        return self.weight_int.float() * _per_row(self.weight_scale, self.weight_int)

    def forward(self, ids: Tensor) -> Tensor:
        if self.use_float:
            return F.embedding(ids, self.float_weight, self.padding_idx)
        return F.embedding(ids, exported_weight(self.weight, self.weight_scale, 0), self.padding_idx)

    def drop_float_weight(self) -> None:
        self.float_weight = torch.empty(0, device=self.weight_int.device)
        self.use_float = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, table={tuple(self.weight_int.shape)}"
