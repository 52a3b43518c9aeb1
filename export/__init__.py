"""Everything after the checkpoint: ONNX export, ONNX Runtime verification, TensorRT engines.

Imports nothing heavy here: export.tensorrt must run on a device that has only tensorrt and onnx.
"""
