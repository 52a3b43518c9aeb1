"""From a float model to its quantized graph: trace, fold BatchNorm, wrap layers, place activation quantizers.

Everything the transformation decides is written into a plan of plain data (which BN folded into which
layer, bits per layer, where each activation quantizer sits and whom it feeds). The pass builds from a
plan with the real weights; a stage checkpoint stores the plan, and resume rebuilds the same graph from
a template of the original architecture, then loads the integers and scales into it.

Quantizer placement follows TensorRT's explicit quantization: a Q/DQ pair on the input of every
quantized Conv/Linear, and on the skip branch of a residual add (the operand that is not the output
of the layer TensorRT fuses the add into), so Conv+Add(+ReLU) run in int8. One quantizer per tensor:
consumers of the same tensor share it, so the ONNX graph has one Q/DQ pair per quantized tensor.
"""
from __future__ import annotations

import copy
import inspect
import operator
from fnmatch import fnmatch
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from compress.errors import BadInput
from compress.quant.modules import LAYER_TYPES, ActQuant, QuantEmbedding, QuantLayer

PLAN_FORMAT = "compress.quant/1"
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ADD_TARGETS = (operator.add, operator.iadd, torch.add)
RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
RELU_FUNCTIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.relu6: "relu6"}
ACT_MODULE = "act_quant"  # the ModuleDict holding the activation quantizers


class _Tracer(fx.Tracer):
    """fx's tracer, but torch.nn containers of Conv/Linear layers (nn.TransformerEncoder and its layers)
    are traced into rather than kept as opaque leaves, and the module being traced when tracing fails
    is remembered, so the error can name it."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LAYER_TYPES):
            return True
        if any(isinstance(sub, LAYER_TYPES) for sub in m.modules()):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path_stack.append((self.path_of_module(m), type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()  # not on failure: the stack then ends with the module that failed
        return result


def given_inputs(model: nn.Module, example: Any) -> list[str] | None:
    """The names of `model.forward`'s parameters that a sample (tensor, tuple or dict; `batches.call_model`)
    fills; None when forward takes *args or **kwargs (then every parameter is traced as an input)."""
    from compress.batches import as_args

    args, kwargs = as_args(example)
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional[: len(args)] + [name for name in kwargs if name not in positional[: len(args)]]


def _concrete_args(model: nn.Module, inputs: list[str] | None) -> dict[str, Any] | None:
    """Parameters the data does not fill, fixed at their defaults (`mask=None`), so code branching on them
    (`if mask is not None`) traces the branch the data takes."""
    if inputs is None:
        return None
    params = inspect.signature(model.forward).parameters.values()
    fixed = {p.name: p.default for p in params if p.name not in inputs and p.default is not inspect.Parameter.empty}
    return fixed or None


def trace(model: nn.Module, inputs: list[str] | None = None) -> fx.GraphModule:
    """The fx graph of `model`; `inputs` (given_inputs): the forward parameters the data fills, the
    others fixed at their defaults. Outputs keep their structure (tensor, tuple, dict)."""
    from compress.attention import UnsupportedLayer, unsupported_attention

    opaque = unsupported_attention(model)
    if opaque is not None:
        raise UnsupportedLayer(opaque.path, opaque.kind, f"quantization: {opaque.reason}")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, inputs))
    except Exception as exc:  # fx raises many types for one cause: code it cannot trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if tracer.path_stack:
            path, kind = tracer.path_stack[-1]
            raise UnsupportedLayer(path, kind, f"quantization needs torch.fx-traceable code; tracing failed: {first}") from None
        raise BadInput(
            f"model.arch: quantization needs a torch.fx-traceable model; tracing failed: {first}"
        ) from None
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in model.modules())


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` (dotted path) of `model` with `module`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def swap_embeddings(model: nn.Module, names: list[str], *, with_weights: bool) -> None:
    """The named Embeddings replaced by int8 tables (QuantEmbedding); without weights: structure only."""
    for name in names:
        table = QuantEmbedding(model.get_submodule(name), 8)
        if not with_weights:
            table.drop_float_weight()
        set_module(model, name, table)


# --- BN folding ----------------------------------------------------------------------------------------


def foldable_pairs(gm: fx.GraphModule) -> dict[str, str]:
    """layer name -> BN name, for each BN whose input is a Conv/Linear output used by nothing else."""
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        bn = _module(gm, node)
        if not isinstance(bn, BN_TYPES) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = node.args[0]
        layer = _module(gm, producer)
        if isinstance(layer, LAYER_TYPES) and len(producer.users) == 1 and bn.track_running_stats:
            if layer.weight.shape[0] == bn.num_features and producer.target not in pairs:
                pairs[str(producer.target)] = str(node.target)
    return pairs


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.Module) -> None:
    """W' = W * gamma/sigma per output channel, b' = (b - mu) * gamma/sigma + beta."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    bias = layer.bias if layer.bias is not None else torch.zeros_like(std)
    new_bias = (bias - bn.running_mean) * factor + beta
    layer.weight.mul_(factor.view(-1, *([1] * (layer.weight.dim() - 1))))
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def _remove_bn_nodes(gm: fx.GraphModule, pairs: dict[str, str]) -> None:
    folded = set(pairs.values())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in folded:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            set_module(gm, str(node.target), nn.Identity())


