"""Quantizers placed by module swap: any nn.Module that runs can be quantized, no whole-model trace.

The graph placement (compress/quant/graph.py) traces the model with torch.fx and puts one quantizer on
each tensor where TensorRT wants it. `transformers` models do not trace that way (their forward branches
on tensors and shapes), so, as NVIDIA Model-Optimizer and torchao do, this placement swaps modules:

- every Conv/Linear (and transformers' Conv1D) that the example forward calls becomes a QuantLayer that
  quantizes its own input (`input_quant`): Q/DQ -> Conv/MatMul in the export, what TensorRT and ONNX
  Runtime fuse into integer layers. Layers reading the same tensor (query, key, value) each hold a
  quantizer; calibration sees the same tensor, so their scales are equal.
- the activation x activation matmuls (attention's q @ k^T and softmax @ v) are found by running the
  example once and noting, for each torch.matmul / @ / bmm of two non-parameter tensors, the innermost
  module whose own code made it (not a layer inside it). That module gets a MatmulQuant: two quantizers
  per call, applied by a torch function mode while the module's own code runs (hooks on the module and
  its children switch it on and off), so the export carries Q/DQ on both MatMul inputs. LayerNorm,
  softmax and the residual adds stay float.
- optionally every Embedding becomes a QuantEmbedding (int8 table, per-row scales).

What this placement does not do, and the report says so: fold BatchNorm (it stays a float op after the
conv; ONNX Runtime and TensorRT fuse a float BN into a float conv only) and quantize residual adds.
Hugging Face models are switched to eager attention (sdpa hides its matmuls in one kernel).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from compress.batches import call_model
from compress.errors import BadInput
from compress.quant.graph import set_module, swap_embeddings
from compress.quant.modules import LAYER_TYPES, ActQuant, QuantLayer, is_quantizable_layer

MATMULS = frozenset({torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm, torch.Tensor.__matmul__})
MATMUL_MODULE = "matmul_quant"  # the child a MatmulQuant is registered as on the module it serves


def _is_activation_pair(func: Any, args: tuple[Any, ...]) -> bool:
    return (
        func in MATMULS
        and len(args) >= 2
        and all(isinstance(a, Tensor) and not isinstance(a, nn.Parameter) for a in args[:2])
    )


class _Recorder(TorchFunctionMode):
    """While active (and hooked on every module of a model): for each module, the most activation x
    activation matmuls its own code made in one call (not counting its children's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {m: name for name, m in model.named_modules()}
        self.stack: list[list[Any]] = []  # [module, matmuls so far in this call]
        self.matmuls: dict[str, int] = {}
        self.handles = []
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module: nn.Module, _args: Any) -> None:
        self.stack.append([module, 0])

    def _exit(self, module: nn.Module, _args: Any, _output: Any) -> None:
        if self.stack and self.stack[-1][0] is module:
            _, count = self.stack.pop()
            if count and not is_quantizable_layer(module) and not isinstance(module, nn.MultiheadAttention):
                name = self.names[module]
                self.matmuls[name] = max(self.matmuls.get(name, 0), count)

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if self.stack and _is_activation_pair(func, args):
            self.stack[-1][1] += 1
        return func(*args, **(kwargs or {}))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def eager_attention(model: nn.Module) -> list[str]:
    """Switch Hugging Face models to eager attention (its matmuls are visible); returns what it changed."""
    changed: list[str] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if isinstance(current, str) and current != "eager":
            config._attn_implementation = "eager"
            changed.append(f"{name or '(root)'}: {current} -> eager")
    return changed


def _in_multihead_attention(model: nn.Module) -> set[str]:
    """Layers owned by nn.MultiheadAttention, which reads their weights directly (never calls them)."""
    owned: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            owned.update(f"{name}.{child}" if name else child for child, _ in module.named_modules() if child)
    return owned


@torch.no_grad()
def record(model: nn.Module, example: Any) -> tuple[list[str], dict[str, int], list[str]]:
    """Run `example` once: the quantizable layers in the order they are first called, the modules making
    activation x activation matmuls (with their count per call), and the Embeddings called."""
    recorder = _Recorder(model)
    order: dict[str, None] = {}
    embeddings: dict[str, None] = {}
    handles = []
    for name, module in model.named_modules():
        if is_quantizable_layer(module):
            handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: order.setdefault(name, None)))
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: embeddings.setdefault(name, None)))
    was_training = model.training
    model.eval()
    try:
        with recorder:
            call_model(model, example)
    except Exception as exc:  # the user's model failing on its own data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"model: quantization runs the model once on a training sample; it failed: {first}") from None
    finally:
        recorder.remove()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return list(order), recorder.matmuls, list(embeddings)


