"""TensorRT engines from ONNX files, and the trtexec / Polygraphy commands to build and check them on the device.

    python -m export.tensorrt MODEL.onnx [MODEL2.onnx ...] [--out DIR] [--batch MIN,OPT,MAX]
        [--workspace-mb N] [--sparse] [--dla N] [--timing-cache FILE] [--scripts-only] [--require]

Imports no torch (a test checks): this runs on a Jetson that has only tensorrt and onnx. Engines are not
portable across GPUs or TensorRT versions, so the engine's file name carries both, and `trtexec.sh` plus
`polygraphy.sh` are always written next to the ONNX files: a device without our Python tooling can build
and check its own engines with NVIDIA's tools.

Version differences stay behind explicit checks of the TensorRT major version:
  11   strong typing is always on: the network flag is deprecated and ignored, precision flags are gone.
  10   strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED): the ONNX file's own types
       (fp16 tensors, int8 Q/DQ) decide each layer's precision; builder precision flags are deprecated.
  8.6  (JetPack 6.0) no strong typing: explicit batch, and BuilderFlag.INT8 / FP16 from the file's precision.
Without TensorRT or a CUDA GPU the build is "skipped" with the reason, never an exception.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compress.atomic import atomic_write_bytes, atomic_write_text
from export.errors import ExportError

if TYPE_CHECKING:
    import tensorrt as trt

MIN_VERSION = (8, 6)
DEFAULT_BATCH = (1, 1, 64)  # edge inference is latency-bound at batch 1; 64 covers the report's batch-64 runs
TRTEXEC_SCRIPT = "trtexec.sh"
POLYGRAPHY_SCRIPT = "polygraphy.sh"
# Polygraphy compares element-wise; these allow for TF32 in fp32 engines and for int8 rounding that flips
# between kernels. The report's gate is top-1 agreement, measured in ONNX Runtime.
POLYGRAPHY_TOLERANCE = {"fp32": "1e-3", "fp16": "1e-2", "int8": "5e-2"}
# Layers whose weights TensorRT's sparse kernels read, with the weight's input slot.
SPARSE_CANDIDATES = {"Conv": 1, "Gemm": 1, "MatMul": 1}
Precision = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class BuildOptions:
    batch: tuple[int, int, int] = DEFAULT_BATCH
    workspace_mb: int | None = None
    sparse: bool = False
    dla_core: int | None = None
    timing_cache: Path | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What building needs to know about an ONNX file, read without TensorRT."""

    path: Path
    precision: Precision
    has_fp16: bool
    inputs: tuple[tuple[str, tuple[int | None, ...]], ...]  # None only for a dynamic batch (axis 0)
    sparse_eligible: tuple[str, ...]  # layers whose weights hold the 2:4 pattern TensorRT's kernels need
    sparse_candidates: int  # Conv/Gemm/MatMul layers with a constant weight

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".onnx")

    @property
    def tagged_name(self) -> str:
        """The name with the precision in it (model.fp16 stays, a bare `model` becomes model.fp32)."""
        return self.name if self.precision in self.name else f"{self.name}.{self.precision}"


@dataclass(frozen=True)
class Machine:
    tensorrt: str | None
    gpu: str | None
    reason: str | None  # why this machine cannot build engines; None when it can


@dataclass
class BuildResult:
    status: Literal["built", "skipped", "failed"]
    onnx: str
    precision: str
    reason: str | None = None
    engine: str | None = None
    build_log: str | None = None
    layers: str | None = None
    tensorrt: str | None = None
    gpu: str | None = None
    dla_core: int | None = None
    seconds: float | None = None
    size_bytes: int | None = None
    sparsity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- the ONNX side: precision, shapes, 2:4 sparsity ----------------------------------------------------


