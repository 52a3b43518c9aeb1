"""PyTorch -> ONNX export: fp32, one file, a dynamic batch axis 0 on every input and output, and any
further dynamic axes the caller declares (``dynamic_axes``: a sequence axis, say).

Names: a lone input tensor is "input", a tuple/list sample's are "input_0", "input_1", ..., a dict
sample's its keys (export.ort_runner.input_leaves). A lone output tensor is "logits"; several outputs
(tuple, dict, ModelOutput) are named after compress.batches.leaves ("out", "aux", "0" -> "output_0",
"boxes.0" -> "boxes_0"), in that order, and the file's metadata keeps those leaves names
(OUTPUT_LEAVES_KEY) so that outputs read back from the file can be selected as the model's (model.output).
Integer inputs (token ids) stay integers. An input the graph does not use is left out of the file.

Exporter choice (measured on torch 2.14.1 CPU, torchvision resnet18 at 64x64, 2 cores):
the TorchScript exporter (``dynamo=False``) took 0.5-1.4 s per export, the dynamo
exporter 5.2-10.3 s. Dynamo also cannot honour opset 17: it only has opset-18
implementations and its down-conversion fails on ResNet (Reduce* axes), leaving an
opset-18 file, while TensorRT 8.x (JetPack 5) documents ONNX support only up to opset 17,
and the export prints progress lines to stdout. TorchScript emits exactly the
requested opset and identical bytes on repeated exports, so it is used here. It is
deprecated in torch 2.9+; if a future torch removes it this module has to move to dynamo
(``dynamic_shapes=`` plus ``external_data=False``).

Caveat of tracing: data-dependent Python control flow is silently frozen to the branch
taken for ``example_input``. Tensor->bool conversions in non-torch code are therefore
turned into ``ExportError`` instead of producing a graph that is wrong for other inputs.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import io
import json
import os
import re
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from compress.atomic import atomic_write_bytes
from compress.batches import Nested, call_model, leaves, map_tensors
from compress.errors import BadInput
from export.errors import ExportError
from export.ort_runner import INPUT_NAME, input_leaves

OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"  # the dim_param of axis 0 of every input and output
# metadata_props key: JSON list of the outputs' compress.batches.leaves names, in the file's output order
OUTPUT_LEAVES_KEY = "compress.output_leaves"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # locates without importing
    return str(Path(spec.origin).resolve().parent) if spec is not None and spec.origin else None


_TRACING_AWARE_DIRS = tuple(d for d in (_TORCH_DIR, _package_dir("transformers")) if d)


def export_onnx(
    model: torch.nn.Module,
    example_input: Nested,
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
) -> Path:
    """Export ``model`` to a single self-contained ONNX file at ``path`` and return it.

    ``example_input`` is a batch of one sample as the model takes it: a tensor (``model(x)``), a
    tuple/list (``model(*x)``) or a dict (``model(**x)``) of tensors.
    ``dynamic_axes``: ONNX input or output name -> {axis: label} declared dynamic besides the batch axis 0
    (``{"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}``); axes with the same label are
    the same size. A name the file does not have or an axis beyond the tensor's rank is ``BadInput``.
    The write is atomic: on any failure ``path`` is not created or modified.
    The caller's model is left as it was (device, dtype, per-module train/eval flags).
    Raises ``ExportError`` when the model cannot be converted.
    """
    path = Path(path)
    name = type(model).__name__
    export_model = _cpu_fp32_view(model)
    named = input_leaves(example_input)
    if not named or any(not isinstance(t, torch.Tensor) for _, t in named):
        kinds = ", ".join(f"{n} {type(t).__name__}" for n, t in named) or "nothing"
        raise ExportError(f"cannot export {name} to ONNX: the example sample must hold tensors only, got {kinds}")
    example = map_tensors(
        example_input, lambda t: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)
    )

    # Remember every module's own flag: model.train(old) would flatten a mixed tree.
    modes = {m: m.training for m in export_model.modules()}
    try:
        export_model.eval()
        model_bytes = _trace_to_onnx(export_model, example, [n for n, _ in named], opset, name, dynamic_axes or {})
    finally:
        for m, was_training in modes.items():
            m.train(was_training)

    atomic_write_bytes(path, model_bytes)
    return path


def output_name(leaf: str) -> str:
    """The ONNX name of an output with compress.batches.leaves name ``leaf`` (several outputs)."""
    flat = re.sub(r"[^0-9A-Za-z_]", "_", leaf)
    return f"output_{flat}" if not flat or flat[0].isdigit() else flat


def output_names(outputs: Nested) -> list[str]:
    """The ONNX names export_onnx gives the outputs of a model that returned ``outputs``, in order."""
    if isinstance(outputs, torch.Tensor):
        return [OUTPUT_NAME]
    return [output_name(k) for k, _ in leaves(outputs)]


def onnx_dynamic_axes(
    declared: Mapping[str, Mapping[int, str]], example: Nested, outputs: Nested, *, where: str = "dynamic_axes"
) -> dict[str, dict[int, str]]:
    """torch.onnx.export's dynamic_axes for a model that maps ``example`` to ``outputs``: the batch axis 0
    of every input and output, merged with the ``declared`` axes (ONNX name -> {axis: label}). A
    declared name that is neither an input nor an output, an axis outside the tensor, axis 0 or the
    label "batch" is one BadInput line starting with ``where``."""
    inputs = {n: t.dim() for n, t in input_leaves(example)}
    results = {n: t.dim() for n, (_, t) in zip(output_names(outputs), leaves(outputs))}
    ranks = {**inputs, **results}
    axes = {n: {0: BATCH_AXIS} for n in ranks}
    for tensor, declared_axes in declared.items():
        if tensor not in ranks:
            raise BadInput(
                f"{where}: {tensor!r} is not an input or output of the ONNX file "
                f"(inputs: {', '.join(inputs) or 'none'}; outputs: {', '.join(results) or 'none'})"
            )
        for axis, label in declared_axes.items():
            if not 1 <= axis < ranks[tensor]:
                raise BadInput(
                    f"{where}: {tensor}: axis {axis} is out of range for a tensor of rank {ranks[tensor]} "
                    f"(axis 0 is the batch axis, always dynamic; others are 1..{ranks[tensor] - 1})"
                )
            if label == BATCH_AXIS:
                raise BadInput(f"{where}: {tensor}: axis {axis}: the label {BATCH_AXIS!r} is axis 0's; choose another")
            axes[tensor][axis] = label
    return axes


class _FlatIO(torch.nn.Module):
    """The model seen by the exporter with one positional tensor per input leaf and a tuple of output
    tensors in compress.batches.leaves order, so that ONNX names line up with both whatever the
    structures (dict samples against the forward's own argument order, ModelOutput, nested tuples)."""

    def __init__(self, model: torch.nn.Module, example: Nested) -> None:
        super().__init__()
        self.model = model
        self.example = example

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(tensors)
        sample = map_tensors(self.example, lambda _: next(given))
        return tuple(t for _, t in leaves(call_model(self.model, sample)))


def _cpu_fp32_view(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``model`` itself if it is already CPU/fp32, else a converted deep copy.

    Copying only when needed avoids doubling memory for the common case while never
    moving or casting the caller's model in place.
    """
    tensors = [*model.parameters(), *model.buffers()]
    needs_copy = any(
        t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
        for t in tensors
    )
    if not needs_copy:
        return model
    clone = copy.deepcopy(model).to("cpu")
    return clone.float()


def _trace_to_onnx(
    model: torch.nn.Module,
    example: Nested,
    input_names: list[str],
    opset: int,
    name: str,
    declared_axes: Mapping[str, Mapping[int, str]],
) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, _no_onnx_log(), torch.no_grad():
        # "always" bypasses the once-per-location registry so a TracerWarning already
        # seen earlier in the process is still recorded here.
        warnings.simplefilter("always")
        try:
            outputs = call_model(model, example)
            found = leaves(outputs)
            if not found:
                raise ExportError(f"cannot export {name} to ONNX: it returned {type(outputs).__name__}, no tensors")
            lone = isinstance(example, torch.Tensor) and isinstance(outputs, torch.Tensor)
            names = output_names(outputs)
            if len(set(names)) != len(names):
                raise ExportError(f"cannot export {name} to ONNX: output names collide ({', '.join(k for k, _ in found)})")
            dynamic_axes = onnx_dynamic_axes(declared_axes, example, outputs)
            # A lone tensor in and out is traced as it always was (same graph, node names and bytes).
            traced, args = (model, (example,)) if lone else (_FlatIO(model, example), tuple(t for _, t in input_leaves(example)))
            # Exporting into memory rather than a path guarantees a single file: there is no directory
            # for external data to spill into, and >2 GB models fail loudly.
            torch.onnx.export(
                traced,
                args,
                buf,
                **_torchscript_kwargs(),
                input_names=input_names,
                output_names=names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                export_params=True,
                verbose=False,
            )
        except (ExportError, BadInput):
            raise
        except Exception as e:  # the exporter raises many unrelated types for one cause
            raise ExportError(f"cannot export {name} to ONNX (opset {opset}): {_first_line(e)}") from e
    frozen = _frozen_control_flow(caught)
    if frozen:
        raise ExportError(
            f"cannot export {name} to ONNX: data-dependent control flow at {frozen} "
            "(a tensor is converted to a Python bool), which tracing would freeze to one branch"
        )
    return _validate(buf.getvalue(), name, input_names, names, [k for k, _ in found])


def _frozen_control_flow(caught: list[warnings.WarningMessage]) -> str | None:
    """Location of the first tensor->bool conversion in model code, if any.

    torch's own library code (e.g. multi-head attention shape asserts) does this harmlessly, and so
    does transformers, which guards its data-dependent branches with its own is_tracing() checks (what
    remains there compares shapes, such as padding a mask to the sequence length); only locations
    outside those packages count.
    """
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            continue
        if "Python boolean" not in str(w.message):
            continue
        filename = str(Path(w.filename).resolve()) if w.filename else ""
        if any(filename.startswith(d + os.sep) for d in _TRACING_AWARE_DIRS):  # the separator keeps torchvision/ out
            continue
        return f"{w.filename}:{w.lineno}"
    return None


def _validate(
    model_bytes: bytes, name: str, input_names: list[str], output_names: list[str], output_leaves: list[str]
) -> bytes:
    """Check the file and return it with the outputs' leaves names in its metadata (several outputs)."""
    import onnx

    try:
        proto = onnx.load_model_from_string(model_bytes)
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"ONNX export of {name} produced an invalid model: {_first_line(e)}") from e
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    # the exporter leaves out inputs the graph does not read (an attention mask a model ignores, say)
    if inputs != [n for n in input_names if n in inputs] or outputs != output_names:
        raise ExportError(
            f"ONNX export of {name} must have inputs {input_names} and outputs {output_names}, "
            f"got inputs {inputs} and outputs {outputs}"
        )
    if output_names == [OUTPUT_NAME] and output_leaves == [""]:
        return model_bytes  # a lone tensor: the file is exactly what it always was
    entry = proto.metadata_props.add()
    entry.key, entry.value = OUTPUT_LEAVES_KEY, json.dumps(output_leaves)
    return proto.SerializeToString()


def output_leaves(proto: Any) -> list[str]:
    """compress.batches.leaves names of an ONNX file's outputs, in order: from the metadata export_onnx
    writes, else the ONNX names (files written elsewhere); a lone output is '' (one tensor)."""
    for entry in proto.metadata_props:
        if entry.key == OUTPUT_LEAVES_KEY:
            return list(json.loads(entry.value))
    names = [o.name for o in proto.graph.output]
    return [""] if len(names) == 1 else names


@contextlib.contextmanager
def _no_onnx_log() -> Iterator[None]:
    """Keep the TorchScript exporter's C++ log switched off during the export.

    torch's setup_onnx_logging tests the function object instead of calling it, so it
    always switches logging on (and never off again); on a failed conversion the whole IR
    graph is then printed straight to fd 1, through the CLI's progress display. Patching
    the private hook is narrower than redirecting process-wide file descriptors; if a
    future torch renames it, the export still works, only noisier.
    """
    ts_utils = _torchscript_utils()
    original = getattr(ts_utils, "setup_onnx_logging", None)
    setter = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    if setter is not None:
        setter(False)  # an earlier export in this process may have left it on
    if ts_utils is None or original is None:
        yield
        return
    ts_utils.setup_onnx_logging = lambda verbose: contextlib.nullcontext()
    try:
        yield
    finally:
        ts_utils.setup_onnx_logging = original


def _torchscript_kwargs() -> dict[str, bool]:
    # torch < 2.5 has no ``dynamo`` switch and always uses TorchScript; passing it there
    # would be a TypeError that looks like an unexportable model.
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def _torchscript_utils() -> types.ModuleType | None:
    # torch >= 2.9 moved the TorchScript exporter under _internal; before that it was torch.onnx.utils.
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:
        try:
            from torch.onnx import utils
        except ImportError:
            return None
    return utils


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line or type(e).__name__