class _MatmulMode(TorchFunctionMode):
    def __init__(self, quant: MatmulQuant) -> None:
        super().__init__()
        self.quant = quant

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        quant = self.quant
        if quant.depth == 0 and _is_activation_pair(func, args):
            index = quant.calls
            quant.calls += 1
            if index < len(quant.pairs):
                left, right = quant.pairs[index]
                args = (left(args[0]), right(args[1]), *args[2:])
        return func(*args, **(kwargs or {}))


class MatmulQuant(nn.Module):
    """Quantizers for both inputs of each activation x activation matmul a module's own code makes.

    Installed on its module with `attach`: a forward pre-hook enters a torch function mode that
    quantizes the operands of the n-th matmul with the n-th pair; the module's children (its layers)
    pause it while they run, so only the module's own matmuls count."""

    def __init__(self, count: int, bits: int) -> None:
        super().__init__()
        self.pairs = nn.ModuleList(nn.ModuleList([ActQuant(bits), ActQuant(bits)]) for _ in range(count))
        self.depth = 0
        self.calls = 0
        self._modes: list[_MatmulMode] = []

    def attach(self, owner: nn.Module) -> None:
        owner.add_module(MATMUL_MODULE, self)
        owner.register_forward_pre_hook(self._start)
        owner.register_forward_hook(self._stop, always_call=True)
        for child in owner.children():
            if child is self:
                continue
            child.register_forward_pre_hook(self._pause)
            child.register_forward_hook(self._resume, always_call=True)

    def _start(self, _owner: nn.Module, _args: Any) -> None:
        self.depth, self.calls = 0, 0
        mode = _MatmulMode(self)
        mode.__enter__()
        self._modes.append(mode)

    def _stop(self, _owner: nn.Module, _args: Any, _output: Any) -> None:
        if self._modes:
            self._modes.pop().__exit__(None, None, None)

    def _pause(self, _child: nn.Module, _args: Any) -> None:
        self.depth += 1

    def _resume(self, _child: nn.Module, _args: Any, _output: Any) -> None:
        self.depth = max(0, self.depth - 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> MatmulQuant:
        clone = MatmulQuant.__new__(MatmulQuant)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = [] if key == "_modes" else copy.deepcopy(value, memo)
        return clone

    def extra_repr(self) -> str:
        return f"matmuls={len(self.pairs)}"


def plan_modules(
    model: nn.Module,
    example: Any,
    *,
    activation_bits: int | None,
    embeddings: bool,
) -> dict[str, Any]:
    """The module placement's part of a plan: layers in call order, matmul owners, embeddings."""
    if example is None:
        raise BadInput("model: quantization by module placement needs a sample of the data to run the model on")
    probe = copy.deepcopy(model)
    attention = eager_attention(probe)
    layers, matmuls, tables = record(probe, example)
    owned = _in_multihead_attention(probe)
    return {
        "layers": [name for name in layers if name not in owned],
        "transposed": [name for name in layers if not isinstance(probe.get_submodule(name), LAYER_TYPES)],
        "matmuls": matmuls if activation_bits else {},
        "embeddings": tables if embeddings else [],
        "attention": attention,
    }


def build_modules(model: nn.Module, plan: dict[str, Any], *, with_weights: bool = True) -> nn.Module:
    """A copy of `model` with the plan's layers, matmul owners and embeddings swapped for quantized ones."""
    model = copy.deepcopy(model)
    eager_attention(model)
    bits_of_activations = plan["activation_bits"]
    for name, bits in plan["bits"].items():
        wrapped = QuantLayer(model.get_submodule(name), bits)
        if bits_of_activations:
            wrapped.input_quant = ActQuant(bits_of_activations)
        if name in plan.get("smoothed", []):  # values come with the weights (smooth.py) or the checkpoint
            wrapped.input_smooth = torch.ones(wrapped.float_weight.shape[1], device=wrapped.weight_int.device)
        if not with_weights:
            wrapped.drop_float_weight()
        set_module(model, name, wrapped)
    swap_embeddings(model, plan.get("embeddings", []), with_weights=with_weights)
    for name, count in plan.get("matmuls", {}).items():
        MatmulQuant(count, bits_of_activations).attach(model.get_submodule(name) if name else model)
    return model

