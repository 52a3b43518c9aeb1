"""Passes register themselves on import; importing this package makes every pass available."""
from compress.passes.registry import PassResult, PassSpec, get_pass, pass_names, register_pass
from compress.passes import prune_magnitude  # noqa: F401  (registers prune.magnitude)

__all__ = ["PassResult", "PassSpec", "get_pass", "pass_names", "register_pass"]
