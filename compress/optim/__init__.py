"""Optimizers the training loops use beyond torch's own."""
from compress.optim.dot import DOT

__all__ = ["DOT"]
