"""ONNX Runtime (CPU) inference, torch-vs-ONNX parity and latency for exported models."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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


def predict(session: ort.InferenceSession, inputs: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Float32 logits for ``inputs`` (batch on axis 0), run ``batch_size`` samples at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = np.ascontiguousarray(inputs, dtype=input_dtype(session))
    in_name = session.get_inputs()[0].name
    out_meta = session.get_outputs()[0]
    if len(x) == 0:
        # Conv kernels are not guaranteed to accept an empty batch, so answer from metadata.
        tail = out_meta.shape[1:]
        if all(isinstance(d, int) for d in tail):
            return np.empty((0, *tail), dtype=np.float32)
        raise ValueError("predict needs at least one sample: the output shape is not static")
    chunks = [
        session.run([out_meta.name], {in_name: x[i : i + batch_size]})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)


def input_dtype(session: ort.InferenceSession) -> type[np.floating]:
    """float16 for a model exported with fp16 inputs (onnx.io_fp16), else float32."""
    return np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32


def parity(reference_logits: np.ndarray, onnx_logits: np.ndarray) -> dict[str, float]:
    """How closely ONNX logits match the reference (torch) logits for the same inputs.

    A NaN/inf on either side counts as an infinite difference so that any
    ``max_abs_diff < tol`` gate fails rather than comparing against NaN.
    """
    ref = np.asarray(reference_logits, dtype=np.float64)
    got = np.asarray(onnx_logits, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape} vs onnx {got.shape}")
    if ref.size == 0:
        raise ValueError("parity needs at least one logit")
    if ref.ndim == 1:
        ref, got = ref[None, :], got[None, :]
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(ref - got)
    diff[~np.isfinite(diff)] = np.inf
    top1 = np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float(top1.mean()),
    }


def measure_latency(
    session: ort.InferenceSession,
    sample_shape: tuple[int, ...],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = None,
) -> dict[str, float | int | None]:
    """Median and p90 wall time (ms) of ``session.run`` per batch size.

    ``sample_shape`` is one sample without the batch axis, e.g. (3, 32, 32).
    ``threads`` is only reported (the session's thread count is fixed at creation);
    when None it is read back from the session's options.
    """
    timings = measure_latencies(
        {"file": session}, sample_shape, batch_sizes=batch_sizes, warmup=warmup, runs=runs, rounds=1, threads=threads
    )
    return timings["file"]


def measure_latencies(
    sessions: dict[str, ort.InferenceSession],
    sample_shape: tuple[int, ...],
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
    # Fixed seed: the same input every call, so runs of the CLI time identical work.
    rng = np.random.default_rng(0)
    inputs = {bs: rng.standard_normal((bs, *sample_shape), dtype=np.float32) for bs in batch_sizes}
    per_round = [runs // rounds + (1 if r < runs % rounds else 0) for r in range(rounds)]
    feeds = {
        name: {bs: {session.get_inputs()[0].name: inputs[bs].astype(input_dtype(session))} for bs in batch_sizes}
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
