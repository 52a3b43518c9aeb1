"""PyTorch -> ONNX export: fp32, input "input", output "logits", dynamic batch, one file.

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
import inspect
import io
import os
import re
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from compress.atomic import atomic_write_bytes
from export.errors import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = 17,
) -> Path:
    """Export ``model`` to a single self-contained ONNX file at ``path`` and return it.

    The write is atomic: on any failure ``path`` is not created or modified.
    The caller's model is left as it was (device, dtype, per-module train/eval flags).
    Raises ``ExportError`` when the model cannot be converted.
    """
    path = Path(path)
    name = type(model).__name__
    export_model = _cpu_fp32_view(model)
    x = example_input.detach().to("cpu")
    if x.is_floating_point():
        x = x.to(torch.float32)

    # Remember every module's own flag: model.train(old) would flatten a mixed tree.
    modes = {m: m.training for m in export_model.modules()}
    try:
        export_model.eval()
        model_bytes = _trace_to_onnx(export_model, x, opset, name)
    finally:
        for m, was_training in modes.items():
            m.train(was_training)

    _validate(model_bytes, name)
    atomic_write_bytes(path, model_bytes)
    return path


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


def _trace_to_onnx(model: torch.nn.Module, x: torch.Tensor, opset: int, name: str) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, _no_onnx_log(), torch.no_grad():
        # "always" bypasses the once-per-location registry so a TracerWarning already
        # seen earlier in the process is still recorded here.
        warnings.simplefilter("always")
        try:
            # Exporting into memory rather than a path guarantees a single file: there is
            # no directory for external data to spill into, and >2 GB models fail loudly.
            torch.onnx.export(
                model,
                (x,),
                buf,
                **_torchscript_kwargs(),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                export_params=True,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many unrelated types for one cause
            raise ExportError(f"cannot export {name} to ONNX (opset {opset}): {_first_line(e)}") from e
    frozen = _frozen_control_flow(caught)
    if frozen:
        raise ExportError(
            f"cannot export {name} to ONNX: data-dependent control flow at {frozen} "
            "(a tensor is converted to a Python bool), which tracing would freeze to one branch"
        )
    return buf.getvalue()


def _frozen_control_flow(caught: list[warnings.WarningMessage]) -> str | None:
    """Location of the first tensor->bool conversion in model code, if any.

    torch's own library code (e.g. multi-head attention shape asserts) does this
    harmlessly, so only locations outside the torch package count.
    """
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning):
            continue
        if "Python boolean" not in str(w.message):
            continue
        filename = str(Path(w.filename).resolve()) if w.filename else ""
        if filename.startswith(_TORCH_DIR + os.sep):  # the separator keeps torchvision/ out
            continue
        return f"{w.filename}:{w.lineno}"
    return None


def _validate(model_bytes: bytes, name: str) -> None:
    import onnx

    try:
        proto = onnx.load_model_from_string(model_bytes)
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"ONNX export of {name} produced an invalid model: {_first_line(e)}") from e
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"ONNX export of {name} must have one input and one output tensor, "
            f"got inputs {inputs} and outputs {outputs}"
        )


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
