"""Post-training quantization: integer grids, BN folding, QDQ-exact modules, calibration, AdaRound."""
from compress.quant.graph import build, is_quantized, make_plan
from compress.quant.modules import ActQuant, QuantLayer


def restore(template, plan, state_dict):  # noqa: ANN001, ANN201  (import-light: compress.state calls it)
    """The quantized graph of a stage checkpoint, rebuilt on the original architecture, its tensors sized
    like the checkpoint's (a channel-pruned model's layers are smaller); load the state_dict next."""
    from compress.structure import apply_structure

    apply_structure(template, plan.get("structure", {}), {})
    model = build(template, plan, with_weights=False)
    apply_structure(model, {}, state_dict)
    return model


__all__ = ["ActQuant", "QuantLayer", "build", "is_quantized", "make_plan", "restore"]