# --- planning --------------------------------------------------------------------------------------------


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if isinstance(_module(gm, n), LAYER_TYPES + (QuantLayer,))]


def _resolve_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    while isinstance(_module(gm, node), nn.Identity) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def following_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' / 'relu6' when the layer's only consumer is that activation (AdaRound's loss includes it)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    module = _module(gm, user)
    if module is not None:
        return RELU_MODULES.get(type(module))
    if user.op == "call_function":
        return RELU_FUNCTIONS.get(user.target)
    if user.op == "call_method" and user.target == "relu":
        return "relu"
    return None


Placement = Literal["auto", "graph", "modules"]


def make_plan(
    model: nn.Module,
    *,
    weight_bits: int,
    activation_bits: int | None,
    layer_bits: dict[str, int],
    skip: list[str],
    first_last_8bit: bool,
    residual: str = "skip",
    example: Any = None,
    placement: Placement = "auto",
    embeddings: bool = False,
) -> dict[str, Any]:
    """Decide everything (on a throwaway trace or run) and return it as plain data.

    example: a batch of the data's samples (`StageContext.example`); forward parameters it does not fill
    are traced at their defaults, and the plan records which it fills (resume traces the same graph).

    residual: which operands of a residual add get a quantizer: `skip` (TensorRT's placement: the operand
    not fused into the layer) or `both` (also the layer's output, so ONNX Runtime finds DQ -> Conv -> Q
    and DQ -> Add -> Q everywhere and runs every conv and add on integers).

    placement: `graph` traces the model with torch.fx (BN folding, residual quantizers); `modules` swaps
    layers for ones carrying their own quantizers (compress/quant/swap.py: any model that runs); `auto`
    traces and falls back to modules when tracing fails, recording why in the plan (`placement_reason`).
    embeddings: also store every Embedding table as int8 rows (weight-only).
    """
    from compress.attention import UnsupportedLayer, unsupported_attention

    opaque = unsupported_attention(model)  # attention no placement can quantize: refused, never left float
    if opaque is not None:
        raise UnsupportedLayer(opaque.path, opaque.kind, f"quantization: {opaque.reason}")
    inputs = given_inputs(model, example) if example is not None else None
    reason = "requested"
    if placement != "modules":
        try:
            gm = trace(model, inputs)
        except BadInput as exc:
            if placement == "graph" or example is None:  # module placement runs the model on a sample
                raise
            reason = f"torch.fx tracing failed: {exc}"
        else:
            return _graph_plan(gm, inputs, weight_bits, activation_bits, layer_bits, skip, first_last_8bit, residual,
                               embeddings)
    from compress.quant.swap import plan_modules

    found = plan_modules(model, example, activation_bits=activation_bits, embeddings=embeddings)
    bits = _layer_bits(found["layers"], weight_bits, layer_bits, skip, first_last_8bit)
    return {
        "format": PLAN_FORMAT,
        "placement": "modules",
        "placement_reason": reason,
        "folded": {},
        "bits": bits,
        "float_layers": [n for n in found["layers"] if n not in bits],
        "activation_bits": activation_bits,
        "activations": [],
        "matmuls": found["matmuls"],
        "embeddings": found["embeddings"],
        "transposed": [n for n in found["transposed"] if n in bits],
        "attention": found["attention"],
        **({"inputs": inputs} if inputs is not None else {}),
    }


def _layer_bits(
    names: list[str], weight_bits: int, layer_bits: dict[str, int], skip: list[str], first_last_8bit: bool
) -> dict[str, int]:
    """Bits per quantized layer (in `names`' order), after checking that every pattern matches a layer."""
    for field, patterns in (("layer_bits", list(layer_bits)), ("skip", skip)):
        for pattern in patterns:
            if not any(fnmatch(name, pattern) for name in names):
                raise BadInput(f"params.{field}: pattern {pattern!r} matches no Conv/Linear layer")
    quantized = [n for n in names if not any(fnmatch(n, p) for p in skip)]
    if not quantized:
        raise BadInput("params.skip: every Conv/Linear layer is skipped, nothing left to quantize")
    bits: dict[str, int] = {}
    for name in quantized:
        chosen = weight_bits
        if first_last_8bit and name in (quantized[0], quantized[-1]):
            chosen = 8
        for pattern, value in layer_bits.items():  # explicit patterns have the last word; first match wins
            if fnmatch(name, pattern):
                chosen = value
                break
        bits[name] = chosen
    return bits


def _graph_plan(
    gm: fx.GraphModule,
    inputs: list[str] | None,
    weight_bits: int,
    activation_bits: int | None,
    layer_bits: dict[str, int],
    skip: list[str],
    first_last_8bit: bool,
    residual: str,
    embeddings: bool,
) -> dict[str, Any]:
    pairs = foldable_pairs(gm)
    _remove_bn_nodes(gm, pairs)
    names = [str(n.target) for n in layer_nodes(gm)]
    bits = _layer_bits(names, weight_bits, layer_bits, skip, first_last_8bit)
    activations = _place_activation_quantizers(gm, set(bits), residual) if activation_bits else []
    tables = [str(n.target) for n in gm.graph.nodes if isinstance(_module(gm, n), nn.Embedding)] if embeddings else []
    return {
        "format": PLAN_FORMAT,
        "placement": "graph",
        "folded": pairs,
        "bits": bits,
        "float_layers": [n for n in names if n not in bits],
        "activation_bits": activation_bits,
        "activations": activations,
        "embeddings": tables,
        **({"inputs": inputs} if inputs is not None else {}),
    }


MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)


