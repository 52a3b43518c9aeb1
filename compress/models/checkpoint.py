"""Loading user checkpoints into a built model, safely by default.

torch.load runs with weights_only=True unless the user says --trust-checkpoint: a full unpickle can run
arbitrary code, so it must be an explicit decision about the file's source.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from compress.errors import BadInput

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
# DataParallel/DDP and torch.compile prefix every key; such checkpoints are the same weights.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_KEYS_SHOWN = 3


def load_checkpoint(
    model: nn.Module, path: str | Path, *, trust: bool = False, arch: str | None = None
) -> nn.Module:
    """Load the weights at `path` into `model` (strict) and return it.

    With trust=True a pickled nn.Module is returned as is, replacing `model`. `arch` only names the
    expected architecture in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: checkpoint file not found")
    loaded = _read(path, trust)
    if trust and isinstance(loaded, nn.Module):
        return loaded
    state = _strip_wrapper_prefixes(_find_state_dict(loaded, path), model)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("structure"), Mapping):
        _resize(model, loaded["structure"], state, path)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        expected = arch or type(model).__name__
        raise BadInput(f"{path}: does not match {expected}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def _read(path: Path, trust: bool) -> Any:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and _refused_objects(exc):
            raise BadInput(
                f"{path}: checkpoint needs full unpickling (it stores Python objects, not only tensors); "
                "pass --trust-checkpoint if you trust its source"
            ) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # truncated zip, garbage bytes, a class that no longer imports, ...
        raise _unreadable(path, exc) from None


def _refused_objects(exc: pickle.UnpicklingError) -> bool:
    """Did weights_only refuse a well-formed pickle of objects (vs. choke on a damaged file)?"""
    # torch's message is long advice; its reason follows "WeightsUnpickler error:" for most refusals, but a
    # blocked module (os.system, subprocess...) is reported without that marker.
    text = str(exc)
    if not text.startswith("Weights only load failed"):
        return False
    _, _, reason = text.partition("WeightsUnpickler error:")
    reason = (reason or text).lower()
    return any(word in reason for word in ("global", "allowlist", "can only", "blocked"))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError is not exported under a stable name
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> BadInput:
    detail = (str(exc).strip().splitlines() or ["no message"])[0][:200]
    return BadInput(f"{path}: cannot read checkpoint, corrupt or truncated? ({type(exc).__name__}: {detail})")


def _resize(model: nn.Module, structure: Mapping[str, Any], state: Mapping[str, Tensor], path: Path) -> None:
    """A stage checkpoint of a channel-pruned model: shrink the freshly built model to its layer sizes."""
    from compress.structure import apply_structure

    try:
        apply_structure(model, dict(structure), dict(state))
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadInput(f"{path}: its layer sizes do not fit this architecture ({exc})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _find_state_dict(loaded: Any, path: Path) -> Mapping[str, Tensor]:
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(loaded.get(key)):
                return loaded[key]
        found = ", ".join(map(str, list(loaded)[:5])) or "none"
        raise BadInput(
            f"{path}: no state_dict found (expected a dict of tensors, or one under "
            f"{', '.join(STATE_DICT_KEYS)}; top-level keys: {found})"
        )
    raise BadInput(f"{path}: expected a state_dict, got a {type(loaded).__name__}")


def _strip_wrapper_prefixes(state: Mapping[str, Tensor], model: nn.Module) -> Mapping[str, Tensor]:
    own = model.state_dict()
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _mismatches(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> list[str]:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k} {list(expected[k].shape)} vs {list(got[k].shape)}"
        for k in expected
        if k in got and expected[k].shape != got[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (model vs checkpoint) {_some(shapes)}")
    return problems


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_SHOWN])
    rest = len(items) - MAX_KEYS_SHOWN
    return f"{shown}, ... ({rest} more)" if rest > 0 else shown