def inspect_onnx(path: str | Path) -> ModelFacts:
    """Precision, input shapes and 2:4-sparse layers of an ONNX file; ExportError when it cannot be built."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf and onnx raise unrelated types for "not an ONNX model"
        raise ExportError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    eligible, candidates = sparse_24_layers(model)
    precision, has_fp16 = onnx_precision(model)
    return ModelFacts(path, precision, has_fp16, _inputs(model, path), tuple(eligible), candidates)


def onnx_precision(model: onnx.ModelProto) -> tuple[Precision, bool]:
    """("int8" if the graph has Q/DQ, else "fp16" if it computes in fp16, else "fp32"), and whether fp16 is used."""
    graph = model.graph
    has_fp16 = any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
        for n in graph.node
    )
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8", has_fp16
    return ("fp16" if has_fp16 else "fp32"), has_fp16


def _inputs(model: onnx.ModelProto, path: Path) -> tuple[tuple[str, tuple[int | None, ...]], ...]:
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:  # IR < 4 files list weights as inputs too
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
        dynamic = [i for i, d in enumerate(dims) if d is None and i > 0]
        if dynamic:
            raise ExportError(
                f"{path}: input {value.name!r} has dynamic dimension(s) {dynamic}; an engine profile here "
                "varies only the batch (dimension 0), so export with a fixed input size"
            )
        found.append((value.name, dims))
    return tuple(found)


def sparse_24_layers(model: onnx.ModelProto) -> tuple[list[str], int]:
    """Names of Conv/Gemm/MatMul layers whose constant weight holds 2:4 sparsity, and how many were checked.

    The pattern is the one NVIDIA's sparse tensor cores read: at most 2 nonzeros in every 4 consecutive
    values along the reduction (input-channel) axis: a Conv weight [K, C, R, S] along C, a Gemm weight
    along K, a [K, N] MatMul weight along K. compress/sparsity.py makes the same pattern in torch; this
    numpy twin exists because this module must not import torch. Weights are followed through
    DequantizeLinear, Cast and Identity so int8 and fp16 files count too.
    """
    constants = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    eligible: list[str] = []
    candidates = 0
    for index, node in enumerate(model.graph.node):
        slot = SPARSE_CANDIDATES.get(node.op_type)
        if slot is None or len(node.input) <= slot:
            continue
        weight = _constant_through(node.input[slot], constants, producers)
        if weight is None or weight.ndim < 2:
            continue
        candidates += 1
        if _holds_24(weight, _reduction_axis(node, weight.ndim)):
            eligible.append(node.name or f"{node.op_type}#{index}")
    return eligible, candidates


def _constant_through(
    name: str, constants: dict[str, TensorProto], producers: dict[str, onnx.NodeProto], hops: int = 3
) -> np.ndarray | None:
    if name in constants:
        return numpy_helper.to_array(constants[name])
    node = producers.get(name)
    if node is None or hops == 0:
        return None
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        return None if value is None else numpy_helper.to_array(value)
    if node.op_type in ("DequantizeLinear", "Cast", "Identity", "QuantizeLinear"):
        return _constant_through(node.input[0], constants, producers, hops - 1)
    return None


def _reduction_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "MatMul":
        return rank - 2
    return 1  # Conv: [K, C/groups, ...]


def _holds_24(weight: np.ndarray, axis: int) -> bool:
    if weight.shape[axis] % 4:
        return False
    groups = (np.moveaxis(weight, axis, -1) != 0).reshape(-1, 4)
    return bool((groups.sum(axis=1) <= 2).all())


def profile_shapes(
    facts: ModelFacts, batch: tuple[int, int, int]
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shape of every input: the batch axis from ``batch`` where it is dynamic."""
    shapes = {}
    for name, dims in facts.inputs:
        rest = [d or 0 for d in dims[1:]]  # _inputs() let only axis 0 be dynamic
        if dims and dims[0] is None:
            shapes[name] = ([batch[0], *rest], [batch[1], *rest], [batch[2], *rest])
        else:
            static = [d or 0 for d in dims]
            shapes[name] = (static, static, static)
    return shapes