def _is_matmul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in MATMUL_FUNCTIONS
    return node.op == "call_method" and node.target in ("matmul", "bmm")


def _place_activation_quantizers(gm: fx.GraphModule, quantized: set[str], residual: str) -> list[dict[str, Any]]:
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    wanted: dict[fx.Node, list[list[str]]] = {}  # source tensor -> [(consumer, the arg it replaces)]

    def want(consumer: fx.Node, arg: fx.Node) -> None:
        source = _resolve_identity(gm, arg)
        entries = wanted.setdefault(source, [])
        if [consumer.name, arg.name] not in entries:
            entries.append([consumer.name, arg.name])

    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, LAYER_TYPES) and str(node.target) in quantized:
            if isinstance(node.args[0], fx.Node):
                want(node, node.args[0])
        elif _is_matmul(node):
            # activation x activation products (attention): TensorRT and ONNX Runtime run a MatMul in
            # int8 when both inputs come through Q/DQ; softmax and LayerNorm stay float
            for operand in node.args[:2]:
                if isinstance(operand, fx.Node):
                    want(node, operand)
        elif node.op == "call_function" and node.target in ADD_TARGETS:
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) != 2:
                continue
            from_layer = [a for a in operands if isinstance(_module(gm, _resolve_identity(gm, a)), LAYER_TYPES)]
            if not from_layer:
                continue  # neither side can fuse the add: leave it float
            fused = max(from_layer, key=lambda a: order[_resolve_identity(gm, a)])
            for operand in operands:
                if operand is not fused or residual == "both":
                    want(node, operand)
            if residual == "both" and following_activation(gm, node) == "relu":
                # the add's ReLU output quantized for every consumer, the last block's pooling included:
                # ONNX Runtime then runs DQ -> Add -> ReLU -> Q as one QLinearAdd there too (and the pooling
                # on integers) instead of leaving the network's tail in float
                relu = next(iter(node.users))
                for user in list(relu.users):
                    want(user, relu)
    return [
        {"key": f"q_{source.name}", "source": source.name, "consumers": consumers}
        for source, consumers in sorted(wanted.items(), key=lambda item: order[item[0]])
    ]


# --- building --------------------------------------------------------------------------------------------


