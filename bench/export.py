"""Exported files of the reference ResNet-20 (mnist5k) in ONNX Runtime on this CPU, side by side with the peer.

    python bench/export.py [--quick] [--iterations 200] [--runs 100] [--bits 8,4]

Rows: fp32 and fp16 of the float model; for each weight width (W8A8, W4A8 by default, AdaRound with 8-bit
activations, both operands of residual adds quantized so ONNX Runtime can run every conv and add on
integers) our int8-trt (signed activations, TensorRT's form) and int8-ort (unsigned activations, the
CPU-fast form) written from the same integers, and int8-ort with int8_ort_weights: signed (8-bit weights
kept signed: faster on x86 without VNNI, where ONNX Runtime's u8 x s8 kernel may saturate); ONNX Runtime's own quantize_static (QDQ, per-channel int8
weights, uint8 activations, MinMax on 1,024 calibration images) as the peer. Columns: test
accuracy, top-1 agreement with the torch model it came from, file size and latency at batch 1 and 64 as
ratios to fp32 (2 threads, all in this one process; every file timed in each of --rounds alternating
rounds of --runs / --rounds runs, the median kept, so drifting load on a shared machine hits all files
alike). The int8-ort vs peer comparison also prints the per-round speed ratio (median and range): the
two files run the same integer kernels, so only many rounds tell a small difference from noise.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import TOP1, ort_quantize_static, reference  # noqa: E402  (sets sys.path)
from compress.batches import flat_outputs, select
from compress.data import dataset_tensors
from compress.export_stage import export_and_verify
from compress.passes import get_pass
from compress.progress import RunProgress
from compress.recipe import ExportConfig
from compress.state import ModelState, StageContext
from compress.train import predict as torch_predict


def export_rows(
    model: torch.nn.Module, data, precisions: list[str], out: Path, ort_weights: str = "safe"
) -> dict[str, Any]:
    cfg = ExportConfig.model_validate(
        {"onnx": {"precisions": precisions, "int8_ort_weights": ort_weights}, "tensorrt": {"build": "never"},
         "verify": {"max_drop": None, "latency": False, "threads": 2}}  # timed later, interleaved
    )  # fmt: skip
    outputs, labels = torch_predict(model, data.test)
    out.mkdir(parents=True, exist_ok=True)
    with RunProgress(quiet=True) as progress:
        return export_and_verify(
            model, cfg, data, out, torch_outputs=flat_outputs(outputs),
            score=lambda flat: TOP1(select(flat, None), labels), progress=progress,
        )  # fmt: skip


def peer_quantize_static(fp32: Path, data, out: Path, torch_logits: np.ndarray) -> dict[str, Any]:
    from export.ort_runner import file_size, ort_session, parity, predict

    path = ort_quantize_static(fp32, data, out / "peer.int8.onnx", unsigned_activations=True)
    x, y = dataset_tensors(data.test)
    session = ort_session(path, threads=2)
    logits = predict(session, x.numpy())
    return {
        "metric": float((logits.argmax(1) == y.numpy()).mean()),
        "parity": parity(torch_logits, logits),
        "size_bytes": file_size(path),
    }


def quantize(model: torch.nn.Module, data, bits: int, iterations: int) -> torch.nn.Module:
    spec = get_pass("quantize.adaround")
    params = {"weight_bits": bits, "activation_bits": 8, "iterations": iterations, "residual_quantizers": "both"}
    ctx = StageContext.standalone(data, seed=0, name="bench-export")
    return spec.apply(ModelState(copy.deepcopy(model)), spec.config_type.model_validate(params), ctx).state.model


ROUNDS = 5
PEER_ROW = "peer: ORT quantize_static W8A8 (u8 act)"


def interleaved_latency(
    files: dict[str, Path], sample_shape: tuple[int, ...], runs: int, rounds: int = ROUNDS
) -> dict[str, list[dict[str, float]]]:
    """Each file's latency per round, over `rounds` rounds that each time every file in turn (runs / rounds
    runs per batch size a round): load that drifts during the bench (a shared machine) hits every file
    alike, where timing one file after another would charge it to whichever ran then."""
    from export.ort_runner import measure_latency, ort_session

    sessions = {name: ort_session(path, threads=2) for name, path in files.items()}
    per_round: dict[str, list[dict]] = {name: [] for name in files}
    for _ in range(rounds):
        for name, session in sessions.items():
            timing = measure_latency(session, sample_shape, warmup=3, runs=max(1, runs // rounds), threads=2)
            per_round[name].append(timing)
    return per_round


def median_latency(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([r[key] for r in rounds])) for key in ("batch1", "batch64")}


def round_ratios(faster: list[dict[str, float]], slower: list[dict[str, float]], key: str) -> str:
    """slower / faster per round (above 1: `faster` is), as median (min-max) over the rounds."""
    ratios = [b[key] / a[key] for a, b in zip(faster, slower)]
    return f"{np.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)"


def row(name: str, entry: dict[str, Any], fp32: dict[str, Any]) -> list[str]:
    lat, base = entry["latency_ms"], fp32["latency_ms"]
    return [
        name,
        f"{100 * entry['metric']:.2f}",
        f"{100 * entry['parity']['top1_agreement']:.2f}",
        f"{entry['size_bytes'] / 1e3:.0f} kB ({entry['size_bytes'] / fp32['size_bytes']:.2f}x)",
        f"{lat['batch1']:.3f} ms ({lat['batch1'] / base['batch1']:.2f}x)",
        f"{lat['batch64']:.2f} ms ({lat['batch64'] / base['batch64']:.2f}x)",
    ]


def print_table(rows: list[list[str]]) -> None:
    header = ["file", "test top-1 %", "agrees w/ torch %", "size (vs fp32)", "batch 1 (vs fp32)", "batch 64 (vs fp32)"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W8A8 only, 50 iterations, 30 latency runs")
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound iterations per layer")
    parser.add_argument("--runs", type=int, default=100, help="latency runs per batch size")
    parser.add_argument("--bits", default="8,4", help="weight widths to quantize to")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating timing rounds")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.runs, args.bits = 50, 30, "8"
    torch.set_num_threads(2)
    model, data, _ = reference("resnet20")
    named: list[tuple[str, dict[str, Any], Path]] = []  # (row name, entry, file) in table order
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        floats = export_rows(model, data, ["fp32", "fp16"], work / "float")
        fp32 = floats["fp32"]
        named += [("fp32", fp32, work / "float" / "model.fp32.onnx"), ("fp16", floats["fp16"], work / "float" / "model.fp16.onnx")]
        torch_logits, _ = torch_predict(model, data.test)
        peer = peer_quantize_static(work / "float" / "model.fp32.onnx", data, work, torch_logits.numpy())
        named.append((PEER_ROW, peer, work / "peer.int8.onnx"))
        results: dict[int, tuple[dict, dict]] = {}
        for bits in (int(b) for b in args.bits.split(",")):
            print(f"quantizing W{bits}A8 with AdaRound ({args.iterations} iterations per layer) ...", flush=True)
            quantized = quantize(model, data, bits, args.iterations)
            ours = export_rows(quantized, data, ["int8-trt", "int8-ort"], work / f"w{bits}")
            signed = export_rows(quantized, data, ["int8-ort"], work / f"w{bits}-signed", "signed")
            for flavor in ("int8-trt", "int8-ort"):
                named.append((f"ours: W{bits}A8 {flavor}", ours[flavor], work / f"w{bits}" / f"model.{flavor}.onnx"))
            named.append((f"ours: W{bits}A8 int8-ort, int8_ort_weights: signed", signed["int8-ort"],
                          work / f"w{bits}-signed" / "model.int8-ort.onnx"))  # fmt: skip
            results[bits] = (ours, signed["int8-ort"])
        print(f"timing {len(named)} files in alternating rounds ...", flush=True)
        rounds = interleaved_latency({name: path for name, _, path in named}, tuple(data.test[0][0].shape),
                                     args.runs, args.rounds)  # fmt: skip
        for name, entry, _ in named:
            entry["latency_ms"] = median_latency(rounds[name])
    rows = [row(name, entry, fp32) for name, entry, _ in named]
    checks: list[str] = []
    for bits, (ours, signed_entry) in results.items():
        for flavor in ("int8-trt", "int8-ort"):
            entry = ours[flavor]
            drop = abs(entry["torch_metric"] - entry["metric"])
            checks.append(
                f"W{bits}A8 {flavor}: agreement {100 * entry['parity']['top1_agreement']:.2f}% (>= 99.5), "
                f"|accuracy - torch| {100 * drop:.2f} pt (<= 0.2), size {entry['size_bytes'] / fp32['size_bytes']:.2f}x "
                f"(<= 0.3), lint findings {len(entry['lint']['findings'])}"
            )
        checks.append(
            f"W{bits}A8 int8-ort (signed weights): agreement {100 * signed_entry['parity']['top1_agreement']:.2f}%, "
            f"batch 64 {fp32['latency_ms']['batch64'] / signed_entry['latency_ms']['batch64']:.2f}x faster than fp32"
        )
        fast, b64 = ours["int8-ort"]["latency_ms"]["batch64"], fp32["latency_ms"]["batch64"]
        ort_rounds, peer_rounds = rounds[f"ours: W{bits}A8 int8-ort"], rounds[PEER_ROW]
        checks.append(
            f"W{bits}A8 int8-ort at batch 64: {b64 / fast:.2f}x faster than fp32, "
            f"{peer['latency_ms']['batch64'] / fast:.2f}x the peer's speed; per round: "
            f"batch 64 {round_ratios(ort_rounds, peer_rounds, 'batch64')}, batch 1 {round_ratios(ort_rounds, peer_rounds, 'batch1')}"
        )
    print(f"\n## Exported ResNet-20 (mnist5k test split, {len(data.test)} images), ONNX Runtime CPU, 2 threads, "
          f"latency: median of {args.rounds} alternating rounds of {max(1, args.runs // args.rounds)} runs")  # fmt: skip
    print_table(rows)
    print()
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
