"""fp32 ONNX -> fp16 ONNX: weights and activations in fp16, inputs and outputs kept fp32 unless asked.

Converted from the fp32 export rather than exported from a ``.half()`` torch model: the graph is the one
already verified, the conversion takes milliseconds, and ONNX Runtime's converter already knows which
inputs must stay fp32 (Resize scales, ops without fp16 kernels). It appends its I/O casts at the end of
the node list, which onnx.checker rejects, so the graph is sorted again before it is checked.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from compress.atomic import atomic_write_bytes
from export.errors import ExportError


def convert_to_fp16(src: str | Path, dst: str | Path, *, io_fp16: bool = False) -> Path:
    """Write the fp16 version of the ONNX file ``src`` to ``dst`` (atomically) and return ``dst``.

    With ``io_fp16`` the model's inputs and outputs are fp16 too; otherwise callers feed and read fp32
    exactly as with the fp32 file, and the casts sit inside the graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = Path(src), Path(dst)
    try:
        model = onnx.load(str(src))
        # Values beyond fp16's range are clipped to it rather than becoming inf; the converter warns for
        # each, which would print through the progress display.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert_float_to_float16(model, keep_io_types=not io_fp16)
        wrapped = OnnxModel(converted)
        wrapped.topological_sort()
        onnx.checker.check_model(wrapped.model)
    except Exception as exc:  # the converter and checker raise unrelated types for one cause
        raise ExportError(f"cannot convert {src} to fp16: {type(exc).__name__}: {exc}") from exc
    atomic_write_bytes(dst, wrapped.model.SerializeToString())
    return dst
