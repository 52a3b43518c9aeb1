"""The export step of a run: write each requested ONNX file, verify it in ONNX Runtime, gate it.

The exported file is what ships, so it is measured on the test split like a stage, and compared with
the torch model it came from (parity) rather than trusted.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress.atomic import atomic_write_json
from compress.batches import Nested, example_input, stack_samples
from compress.data import DataSplits
from compress.faults import pause_point
from compress.gate import METRIC_TOLERANCE
from compress.progress import RunProgress
from compress.recipe import ExportConfig
from compress.report import ORIGINAL

# ONNX Runtime's fast CPU flavor uses unsigned activations on purpose: not a file for TensorRT, so neither
# linted against TensorRT's rules as a gate nor given a trtexec command.
NOT_FOR_TENSORRT = frozenset({"int8-ort"})


@dataclass
class OriginalModel:
    """The model as the run received it, exported beside the compressed files and measured like them
    (model.original.onnx), so that what the run bought reads off one table against the same runtime.
    torch_outputs: its outputs on the test split, flat by name (compress.batches.flat_outputs)."""

    model: nn.Module
    torch_outputs: dict[str, Tensor]


def export_and_verify(
    model: nn.Module,
    cfg: ExportConfig,
    data: DataSplits,
    out_dir: Path,
    *,
    example: Nested = None,
    test_inputs: Nested = None,
    torch_outputs: dict[str, Tensor],
    score: Callable[[dict[str, Tensor]], float],
    progress: RunProgress,
    original: OriginalModel | None = None,
) -> dict[str, Any]:
    """Write, verify and gate every requested ONNX file (and model.original.onnx with `original`).

    example: a batch of one test sample (compress.batches.example_input of data.test when None), what the
    files are traced from and timed with; test_inputs: every test sample stacked (stack_samples of
    data.test when None), the samples torch_outputs came from; torch_outputs:
    the compressed torch model's outputs on them, flat by name; score: the run's test metric of a flat
    outputs dict (it selects model.output and reads targets or reference outputs itself). Each file's
    outputs, in the file's order, take torch_outputs' names before they are scored.
    """
    from export.errors import ExportError
    from export.lint import lint_onnx
    from export.onnx_export import export_onnx
    from export.ort_runner import file_size, measure_latencies, ort_session, parity, predict_outputs

    example = example_input(data.test) if example is None else example
    test_inputs = stack_samples(data.test) if test_inputs is None else test_inputs
    results: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    writer = _OnnxWriter(model, example, cfg, out_dir)
    files = ([ORIGINAL] if original is not None else []) + list(cfg.onnx.precisions)
    with progress.task("export", len(files) * 2 + 1) as advance, writer:
        for name in files:
            path = out_dir / f"model.{name}.onnx"
            advance(0, f"{name}: torch -> ONNX")
            if name == ORIGINAL:
                assert original is not None
                export_onnx(original.model, example, path, opset=cfg.onnx.opset, dynamic_axes=cfg.onnx.dynamic_axes)
                reference = original.torch_outputs
            else:
                writer.write(name, path)
                reference = torch_outputs
            pause_point(f"exported:{path.name}")
            lint = {"findings": [f.to_dict() for f in lint_onnx(path)], "gates": name not in NOT_FOR_TENSORRT}
            advance(1, f"{name}: accuracy in ONNX Runtime")
            session = sessions[name] = ort_session(path, threads=cfg.verify.threads)
            onnx_outputs = predict_outputs(session, test_inputs)
            if len(onnx_outputs) != len(reference):
                raise ExportError(
                    f"{path.name} has {len(onnx_outputs)} outputs ({', '.join(onnx_outputs)}), the torch model "
                    f"{len(reference)} ({', '.join(k or 'one tensor' for k in reference)})"
                )
            onnx_metric = float(score({k: torch.from_numpy(v) for k, v in zip(reference, onnx_outputs.values())}))
            torch_metric = float(score(reference))
            advance(1)
            drop = torch_metric - onnx_metric
            max_drop = cfg.verify.max_drop
            drop_ok = max_drop is None or drop <= max_drop + METRIC_TOLERANCE
            reasons = [] if drop_ok else [f"drop {drop:.4f} > verify.max_drop {max_drop:.4f}"]
            if lint["gates"] and lint["findings"]:
                first = lint["findings"][0]
                reasons.append(
                    f"lint: {len(lint['findings'])} TensorRT rule finding(s), first {first['node']}: "
                    f"[{first['rule']}] {first['message']}"
                )
            match = parity([t.detach().cpu().numpy() for t in reference.values()], onnx_outputs)
            results[name] = {
                "path": str(Path("export") / path.name),
                "opset": cfg.onnx.opset,
                "metric": onnx_metric,
                "torch_metric": torch_metric,
                "drop": drop,
                "size_bytes": file_size(path),
                "latency_ms": {},
                "parity": match,
                "lint": lint,
                "gate": {"passed": not reasons, "max_drop": max_drop, "reason": "; ".join(reasons) or None},
            }
            agreement = match["top1_agreement"]
            progress.log(
                f"export {name}: test {onnx_metric:.4f} (torch {torch_metric:.4f}), "
                + (f"top-1 agreement {agreement:.4f}" if agreement is not None else f"max |diff| {match['max_abs_diff']:.2e}")
            )
        if cfg.verify.latency:
            # every file timed in alternating rounds after all are written, so the ratios between them
            # (the original against the compressed files above all) do not depend on when each ran
            advance(0, f"latency: {len(sessions)} files in {cfg.verify.latency_rounds} alternating rounds")
            timings = measure_latencies(
                sessions, example, runs=cfg.verify.latency_runs,
                rounds=cfg.verify.latency_rounds, threads=cfg.verify.threads,
            )  # fmt: skip
            for name, timing in timings.items():
                results[name]["latency_ms"] = timing
        advance(1)
    trt_files = [out_dir / f"model.{p}.onnx" for p in cfg.onnx.precisions if p not in NOT_FOR_TENSORRT]
    results["tensorrt"] = tensorrt_entry(trt_files, cfg, out_dir)
    progress.log(f"tensorrt: {_tensorrt_summary(results['tensorrt'])}")
    atomic_write_json(out_dir / "parity.json", {k: v["parity"] for k, v in results.items() if "parity" in v})
    return results


class _OnnxWriter:
    """Writes each precision's file; fp16 is converted from an fp32 export made in this same call (never
    from a file left by an earlier run), kept as model.fp32.onnx when fp32 is requested too."""

    def __init__(self, model: nn.Module, example: Nested, cfg: ExportConfig, out_dir: Path) -> None:
        self.model, self.example, self.cfg = model, example, cfg
        wanted = "fp32" in cfg.onnx.precisions
        self.fp32 = out_dir / ("model.fp32.onnx" if wanted else ".model.fp32-source.onnx")
        self.fp32_written = False

    def __enter__(self) -> _OnnxWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fp32.name.startswith("."):
            self.fp32.unlink(missing_ok=True)

    def _fp32(self) -> Path:
        from export.onnx_export import export_onnx

        if not self.fp32_written:
            onnx = self.cfg.onnx
            export_onnx(self.model, self.example, self.fp32, opset=onnx.opset, dynamic_axes=onnx.dynamic_axes)
            self.fp32_written = True
        return self.fp32

    def write(self, precision: str, path: Path) -> None:
        if precision == "fp32":
            self._fp32()
        elif precision == "fp16":
            from export.fp16 import convert_to_fp16

            convert_to_fp16(self._fp32(), path, io_fp16=self.cfg.onnx.io_fp16)
        elif precision in ("int8-trt", "int8-ort"):
            from compress.atomic import atomic_write_bytes
            from export.qdq import convert_to_int8

            safe = self.cfg.onnx.int8_ort_weights == "safe"
            int8 = convert_to_int8(self._fp32(), precision, saturation_safe=safe)  # type: ignore[arg-type]
            atomic_write_bytes(path, int8.SerializeToString())
        else:
            raise ValueError(f"no ONNX writer for precision {precision!r}")


def tensorrt_entry(onnx_files: list[Path], cfg: ExportConfig, out_dir: Path) -> dict[str, Any]:
    """trtexec.sh and polygraphy.sh for every TensorRT-bound file, always; engines where this machine can.

    Without TensorRT or a GPU the entry says "skipped: <reason>" and passes; a build TensorRT refused fails
    the gate (the file would not deploy), as does `required` when nothing could be built.
    """
    from export.errors import ExportError
    from export.tensorrt import BuildOptions, export_tensorrt

    trt = cfg.tensorrt
    options = BuildOptions(
        batch=trt.batch, workspace_mb=trt.workspace_mb, sparse=trt.sparse_weights, dla_core=trt.dla_core,
        timing_cache=out_dir / "timing.cache",
    )
    skip = "export.tensorrt.build is never" if trt.build == "never" else None
    try:
        entry = export_tensorrt(onnx_files, out_dir, options, skip_reason=skip)
    except ExportError as exc:
        entry = {"skipped": f"cannot prepare TensorRT scripts: {exc}", "engines": {}}
    entry = _relative_to_run(entry, out_dir)
    failures = [f"{name}: {e['reason']}" for name, e in entry["engines"].items() if e["status"] == "failed"]
    if trt.build == "required" and "skipped" in entry:
        failures.append(f"export.tensorrt.build is required but {entry['skipped']}")
    entry["gate"] = {"passed": not failures, "reason": "; ".join(failures) or None}
    return entry


def _relative_to_run(entry: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Paths as the report writes them: relative to the run directory (export/NAME)."""
    def rel(value: str) -> str:
        path = Path(value)
        return str(Path(out_dir.name) / path.name) if path.parent.resolve() == out_dir.resolve() else value

    entry["scripts"] = {k: rel(v) for k, v in entry.get("scripts", {}).items()}
    for engine in entry["engines"].values():
        for key in ("onnx", "engine", "build_log", "layers"):
            if key in engine:
                engine[key] = rel(engine[key])
    return entry


def _tensorrt_summary(entry: dict[str, Any]) -> str:
    if "skipped" in entry:
        return f"engines skipped: {entry['skipped']}; wrote {', '.join(entry['scripts'].values())}"
    return ", ".join(f"{name} {e['status']}" for name, e in entry["engines"].items())
