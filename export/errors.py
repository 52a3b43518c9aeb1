"""Errors raised by the export package.

Kept free of torch/onnx imports so the Jetson-side code (TensorRT + onnx only)
can import it, and a plain Exception so the CLI decides the exit code.
"""
from __future__ import annotations


class ExportError(Exception):
    """The model could not be turned into a valid ONNX file; the message names the model and op."""
