"""ONNX Runtime (CPU) inference, torch-vs-ONNX parity and latency for exported models.

Inputs and outputs of any structure (compress/batches.py): a lone tensor, a tuple/list or a dict of them;
files have one ONNX input per leaf (input_leaves names them) and one output per output tensor.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnx


def ort_session(path: str | Path, *, threads: int = 2) -> ort.InferenceSession:
    """CPU session tuned for repeatable latency numbers rather than peak throughput."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    # One inter-op thread and sequential execution: CNN graphs are chains, and parallel
    # node scheduling only adds jitter to the latency measurement.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Errors only: ORT's optimizer warnings go straight to fd 2 and break the CLI display.
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# The name of a lone input (export/onnx_export.py names the inputs it writes with input_leaves).
INPUT_NAME = "input"
_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}  # fmt: skip


def input_leaves(inputs: Any) -> list[tuple[str, Any]]:
    """(ONNX input name, array or tensor) for every leaf of a sample or batch, in order: "input" for a lone
    tensor, "input_0", "input_1" for a tuple/list, the keys for a dict, nested names joined by "_".

    The walk is compress.batches.leaves' (dicts in key order, sequences in order, None left out), written
    here over any leaf type because this module runs where torch is not installed.
    """
    if not isinstance(inputs, (Mapping, tuple, list)):
        return [(INPUT_NAME, inputs)]

    def walk(obj: Any, path: str) -> list[tuple[str, Any]]:
        if obj is None:
            return []
        if not isinstance(obj, (Mapping, tuple, list)):
            return [(path, obj)]
        items = obj.items() if isinstance(obj, Mapping) else enumerate(obj)
        return [leaf for key, value in items for leaf in walk(value, f"{path}_{key}" if path else str(key))]

    return walk(inputs, "" if isinstance(inputs, Mapping) else INPUT_NAME)