# --- the machine: TensorRT and a GPU ---------------------------------------------------------------------


def probe() -> Machine:
    """Whether this machine can build engines: TensorRT >= 8.6 importable and a CUDA GPU visible."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer itself is missing
        return Machine(None, None, f"TensorRT is not installed on this machine ({type(exc).__name__}: {exc})")
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str) or not hasattr(trt, "Builder"):
        # tensorrt-stubs alone leaves an importable, empty namespace package named tensorrt
        return Machine(None, None, "TensorRT is not installed on this machine (only its type stubs are)")
    if _version_tuple(version)[:2] < MIN_VERSION:
        return Machine(version, None, f"TensorRT {version} is older than 8.6, the oldest this builder supports")
    gpu, why = cuda_gpu_name()
    if gpu is None:
        return Machine(version, None, why)
    return Machine(version, gpu, None)


def unavailable_reason() -> str | None:
    """Why engines cannot be built here, or None when they can."""
    return probe().reason


def cuda_gpu_name(ordinal: int = 0) -> tuple[str | None, str]:
    """The GPU's name from the CUDA driver API (present on every machine with a driver, Jetsons included),
    or None and why not. ctypes rather than a CUDA Python package: a Jetson may have none."""
    for library in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(library)
            break
        except OSError:
            continue
    else:
        return None, "no CUDA driver on this machine (libcuda not found)"
    status = cuda.cuInit(0)
    if status != 0:
        return None, f"the CUDA driver found no usable GPU (cuInit returned {status})"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= ordinal:
        return None, f"no CUDA GPU {ordinal} visible (found {count.value})"
    device = ctypes.c_int(0)
    buffer = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0 or cuda.cuDeviceGetName(buffer, 256, device) != 0:
        return None, f"the CUDA driver could not name GPU {ordinal}"
    return buffer.value.decode(errors="replace"), ""


def _version_tuple(version: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "gpu"


def engine_stem(facts: ModelFacts, tensorrt_version: str, gpu: str, dla_core: int | None = None) -> str:
    """e.g. model.fp16.trt10.13.0.NVIDIA-H100-80GB-HBM3 (trtexec.sh names its engines the same way)."""
    major, minor, patch = _version_tuple(tensorrt_version)
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"{facts.tagged_name}.trt{major}.{minor}.{patch}.{_slug(gpu)}{dla}"


# --- building --------------------------------------------------------------------------------------------


def build_engine(facts: ModelFacts, out_dir: Path, options: BuildOptions, machine: Machine | None = None) -> BuildResult:
    """Build one engine into ``out_dir`` with its build log and layer information (engine inspector JSON).

    Returns status "skipped" (with the reason) where this machine cannot build, "failed" where TensorRT
    refused the model; raises only for programming errors.
    """
    machine = machine or probe()
    result = BuildResult("skipped", str(facts.path), facts.precision, tensorrt=machine.tensorrt, gpu=machine.gpu)
    result.sparsity = {"requested": options.sparse, "eligible": list(facts.sparse_eligible)}
    if machine.reason is not None or machine.tensorrt is None or machine.gpu is None:
        result.reason = machine.reason or "TensorRT or a GPU is missing"
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = engine_stem(facts, machine.tensorrt, machine.gpu, options.dla_core)
    log_path = out_dir / f"{stem}.build.log"
    lines: list[str] = []
    try:
        return _build(facts, out_dir, stem, options, machine, _capture_logger(lines), lines, result)
    except Exception as exc:  # a binding that differs between versions must not end the whole run
        result.status, result.reason = "failed", f"TensorRT raised {type(exc).__name__}: {exc}"
        return result
    finally:
        atomic_write_text(log_path, "\n".join(lines) + "\n")
        result.build_log = str(log_path)


def _build(
    facts: ModelFacts, out_dir: Path, stem: str, options: BuildOptions, machine: Machine, logger: trt.ILogger,
    lines: list[str], result: BuildResult,
) -> BuildResult:
    import tensorrt as trt

    major = _version_tuple(machine.tensorrt or "0")[0]
    result.status = "failed"
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(major))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(facts.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        result.reason = f"the TensorRT ONNX parser rejected {facts.path.name}: {errors or 'no error given'}"
        return result

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the engine inspector shows layer details
    if options.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if major < 10:
        # 8.6 has no strong typing: without these flags it would build int8 Q/DQ or fp16 files in fp32
        if facts.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        if facts.has_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    shapes = profile_shapes(facts, options.batch)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            result.reason = f"TensorRT sees an input {tensor.name!r} that the ONNX graph does not list"
            return result
        lo, opt, hi = shapes[tensor.name]
        profile.set_shape(tensor.name, trt.Dims(lo), trt.Dims(opt), trt.Dims(hi))
    config.add_optimization_profile(profile)
    sparse = options.sparse and bool(facts.sparse_eligible)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.dla_core is not None:
        if options.dla_core >= builder.num_DLA_cores:
            result.reason = f"no DLA core {options.dla_core} on this device (it has {builder.num_DLA_cores})"
            return result
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU, not an error
    if options.timing_cache is not None:
        _load_timing_cache(config, options.timing_cache)

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    result.seconds = time.perf_counter() - started
    if plan is None:  # the stubs say IHostMemory, but a failed build returns None
        errors = [line for line in lines if line.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        result.reason = f"TensorRT could not build {facts.path.name}: {errors[-1] if errors else 'see the build log'}"
        return result
    data = bytes(memoryview(plan))
    engine_path = out_dir / f"{stem}.engine"
    atomic_write_bytes(engine_path, data)
    if options.timing_cache is not None:
        atomic_write_bytes(options.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    layers_path = out_dir / f"{stem}.layers.json"
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    if engine is not None:
        inspector = engine.create_engine_inspector()
        atomic_write_text(layers_path, inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        result.layers = str(layers_path)
    result.status, result.reason = "built", None
    result.engine, result.size_bytes = str(engine_path), len(data)
    result.dla_core = options.dla_core
    result.sparsity.update(enabled=sparse, **_sparsity_from_log(lines))
    return result


def _network_flags(major: int) -> int:
    import tensorrt as trt

    if major >= 11:  # always strongly typed; the flag is deprecated, ignored, and may be removed
        return 0
    if major >= 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # 8.6: the ONNX parser needs it


def _capture_logger(lines: list[str]) -> trt.ILogger:
    """A TensorRT logger that appends INFO and worse to ``lines`` for the build log (VERBOSE runs to megabytes)."""
    import tensorrt as trt

    class CaptureLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.INFO):
                lines.append(f"[{severity.name}] {msg}")

    return CaptureLogger()


def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    # A cache from another GPU or TensorRT version is refused: start empty rather than mix timings.
    if not config.set_timing_cache(cache, False):
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _sparsity_from_log(lines: Sequence[str]) -> dict[str, list[str]]:
    """TensorRT logs (at INFO) which layers were eligible for sparse kernels and which it picked."""
    found: dict[str, list[str]] = {}
    for line in lines:
        if "(Sparsity)" not in line or ":" not in line:
            continue
        names = [n.strip() for n in line.rsplit(":", 1)[1].split(",") if n.strip()]
        key = "picked" if "picked" in line else "trt_eligible" if "eligible" in line else None
        if key:
            found.setdefault(key, []).extend(names)
    return found


# --- scripts for the device ------------------------------------------------------------------------------

_SCRIPT_HEAD = """\
#!/usr/bin/env bash
# {what}
# Written by export/tensorrt.py; run it on the device that will run the engines.
#   ./{script}                 every model below
#   ./{script} {example}   only the named ones
set -euo pipefail
cd "$(dirname "$0")"
selected() {{  # NAME ARGS...: true when ARGS is empty or names NAME
  local name=$1; shift
  [ $# -eq 0 ] && return 0
  for wanted in "$@"; do [ "$wanted" = "$name" ] && return 0; done
  return 1
}}
"""

_TRTEXEC_SETUP = """\
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"  # JetPack's location
banner=$("$TRTEXEC" --help 2>&1 || true)
num=$(printf '%s\\n' "$banner" | sed -n 's/.*TensorRT v\\([0-9][0-9]*\\).*/\\1/p' | head -n 1)
if [ -z "$num" ]; then echo "trtexec.sh: cannot run $TRTEXEC; set TRTEXEC=/path/to/trtexec" >&2; exit 2; fi
# The banner encodes 8.6.1 as 8601 and 10.13.0 as 101300.
if [ "$num" -ge 100000 ]; then version="$((num / 10000)).$((num / 100 % 100)).$((num % 100))"
else version="$((num / 1000)).$((num / 100 % 10)).$((num % 100))"; fi
# TensorRT 10 builds strongly typed (the ONNX file's types decide); 11 always does; 8.6 needs precision flags.
case "$banner" in *--stronglyTyped*) typed=strong ;; *) typed=weak ;; esac
gpu=$(python3 -c 'import ctypes as c; l = c.CDLL("libcuda.so.1"); l.cuInit(0); d = c.c_int(); \
l.cuDeviceGet(c.byref(d), 0); b = c.create_string_buffer(256); l.cuDeviceGetName(b, 256, d); print(b.value.decode())' \
  2>/dev/null || echo gpu)
