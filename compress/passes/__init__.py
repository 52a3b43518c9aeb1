"""Passes register themselves on import; importing this package makes every pass available."""
from compress.passes.registry import PassResult, PassSpec, get_pass, pass_names, register_pass
from compress.passes import prune_magnitude  # noqa: F401  (registers prune.magnitude)
from compress.passes import distill_dot  # noqa: F401  (registers distill.dot)
from compress.passes import prune_ap  # noqa: F401  (registers prune.ap)
from compress.passes import quantize_adaround  # noqa: F401  (registers quantize.rtn, quantize.adaround)

__all__ = ["PassResult", "PassSpec", "get_pass", "pass_names", "register_pass"]
