"""fp16 ONNX: converted from the fp32 export, valid, runs in ONNX Runtime CPU, keeps top-1 parity; and the
run's export step writes, verifies, lints and scripts it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from export.fp16 import convert_to_fp16
from export.onnx_export import export_onnx
from export.ort_runner import measure_latency, ort_session, parity, predict


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.conv(x)))


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded into the conv by the exporter
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return export_onnx(model, torch.randn(1, 1, 12, 12), tmp_path_factory.mktemp("fp16") / "model.fp32.onnx")


def _io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]


def test_fp16_file_is_valid_fp16_inside_fp32_outside(fp32_path: Path, tmp_path: Path) -> None:
    path = convert_to_fp16(fp32_path, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert _io_types(model) == [TensorProto.FLOAT, TensorProto.FLOAT]
    floats = [t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and set(floats) == {TensorProto.FLOAT16}
    assert path.stat().st_size < 0.6 * fp32_path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.fp16.onnx"]  # atomic write, no leftovers


def test_fp16_keeps_top1_parity_in_onnxruntime(fp32_path: Path, tmp_path: Path) -> None:
    path = convert_to_fp16(fp32_path, tmp_path / "model.fp16.onnx")
    x = np.random.default_rng(0).standard_normal((2000, 1, 12, 12)).astype(np.float32)
    reference = predict(ort_session(fp32_path), x)
    got = predict(ort_session(path), x)
    result = parity(reference, got)
    assert result["top1_agreement"] >= 0.999, result
    assert result["max_abs_diff"] < 0.05, result


def test_io_fp16_takes_and_returns_fp16(fp32_path: Path, tmp_path: Path) -> None:
    path = convert_to_fp16(fp32_path, tmp_path / "model.fp16io.onnx", io_fp16=True)
    assert _io_types(onnx.load(str(path))) == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    session = ort_session(path)
    x = np.random.default_rng(1).standard_normal((64, 1, 12, 12)).astype(np.float32)
    got = predict(session, x)  # the runner casts its float32 input to the model's fp16
    assert got.dtype == np.float32
    assert parity(predict(ort_session(fp32_path), x), got)["top1_agreement"] >= 0.98
    assert measure_latency(session, (1, 12, 12), batch_sizes=(1,), warmup=1, runs=2)["batch1"] > 0


def test_unreadable_source_is_an_export_error(tmp_path: Path) -> None:
    from export.errors import ExportError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot convert"):
        convert_to_fp16(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_run_exports_fp16_verified_linted_and_scripted(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    from compress.runner import RunOptions, run_recipe

    tiny_recipe["stages"] = []
    tiny_recipe["export"]["onnx"]["precisions"] = ["fp16", "fp32"]
    tiny_recipe["export"]["verify"]["latency_runs"] = 2
    out = tmp_path / "run"
    report = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    assert report["status"] == "passed"
    fp16 = report["export"]["fp16"]
    assert fp16["parity"]["top1_agreement"] >= 0.999, fp16["parity"]
    assert fp16["gate"]["passed"] and fp16["lint"] == {"findings": [], "gates": True}
    assert fp16["size_bytes"] < 0.6 * report["export"]["fp32"]["size_bytes"]
    trt = report["export"]["tensorrt"]
    assert trt["gate"]["passed"] and trt["scripts"] == {"trtexec": "export/trtexec.sh", "polygraphy": "export/polygraphy.sh"}
    if "skipped" in trt:  # no TensorRT or GPU here
        assert set(trt["engines"]) == {"model.fp16", "model.fp32"}
    script = (out / "export" / "trtexec.sh").read_text()
    assert "--onnx=model.fp16.onnx" in script and "--onnx=model.fp32.onnx" in script
    assert not list((out / "export").glob(".*"))


def test_run_with_only_fp16_leaves_no_fp32_file(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    from compress.runner import RunOptions, run_recipe

    tiny_recipe["stages"] = []
    tiny_recipe["export"] = {"onnx": {"precisions": ["fp16"]}, "verify": {"latency": False},
                             "tensorrt": {"build": "never"}}
    out = tmp_path / "run"
    report = run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    assert set(report["export"]) == {"fp16", "tensorrt"}
    assert report["export"]["tensorrt"]["skipped"] == "export.tensorrt.build is never"
    assert sorted(p.name for p in (out / "export").iterdir()) == [
        "model.fp16.onnx", "parity.json", "polygraphy.sh", "trtexec.sh"
    ]