gpu=$(printf '%s' "$gpu" | tr -cs 'A-Za-z0-9.' '-' | sed 's/^-*//; s/-*$//')
"""

_POLYGRAPHY_SETUP = """\
# Needs polygraphy, tensorrt and onnxruntime in python3. Tolerances are element-wise on every output.
major=$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])')
if [ "$major" -ge 10 ]; then typed=strong; else typed=weak; fi
"""


def _weak_flags(facts: ModelFacts) -> str:
    """8.6's precision flags (trtexec and Polygraphy spell them alike)."""
    flags = []
    if facts.precision == "int8":
        flags.append("--int8")
    if facts.has_fp16:
        flags.append("--fp16")
    return " ".join(flags)


def _relative(path: Path, out_dir: Path) -> str:
    return shlex.quote(os.path.relpath(path.resolve(), out_dir.resolve()))


def trtexec_script(models: Sequence[ModelFacts], out_dir: Path, options: BuildOptions) -> str:
    """A bash script that builds every model with trtexec, as build_engine() would (same engine names)."""
    parts = [
        _SCRIPT_HEAD.format(
            what="TensorRT engines for the ONNX files here, built with trtexec (engines are not portable "
            "across GPUs or TensorRT versions).\n# TRTEXEC=/path/to/trtexec overrides where trtexec is.",
            script=TRTEXEC_SCRIPT, example=models[0].name if models else "model.fp32",
        ),
        _TRTEXEC_SETUP,
    ]
    for facts in models:
        shapes = profile_shapes(facts, options.batch)
        dims = [",".join(f"{name}:{'x'.join(map(str, s[k]))}" for name, s in shapes.items()) for k in range(3)]
        dla = f".dla{options.dla_core}" if options.dla_core is not None else ""
        args = [
            f"--onnx={_relative(facts.path, out_dir)}",
            '--saveEngine="$name.engine"',
            f"--minShapes={shlex.quote(dims[0])}",
            f"--optShapes={shlex.quote(dims[1])}",
            f"--maxShapes={shlex.quote(dims[2])}",
        ]
        if options.workspace_mb is not None:
            args.append(f"--memPoolSize=workspace:{options.workspace_mb}")  # MiB
        if options.timing_cache is not None:
            args.append(f"--timingCacheFile={_relative(options.timing_cache, out_dir)}")
        comments = [f"# {facts.name}: {facts.precision}, 2:4-sparse layers: {len(facts.sparse_eligible)} of "
                    f"{facts.sparse_candidates}"]
        if options.sparse and facts.sparse_eligible:
            args.append("--sparsity=enable")
        elif options.sparse:
            comments.append("# --sparsity=enable left out: no layer carries 2:4 sparsity")
        if options.dla_core is not None:
            args += [f"--useDLACore={options.dla_core}", "--allowGPUFallback"]
        args += ["--profilingVerbosity=detailed", '--exportLayerInfo="$name.layers.json"', "--skipInference"]
        weak = _weak_flags(facts)
        body = " \\\n    ".join(args)
        parts.append(
            "\n".join(comments) + "\n"
            f"if selected {shlex.quote(facts.name)} \"$@\"; then\n"
            f"  name=\"{facts.tagged_name}.trt$version.$gpu{dla}\"\n"
            f"  if [ \"$typed\" = strong ]; then precision=--stronglyTyped; else precision=\"{weak}\"; fi\n"
            f"  \"$TRTEXEC\" {body} \\\n    $precision 2>&1 | tee \"$name.build.log\"\n"
            "  echo \"built $name.engine\"\n"
            "fi\n"
        )
    return "\n".join(parts)