def build(model: nn.Module, plan: dict[str, Any], *, with_weights: bool = True) -> fx.GraphModule:
    """The quantized graph of `model` (not modified) following `plan`.

    with_weights: fold the real BN statistics and keep the float weights for calibration and rounding;
    without, only the structure is made (a template for loading a checkpoint's integers and scales).
    """
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a quantization plan (format {plan.get('format')!r})")
    if plan.get("placement") == "modules":
        from compress.quant.swap import build_modules

        return build_modules(model, plan, with_weights=with_weights)
    model = copy.deepcopy(model)  # fx shares submodules with the traced root: never fold the caller's
    gm = trace(model, plan.get("inputs"))
    for layer_name, bn_name in plan["folded"].items():
        layer, bn = gm.get_submodule(layer_name), gm.get_submodule(bn_name)
        if with_weights:
            fold_bn(layer, bn)
        elif layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
    _remove_bn_nodes(gm, plan["folded"])
    for name, bits in plan["bits"].items():
        wrapped = QuantLayer(gm.get_submodule(name), bits)
        if not with_weights:
            wrapped.drop_float_weight()
        set_module(gm, name, wrapped)
    swap_embeddings(gm, plan.get("embeddings", []), with_weights=with_weights)
    if plan["activations"]:
        nodes = {n.name: n for n in gm.graph.nodes}
        gm.add_module(ACT_MODULE, nn.ModuleDict())
        for entry in plan["activations"]:
            getattr(gm, ACT_MODULE)[entry["key"]] = ActQuant(plan["activation_bits"])
            source = nodes[entry["source"]]
            with gm.graph.inserting_after(source):
                qnode = gm.graph.call_module(f"{ACT_MODULE}.{entry['key']}", (source,))
            for consumer, arg in entry["consumers"]:
                nodes[consumer].replace_input_with(nodes[arg], qnode)
    gm.graph.lint()
    gm.recompile()
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    return gm.to(device)


def _input_quantizers(model: nn.Module) -> list[tuple[QuantLayer, ActQuant]]:
    """Each quantized layer with the quantizer of its input: its own (module placement) or the graph
    node feeding it (graph placement)."""
    pairs = [(m, m.input_quant) for m in model.modules() if isinstance(m, QuantLayer) and m.input_quant is not None]
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            layer = _module(model, node)
            source = node.args[0] if isinstance(layer, QuantLayer) and node.args else None
            quantizer = _module(model, source) if isinstance(source, fx.Node) else None
            if isinstance(quantizer, ActQuant):
                pairs.append((layer, quantizer))
    return pairs


@torch.no_grad()
def snap_biases(model: nn.Module) -> None:
    """Each quantized layer's bias rounded onto the int32 grid of (its input quantizer's scale) x (its
    weight scale per channel): the bias the integer layer runs with.

    ONNX's integer convolution (QLinearConv), which ONNX Runtime makes of DQ -> Conv -> Q, takes its bias
    as int32 at that scale, and ONNX Runtime rounds a float bias onto it (its WeightBiasQuantization, on
    at every optimization level but none). The step is tiny against most outputs, but not after a
    depthwise conv whose folded BatchNorm left large weights and a small output: in shufflenet_v2_x1_0
    the rounding moved biases by up to 0.025 and ONNX Runtime's top-1 agreed with torch on 0.795 only.
    Rounded here, torch and every runtime compute with the same bias.
    """
    for layer, quantizer in _input_quantizers(model):
        if layer.bias is None:
            continue
        scale = quantizer.scale.float() * layer.weight_scale.float()
        steps = torch.clamp(torch.round(layer.bias.float() / scale), -(2**31), 2**31 - 1)
        layer.bias.copy_((steps * scale).to(layer.bias.dtype))


def oriented_masks(plan: dict[str, Any], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pruning masks (keyed `layer.weight`) shaped like the quantized layers' weights: a transformers
    Conv1D stores its weight [in, out], its QuantLayer [out, in] as a Linear does."""
    transposed = {f"{name}.weight" for name in plan.get("transposed", [])}
    return {key: mask.t() if key in transposed else mask for key, mask in masks.items()}


def quant_layers(gm: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, QuantLayer)}


def quant_embeddings(model: nn.Module) -> dict[str, QuantEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantEmbedding)}


def integer_weights(model: nn.Module) -> dict[str, QuantLayer | QuantEmbedding]:
    """Every module holding integer weights on a per-row grid: the quantized layers and tables."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLayer, QuantEmbedding))}


def act_quantizers(gm: nn.Module) -> dict[str, ActQuant]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, ActQuant)}


def set_float(gm: nn.Module, on: bool) -> None:
    """Float mode (float weights, no activation quantization): the folded float model AdaRound targets."""
    for module in gm.modules():
        if isinstance(module, (QuantLayer, QuantEmbedding)):
            module.use_float = on
        elif isinstance(module, ActQuant):
            module.mode = "float" if on else "quant"
