"""The recipe: a typed schema over YAML, and the loader that turns every mistake into one line.

Pass parameters are validated by the config type each pass registers (compress.passes.registry), so
`stages[0].params.sparsity` errors carry the same path style as the recipe's own fields.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import BadInput

RECIPE_VERSION = 1
SOURCE_PREFIXES = ("builtin:", "torchvision:", "python:")


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class TrainConfig(StrictModel):
    """How the built-in reference is trained when the recipe gives no checkpoint."""

    epochs: int = Field(15, ge=1, le=1000)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int | None = Field(None, ge=1)
    shift: int = Field(2, ge=0, le=8, description="random +-pixel shifts (augmentation)")
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    loss: str = Field("auto", description="auto | ce | mse | python:module:callable(outputs, targets)")


class ModelConfig(StrictModel):
    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str | None = Field(
        None, description="the part of a tuple/dict output metrics, gates and distillation read ('out', 'logits', '0')"
    )

    @field_validator("arch")
    @classmethod
    def _known_prefix(cls, arch: str) -> str:
        if not arch.startswith(SOURCE_PREFIXES) or arch.endswith(":"):
            raise ValueError(f"expected builtin:NAME, torchvision:NAME or python:module:callable, got {arch!r}")
        return arch


class SplitConfig(StrictModel):
    """Fractions of each class held out; the split seed is separate from the run seed so that changing
    the run seed never changes which images are test images."""

    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.val + self.test >= 0.9:
            raise ValueError("val + test must leave at least 10% of the data for training")
        return self


class DataConfig(StrictModel):
    dataset: str
    batch_size: int = Field(128, ge=1)
    calibration_samples: int = Field(1024, ge=1)
    image_size: int | None = Field(None, ge=4, description="resize side for imagefolder data")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    split: SplitConfig = Field(default_factory=SplitConfig)


class SearchConfig(StrictModel):
    """The budget and knobs of `on_fail: search` (compress/search.py): trials and/or minutes."""

    trials: int | None = Field(8, ge=1, description="at most this many trials, the stage's own run included")
    minutes: float | None = Field(None, gt=0, description="no trial starts after this many minutes of trials")
    adaptive: bool = Field(False, description="pruning: then keep the most sensitive layers dense")
    dense_share: float = Field(0.02, gt=0, lt=1, description="adaptive: at most this share of the weights kept dense")
    tolerance: float = Field(0.1, gt=0, description="pruning: stop bisecting when densities differ by this ratio")
    group: int | None = Field(None, ge=1, description="quantization: layers moved per trial (default: a sixth)")

    @model_validator(mode="after")
    def _bounded(self) -> SearchConfig:
        if self.trials is None and self.minutes is None:
            raise ValueError("trials or minutes: a search needs a budget")
        return self


class GateConfig(StrictModel):
    max_drop: float | None = Field(None, ge=0, description="in the metric's own units: a fraction for top1/cosine, dB for sqnr")
    min_metric: float | None = None
    against: Literal["baseline", "previous"] = "baseline"
    on_fail: Literal["stop", "continue", "search"] = "stop"
    search: SearchConfig | None = Field(None, description="with on_fail: search (default budget: 8 trials)")

    @model_validator(mode="after")
    def _search_needs_on_fail(self) -> GateConfig:
        if self.search is not None and self.on_fail != "search":
            raise ValueError("search: only used with on_fail: search")
        return self


class StageConfig(StrictModel):
    name: str
    pass_name: str = Field(alias="pass")
    params: dict[str, Any] = Field(default_factory=dict)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _searchable(self) -> StageConfig:
        if self.gate.on_fail == "search" and not self.pass_name.startswith(("prune.", "quantize.")):
            raise ValueError(f"gate.on_fail: search backs off prune.* and quantize.* stages, not {self.pass_name}")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        # The name becomes a directory: keep it portable and free of path separators.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
            raise ValueError(f"expected letters, digits, '_', '.', '-' (a directory name), got {name!r}")
        return name


class OnnxConfig(StrictModel):
    opset: int = Field(17, ge=13, le=21)
    # int8-trt: signed activations (TensorRT explicit quantization); int8-ort: the same integers in the
    # unsigned encoding ONNX Runtime's CPU kernels run fastest (export/qdq.py); `int8` means the CPU one.
    precisions: list[Literal["fp32", "fp16", "int8-trt", "int8-ort"]] = Field(
        default_factory=lambda: ["fp32"], min_length=1
    )
    io_fp16: bool = Field(False, description="fp16 files take and return fp16 (default: fp32 I/O, casts inside)")
    # ONNX input/output name -> {axis: label}: axes dynamic besides the batch axis 0 (a sequence axis, say);
    # names and ranks are checked against the model before the run starts (export.onnx_export)
    dynamic_axes: dict[str, dict[int, str]] = Field(default_factory=dict)
    int8_ort_weights: Literal["safe", "signed"] = Field(
        "safe",
        description="int8-ort: 8-bit weights past +-64 stored unsigned so x86 CPUs without VNNI cannot saturate "
        "(exact everywhere), or all signed (faster there, exact only with VNNI or on ARM)",
    )

    @field_validator("dynamic_axes")
    @classmethod
    def _axes_beyond_batch(cls, axes: dict[str, dict[int, str]]) -> dict[str, dict[int, str]]:
        for tensor, labels in axes.items():
            for axis, label in labels.items():
                where = f"{tensor}: axis {axis}"
                if axis < 1:
                    raise ValueError(f"{where}: axis 0 is the batch axis, always dynamic; declare axes >= 1")
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", label) or label == "batch":
                    raise ValueError(f"{where}: expected a label such as 'sequence' (not 'batch'), got {label!r}")
        return axes

    @field_validator("precisions", mode="before")
    @classmethod
    def _int8_means_cpu_flavor(cls, precisions: Any) -> Any:
        if isinstance(precisions, list):
            precisions = ["int8-ort" if p == "int8" else p for p in precisions]
        return precisions

    @field_validator("precisions")
    @classmethod
    def _unique_precisions(cls, precisions: list[str]) -> list[str]:
        if len(set(precisions)) != len(precisions):
            raise ValueError(f"each precision once, got {precisions}")
        return precisions


class TensorRTConfig(StrictModel):
    build: Literal["auto", "required", "never"] = "auto"
    sparse_weights: bool = True
    # (min, opt, max) of the engine's dynamic batch: tuned for batch 1 (edge latency), up to the report's 64
    batch: tuple[int, int, int] = (1, 1, 64)
    workspace_mb: int | None = Field(None, ge=1)
    dla_core: int | None = Field(None, ge=0, description="build for this DLA core, with GPU fallback")

    @field_validator("build", mode="before")
    @classmethod
    def _always_means_required(cls, build: Any) -> Any:
        return "required" if build == "always" else build  # the spelling before `required`

    @field_validator("batch")
    @classmethod
    def _ordered_batch(cls, batch: tuple[int, int, int]) -> tuple[int, int, int]:
        if not 1 <= batch[0] <= batch[1] <= batch[2]:
            raise ValueError(f"expected [min, opt, max] with 1 <= min <= opt <= max, got {list(batch)}")
        return batch


class VerifyConfig(StrictModel):
    max_drop: float | None = Field(0.002, ge=0)
    latency: bool = True
    latency_runs: int = Field(50, ge=1)
    latency_rounds: int = Field(5, ge=1, description="timed runs split into rounds that alternate between the files")
    threads: int = Field(2, ge=1)


class ExportConfig(StrictModel):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)

    @model_validator(mode="after")
    def _engines_vary_only_the_batch(self) -> ExportConfig:
        if self.onnx.dynamic_axes and self.tensorrt.build == "required":
            raise ValueError(
                "onnx.dynamic_axes: TensorRT engine profiles here vary only the batch axis, so no engine is built "
                "from a file with other dynamic axes; set tensorrt.build: auto or never"
            )
        return self


class ResourcesConfig(StrictModel):
    memory_mb: float | None = Field(None, gt=0, description="refuse to start a run estimated to need more")


class Recipe(StrictModel):
    version: Literal[1] = RECIPE_VERSION
    name: str
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    metric: str = "top1"
    stages: list[StageConfig] = Field(default_factory=list)
    export: ExportConfig | None = Field(default_factory=ExportConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return StageConfig._safe_name(name)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        from compress.metrics import BUILTIN_METRICS

        if metric not in BUILTIN_METRICS and not metric.startswith("python:"):
            raise ValueError(f"expected one of {', '.join(BUILTIN_METRICS)} or python:module:callable, got {metric!r}")
        return metric

    @model_validator(mode="after")
    def _int8_needs_quantize_stage(self) -> Recipe:
        int8 = [p for p in (self.export.onnx.precisions if self.export else []) if p.startswith("int8")]
        if int8 and not any(s.pass_name.startswith("quantize.") for s in self.stages):
            raise ValueError(f"export.onnx.precisions: {int8[0]} needs a quantize stage (quantize.adaround or quantize.rtn)")
        return self

    @model_validator(mode="after")
    def _tensorrt_needs_signed_activations(self) -> Recipe:
        if self.export is None or "int8-trt" not in self.export.onnx.precisions:
            return self
        for stage in self.stages:
            if stage.pass_name.startswith("quantize.") and stage.params.get("unsigned_symmetric") is True:
                raise ValueError(
                    f"export.onnx.precisions: int8-trt needs signed activations (TensorRT's int8), but stage "
                    f"{stage.name!r} sets unsigned_symmetric: true; export int8-ort or drop that option"
                )
        return self

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        seen: set[str] = set()
        for stage in stages:
            if stage.name in seen:
                raise ValueError(f"duplicate stage name {stage.name!r}")
            seen.add(stage.name)
        return stages

    def pass_configs(self) -> list[BaseModel]:
        """Each stage's params as its pass's typed config (validated when the recipe was loaded)."""
        from compress.passes import get_pass

        return [get_pass(s.pass_name).config_type.model_validate(s.params) for s in self.stages]

    def resolved(self) -> dict[str, Any]:
        """The recipe as run: every default filled in, pass params included."""
        data = self.model_dump(mode="json", by_alias=True)
        for stage_dict, config in zip(data["stages"], self.pass_configs()):
            stage_dict["params"] = config.model_dump(mode="json")
        return data


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able data, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- error formatting -------------------------------------------------------------------------------

_EXPECTED = {
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "missing": "required field is missing",
    "extra_forbidden": "unknown key",
}


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # a key with spaces, dots or control characters is shown quoted, so the path stays one line
            text = str(part) if re.fullmatch(r"[A-Za-z0-9_-]+", str(part)) else repr(str(part))
            out += ("." if out else "") + text
    return out or "(top level)"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    got = f", got {err.get('input')!r}"
    if kind in _BOUNDS:
        bound = next(iter((err.get("ctx") or {}).values()), "?")
        return f"expected a value {_BOUNDS[kind]} {bound}{got}"
    if kind == "literal_error":
        return f"expected {(err.get('ctx') or {}).get('expected', '?')}{got}"
    if kind in ("too_short", "too_long"):
        return err["msg"].replace("List should", "expected a list that should") + got
    if kind in _EXPECTED:
        text = _EXPECTED[kind]
        if kind not in ("missing", "extra_forbidden"):
            text += got
        return text
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def validation_message(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    """One line for the first problem (more are counted, not listed: the user fixes one at a time)."""
    errors = exc.errors()
    first = errors[0]
    loc = tuple(prefix) + tuple(p for p in first["loc"] if not str(p).startswith("function-"))
    # pydantic reports model-level validator errors at the model's own path; keep it readable.
    line = f"{format_loc(loc)}: {_describe(first)}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return " ".join(line.splitlines())


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate an already-parsed YAML document; raises BadInput with `source: path: problem`."""
    if not isinstance(raw, dict):
        raise BadInput(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    # The alias `pass` keeps the user's spelling in messages.
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(f"{source}: {validation_message(exc)}") from None

    from compress.passes import get_pass, pass_names

    for index, stage in enumerate(recipe.stages):
        try:
            spec = get_pass(stage.pass_name)
        except KeyError:
            known = ", ".join(pass_names())
            raise BadInput(
                f"{source}: stages[{index}].pass: unknown pass {stage.pass_name!r} (known: {known})"
            ) from None
        try:
            spec.config_type.model_validate(stage.params)
        except ValidationError as exc:
            raise BadInput(f"{source}: {validation_message(exc, ('stages', index, 'params'))}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read recipe ({exc.__class__.__name__}: {exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInput(f"{path}: invalid YAML{where}: {problem}") from None
    recipe = parse_recipe(raw, str(path))
    recipe_dir = path.resolve().parent
    from compress.models.pyref import add_recipe_dir  # here: compress.models imports this module

    add_recipe_dir(recipe_dir)  # python: references may name modules beside the recipe
    # Relative paths in a recipe mean "next to the recipe", wherever the user runs it from.
    if recipe.model.checkpoint and not Path(recipe.model.checkpoint).is_absolute():
        candidate = recipe_dir / recipe.model.checkpoint
        if candidate.exists() or not Path(recipe.model.checkpoint).exists():
            recipe.model.checkpoint = str(candidate)
    if recipe.data.dataset.startswith("imagefolder:"):
        folder = recipe.data.dataset.removeprefix("imagefolder:")
        if not Path(folder).is_absolute():
            candidate = recipe_dir / folder
            if candidate.exists() or not Path(folder).exists():
                recipe.data.dataset = f"imagefolder:{candidate}"
    return recipe