def polygraphy_script(models: Sequence[ModelFacts], out_dir: Path, options: BuildOptions) -> str:
    """A bash script that checks TensorRT against ONNX Runtime with `polygraphy run --trt --onnxrt`."""
    parts = [
        _SCRIPT_HEAD.format(
            what="Parity of TensorRT with ONNX Runtime for the ONNX files here (polygraphy run --trt --onnxrt).",
            script=POLYGRAPHY_SCRIPT, example=models[0].name if models else "model.fp32",
        ),
        _POLYGRAPHY_SETUP,
    ]
    for facts in models:
        shapes = profile_shapes(facts, options.batch)
        dims = [" ".join(f"{name}:[{','.join(map(str, s[k]))}]" for name, s in shapes.items()) for k in range(3)]
        tolerance = POLYGRAPHY_TOLERANCE[facts.precision]
        args = [
            f"polygraphy run {_relative(facts.path, out_dir)} --trt --onnxrt $precision",
            f"--trt-min-shapes {shlex.quote(dims[0])} --trt-opt-shapes {shlex.quote(dims[1])} "
            f"--trt-max-shapes {shlex.quote(dims[2])}",
            f"--input-shapes {shlex.quote(dims[2])}",
        ]
        if options.workspace_mb is not None:
            args.append(f"--pool-limit workspace:{options.workspace_mb << 20}")
        if options.sparse and facts.sparse_eligible:
            args.append("--sparse-weights")
        if options.dla_core is not None:
            args.append("--use-dla --allow-gpu-fallback")
        args.append(f"--atol {tolerance} --rtol {tolerance}")
        body = " \\\n    ".join(args)
        parts.append(
            f"if selected {shlex.quote(facts.name)} \"$@\"; then\n"
            f"  if [ \"$typed\" = strong ]; then precision=--strongly-typed; "
            f"else precision=\"{_weak_flags(facts)}\"; fi\n"
            f"  {body}\n"
            "fi\n"
        )
    return "\n".join(parts)