def _array(value: Any) -> np.ndarray:
    """A numpy array of a numpy or torch leaf (torch tensors by duck typing: this module imports no torch)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _feed_arrays(session: ort.InferenceSession, inputs: Any) -> dict[str, np.ndarray]:
    """Every session input's array from ``inputs`` (a Nested sample or batch), cast to its declared type.

    Inputs are matched by name (input_leaves' names, which export_onnx gives them; an input the exporter
    dropped because the graph does not use it is simply not fed) and otherwise by position, for files
    named elsewhere (one input called "x", say) when the counts agree.
    """
    found = input_leaves(inputs)
    declared = session.get_inputs()
    by_name = dict(found)
    if all(meta.name in by_name for meta in declared):
        chosen = [by_name[meta.name] for meta in declared]
    elif len(found) == len(declared):
        chosen = [value for _, value in found]
    else:
        raise ValueError(
            f"the ONNX file takes inputs {', '.join(m.name for m in declared)}; the data gives "
            f"{', '.join(name for name, _ in found)}"
        )
    feed = {}
    for meta, value in zip(declared, chosen):
        dtype = _NUMPY_TYPES.get(meta.type)
        array = _array(value)
        feed[meta.name] = np.ascontiguousarray(array, dtype=dtype) if dtype is not None else array
    return feed


def predict_outputs(session: ort.InferenceSession, inputs: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every output of the file, by its ONNX name in the session's order, for ``inputs``: a Nested batch
    (numpy or torch leaves, batch on axis 0 of each) shaped like the example the file was exported from.

    Runs ``batch_size`` samples at a time. Floats are fed in the file's float type (fp16 for io_fp16
    files) and integers in the declared integer type; float outputs come back as float32, others as
    they are.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    feed = _feed_arrays(session, inputs)
    outputs = session.get_outputs()
    count = len(next(iter(feed.values()))) if feed else 0
    if count == 0:
        # Conv kernels are not guaranteed to accept an empty batch, so answer from metadata.
        empty = {}
        for meta in outputs:
            tail = meta.shape[1:]
            if not all(isinstance(d, int) for d in tail):
                raise ValueError("predict needs at least one sample: the output shape is not static")
            empty[meta.name] = np.empty((0, *tail), dtype=_NUMPY_TYPES.get(meta.type, np.float32))
        return {name: _float32(array) for name, array in empty.items()}
    names = [meta.name for meta in outputs]
    chunks = [
        session.run(names, {name: array[i : i + batch_size] for name, array in feed.items()})
        for i in range(0, count, batch_size)
    ]
    return {name: _float32(np.concatenate([c[k] for c in chunks], axis=0)) for k, name in enumerate(names)}


def _float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False) if np.issubdtype(array.dtype, np.floating) else array


def predict(session: ort.InferenceSession, inputs: Any, *, batch_size: int = 256) -> np.ndarray:
    """The output of a single-output file (an image classifier's logits): predict_outputs' only array."""
    outputs = predict_outputs(session, inputs, batch_size=batch_size)
    if len(outputs) != 1:
        raise ValueError(f"predict reads one output; the file has {', '.join(outputs)}: use predict_outputs")
    return next(iter(outputs.values()))


def class_axis(ndim: int) -> int:
    """The class axis of an output of ``ndim`` dimensions: compress.metrics.class_axis's rule (axis 1
    of [N, C] and [N, C, H, W], the last of [N, L, C])."""
    return -1 if ndim == 3 else 1


def _named_arrays(outputs: Any, fallback: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    if isinstance(outputs, Mapping):
        return [(str(k), np.asarray(v)) for k, v in outputs.items()]
    if isinstance(outputs, (list, tuple)):
        names = [f"output_{i}" for i in range(len(outputs))]
        if fallback is not None and len(fallback) == len(outputs):
            names = list(fallback)
        return list(zip(names, (np.asarray(v) for v in outputs)))
    return [("logits", np.asarray(outputs))]


def _parity_of(ref: np.ndarray, got: np.ndarray, name: str) -> dict[str, float | None]:
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"output {name}: shapes differ: reference {ref.shape} vs onnx {got.shape}")
    if ref.size == 0:
        raise ValueError(f"output {name}: parity needs at least one value")
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(ref - got)
    diff[~np.isfinite(diff)] = np.inf
    agreement = None
    if ref.ndim >= 2:
        axis = class_axis(ref.ndim)
        agreement = float((np.argmax(ref, axis=axis) == np.argmax(got, axis=axis)).mean())
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "top1_agreement": agreement}


def parity(reference: Any, onnx_outputs: Any) -> dict[str, Any]:
    """How closely the ONNX outputs match the reference (torch) outputs for the same inputs.

    Each side is one array, or a list or dict of arrays in the file's output order (paired by position;
    named by the dict's keys, ONNX's side first). Per output: max and mean absolute difference and, for
    outputs of 2 or more dimensions, the share of positions whose arg-max on the class axis agrees. The
    result's max_abs_diff is the worst output's, mean_abs_diff the outputs' mean, top1_agreement the
    first output's (None when it has under 2 dimensions); with several outputs each one's numbers are
    under "outputs" by name. A NaN/inf on either side counts as an infinite difference so that any
    ``max_abs_diff < tol`` gate fails rather than comparing against NaN.
    """
    got = _named_arrays(onnx_outputs)
    ref = _named_arrays(reference, [name for name, _ in got])
    if len(ref) != len(got):
        raise ValueError(f"the reference has {len(ref)} outputs, the ONNX file {len(got)}")
    if not got:
        raise ValueError("parity needs at least one output")
    names = [n for n, _ in got] if isinstance(onnx_outputs, Mapping) else [n for n, _ in ref]
    if len(got) == 1 and ref[0][1].ndim == 1 and got[0][1].ndim == 1 and not isinstance(onnx_outputs, Mapping):
        # one row of logits given without its batch axis (the original single-output form)
        ref, got = [(ref[0][0], ref[0][1][None, :])], [(got[0][0], got[0][1][None, :])]
    each = {name: _parity_of(r, g, name) for name, (_, r), (_, g) in zip(names, ref, got)}
    first = next(iter(each.values()))
    result: dict[str, Any] = {
        "max_abs_diff": max(e["max_abs_diff"] for e in each.values()),
        "mean_abs_diff": float(np.mean([e["mean_abs_diff"] for e in each.values()])),
        "top1_agreement": first["top1_agreement"],
    }
    if len(each) > 1:
        result["outputs"] = each
    return result


def _example_arrays(example: Any) -> Any:
    """A batch-of-one sample as numpy leaves in the same structure; a tuple of ints is the older
    ``sample_shape`` form (one float sample of that shape, drawn with a fixed seed)."""
    if isinstance(example, tuple) and example and all(isinstance(d, int) for d in example):
        return np.random.default_rng(0).standard_normal((1, *example), dtype=np.float32)
    if isinstance(example, Mapping):
        return {k: _example_arrays(v) for k, v in example.items() if v is not None}
    if isinstance(example, (tuple, list)):
        return type(example)(_example_arrays(v) for v in example)
    array = _array(example)
    if array.ndim == 0:
        raise ValueError("the latency example needs a batch axis (a batch of one sample)")
    return array[:1]


def measure_latency(
    session: ort.InferenceSession,
    example: Any,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = None,
) -> dict[str, float | int | None]:
    """Median and p90 wall time (ms) of ``session.run`` per batch size.

    ``example`` is a batch of one sample in the structure the file takes (tensor, tuple/list or dict of
    numpy or torch leaves; int64 token ids too); each batch size repeats it along axis 0. A tuple of ints,
    e.g. (3, 32, 32), still means one float sample of that shape.
    ``threads`` is only reported (the session's thread count is fixed at creation);
    when None it is read back from the session's options.
    """
    timings = measure_latencies(
        {"file": session}, example, batch_sizes=batch_sizes, warmup=warmup, runs=runs, rounds=1, threads=threads
    )
    return timings["file"]


def measure_latencies(
    sessions: dict[str, ort.InferenceSession],
    example: Any,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 5,
    threads: int | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """measure_latency for several files at once, in `rounds` alternating rounds.

    Each file first gets `warmup` untimed runs per batch size; then each round times every file in turn
    (one untimed run, then runs / rounds timed ones per batch size), and each file's median and p90 are
    taken over all its timed runs: load that drifts while the files are timed (a shared machine, a CPU
    changing clock) hits every file alike, where timing one file after the other would charge it to
    whichever ran then. Ratios between the files are what travels.
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"need runs >= 1, rounds >= 1 and warmup >= 0, got {runs=}, {rounds=}, {warmup=}")
    rounds = min(rounds, runs)
    # The same input every call (the example, or a fixed-seed draw), so runs of the CLI time identical work.
    one = _example_arrays(example)
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    feeds = {
        name: {bs: _feed_arrays(session, _repeat(one, bs)) for bs in batch_sizes}
        for name, session in sessions.items()
    }
    for name, session in sessions.items():
        for feed in feeds[name].values():
            for _ in range(warmup):
                session.run(None, feed)
    times_ms: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batch_sizes} for name in sessions}
    for count in per_round:
        for name, session in sessions.items():
            for bs, feed in feeds[name].items():
                session.run(None, feed)  # caches refilled after the other files ran
                for _ in range(count):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times_ms[name][bs].append((time.perf_counter() - start) * 1000.0)
    results: dict[str, dict[str, float | int | None]] = {}
    for name, session in sessions.items():
        result: dict[str, float | int | None] = {}
        for bs in batch_sizes:
            result[f"batch{bs}"] = float(np.median(times_ms[name][bs]))
            result[f"batch{bs}_p90"] = float(np.percentile(times_ms[name][bs], 90))
        result["runs"] = runs
        result["rounds"] = rounds
        result["threads"] = threads if threads is not None else session.get_session_options().intra_op_num_threads
        results[name] = result
    return results


def _repeat(one: Any, batch: int) -> Any:
    if isinstance(one, Mapping):
        return {k: _repeat(v, batch) for k, v in one.items()}
    if isinstance(one, (tuple, list)):
        return type(one)(_repeat(v, batch) for v in one)
    return np.repeat(one, batch, axis=0)


def file_size(path: str | Path) -> int:
    """Bytes on disk for the model: the .onnx file plus any external-data files it uses."""
    path = Path(path)
    files = {path.resolve()}
    sidecar = path.with_name(path.name + ".data")  # torch's dynamo exporter default name
    if sidecar.exists():
        files.add(sidecar.resolve())
    files.update(_external_data_files(path))
    return sum(f.stat().st_size for f in files if f.exists())


def _external_data_files(path: Path) -> set[Path]:
    import onnx
    from onnx.external_data_helper import uses_external_data

    # Headers only: loading the weights just to learn their location would double the cost.
    # A file that is not ONNX (e.g. a TensorRT engine) simply has no external data.
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return set()
    found: set[Path] = set()
    for tensor in _iter_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                found.add((path.parent / entry.value).resolve())
    return found


def _iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)
