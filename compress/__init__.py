"""compress: staged, accuracy-gated model compression for PyTorch, exported to ONNX and TensorRT."""

__version__ = "0.1.0"