def write_scripts(models: Sequence[ModelFacts], out_dir: Path, options: BuildOptions) -> dict[str, str]:
    """Write trtexec.sh and polygraphy.sh (executable) into ``out_dir``; returns their paths."""
    written = {}
    for key, script, text in (
        ("trtexec", TRTEXEC_SCRIPT, trtexec_script(models, out_dir, options)),
        ("polygraphy", POLYGRAPHY_SCRIPT, polygraphy_script(models, out_dir, options)),
    ):
        path = out_dir / script
        atomic_write_text(path, text)
        path.chmod(0o755)
        written[key] = str(path)
    return written


def export_tensorrt(
    onnx_paths: Sequence[str | Path], out_dir: str | Path, options: BuildOptions, *, skip_reason: str | None = None
) -> dict[str, Any]:
    """Scripts for every file, then an engine for each where this machine can build one.

    Returns {"scripts": {...}, "engines": {name: BuildResult dict}} plus "skipped": reason when no engine
    was attempted (``skip_reason`` when given, else why this machine cannot build). Raises ExportError
    for a file that is missing or cannot be profiled.
    """
    out = Path(out_dir)
    models = [inspect_onnx(p) for p in onnx_paths]
    report: dict[str, Any] = {"scripts": write_scripts(models, out, options), "engines": {}}
    machine = probe() if skip_reason is None else None
    if machine is None or machine.reason is not None:
        report["skipped"] = machine.reason if machine is not None else skip_reason
        for facts in models:
            skipped = BuildResult("skipped", str(facts.path), facts.precision, reason=report["skipped"])
            skipped.sparsity = {"requested": options.sparse, "eligible": list(facts.sparse_eligible)}
            report["engines"][facts.name] = skipped.to_dict()
        return report
    for facts in models:
        report["engines"][facts.name] = build_engine(facts, out, options, machine).to_dict()
    return report


# --- command line ----------------------------------------------------------------------------------------


def _batch(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}") from None
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return values[0], values[1], values[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export.tensorrt",
        description="Build TensorRT engines from ONNX files (needs tensorrt and a GPU), and always write "
        "trtexec.sh and polygraphy.sh to build and check them on the device.",
    )
    parser.add_argument("onnx", nargs="+", type=Path, help="ONNX file(s)")
    parser.add_argument("--out", type=Path, help="output directory (default: the first file's directory)")
    parser.add_argument("--batch", type=_batch, default=DEFAULT_BATCH, help="MIN,OPT,MAX batch of the profile")
    parser.add_argument("--workspace-mb", type=int, help="workspace memory limit in MiB")
    parser.add_argument("--sparse", action="store_true", help="SPARSE_WEIGHTS where layers carry 2:4 sparsity")
    parser.add_argument("--dla", type=int, metavar="N", help="build for DLA core N, GPU fallback on")
    parser.add_argument("--timing-cache", type=Path, help="timing cache to reuse and update (default: OUT/timing.cache)")
    parser.add_argument("--scripts-only", action="store_true", help="write the scripts, build nothing")
    parser.add_argument("--require", action="store_true", help="exit 2 when no engine can be built here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 written (engines built, or skipped with the reason printed), 1 a build failed,
    2 bad input (or --require and nothing can be built here)."""
    args = _parser().parse_args(argv)
    out = args.out or args.onnx[0].parent
    if args.workspace_mb is not None and args.workspace_mb < 1:
        print("error: --workspace-mb must be >= 1", file=sys.stderr)
        return 2
    options = BuildOptions(
        batch=args.batch, workspace_mb=args.workspace_mb, sparse=args.sparse, dla_core=args.dla,
        timing_cache=args.timing_cache or out / "timing.cache",
    )
    try:
        report = export_tensorrt(args.onnx, out, options, skip_reason="--scripts-only" if args.scripts_only else None)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report['scripts']['trtexec']} and {report['scripts']['polygraphy']}")
    failed = False
    for name, entry in report["engines"].items():
        eligible = entry.get("sparsity", {}).get("eligible", [])
        if args.sparse:
            print(f"{name}: 2:4 sparsity in {len(eligible)} layer(s): {', '.join(eligible) or '-'}")
        if entry["status"] == "built":
            print(f"{name}: built {entry['engine']} ({entry['seconds']:.1f} s)")
        elif entry["status"] == "failed":
            failed = True
            print(f"{name}: failed: {entry['reason']}", file=sys.stderr)
    if "skipped" in report:
        print(f"engines skipped: {report['skipped']}")
        if args.require and not args.scripts_only:
            return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
