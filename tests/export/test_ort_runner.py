from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import convert_model_to_external_data
from torch import nn

from export.onnx_export import export_onnx
from export.ort_runner import file_size, measure_latencies, measure_latency, ort_session, parity, predict


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export_onnx(SmallNet().eval(), torch.randn(1, 3, 8, 8), tmp_path_factory.mktemp("ort") / "s.onnx")


def test_session_settings(onnx_path: Path) -> None:
    sess = ort_session(onnx_path, threads=1)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    opts = sess.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == __import__("onnxruntime").ExecutionMode.ORT_SEQUENTIAL


def test_predict_batches_and_matches_unbatched(onnx_path: Path) -> None:
    sess = ort_session(onnx_path)
    x = np.random.default_rng(1).standard_normal((10, 3, 8, 8))  # float64 on purpose: predict casts
    whole = predict(sess, x, batch_size=256)
    chunked = predict(sess, x, batch_size=3)  # 3+3+3+1: also exercises a ragged last batch
    assert whole.shape == (10, 5) and whole.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    assert predict(sess, x[:0]).shape == (0, 5)
    with pytest.raises(ValueError):
        predict(sess, x, batch_size=0)


def test_parity_on_hand_made_arrays() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]], dtype=np.float32)
    got = ref.copy()
    got[0, 0] += 0.5  # argmax unchanged
    got[1, 2] += 2.5  # argmax 0 -> 2
    got[3, 1] -= 1.0  # argmax unchanged
    p = parity(ref, got)
    assert set(p) == {"max_abs_diff", "mean_abs_diff", "top1_agreement"}
    assert all(type(v) is float for v in p.values())
    assert p["max_abs_diff"] == pytest.approx(2.5)
    assert p["mean_abs_diff"] == pytest.approx((0.5 + 2.5 + 1.0) / 12)
    assert p["top1_agreement"] == pytest.approx(0.75)
    assert parity(ref, ref) == {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "top1_agreement": 1.0}


def test_parity_non_finite_and_bad_shapes() -> None:
    ref = np.zeros((2, 3), dtype=np.float32)
    got = ref.copy()
    got[1, 1] = np.nan
    p = parity(ref, got)
    assert p["max_abs_diff"] == math.inf and p["mean_abs_diff"] == math.inf
    with pytest.raises(ValueError):
        parity(ref, np.zeros((3, 3)))


def test_measure_latency_reports_positive_finite_times(onnx_path: Path) -> None:
    sess = ort_session(onnx_path, threads=1)
    r = measure_latency(sess, (3, 8, 8), batch_sizes=(1, 64), warmup=1, runs=3)
    assert set(r) == {"batch1", "batch1_p90", "batch64", "batch64_p90", "runs", "rounds", "threads"}
    for key in ("batch1", "batch1_p90", "batch64", "batch64_p90"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0
    assert r["batch1_p90"] >= r["batch1"] and r["batch64_p90"] >= r["batch64"]
    assert r["runs"] == 3
    assert r["threads"] == 1  # read back from the session when not given
    assert measure_latency(sess, (3, 8, 8), batch_sizes=(1,), warmup=0, runs=1, threads=4)["threads"] == 4


def test_file_size_counts_external_data(onnx_path: Path, tmp_path: Path) -> None:
    assert file_size(onnx_path) == onnx_path.stat().st_size
    model = onnx.load(str(onnx_path))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, str(ext))
    data = tmp_path / "ext.onnx.data"
    assert data.is_file()
    assert file_size(ext) == ext.stat().st_size + data.stat().st_size


def test_measure_latencies_times_every_file_in_alternating_rounds(onnx_path: Path) -> None:
    sessions = {"a": ort_session(onnx_path, threads=1), "b": ort_session(onnx_path, threads=1)}
    timings = measure_latencies(sessions, (3, 8, 8), batch_sizes=(1, 8), warmup=1, runs=6, rounds=3)
    assert set(timings) == {"a", "b"}
    for timing in timings.values():
        assert timing["rounds"] == 3 and timing["runs"] == 6
        assert 0 < timing["batch1"] <= timing["batch1_p90"] and 0 < timing["batch8"] <= timing["batch8_p90"]
    # more rounds than runs: as many rounds as runs, none empty
    assert measure_latencies(sessions, (3, 8, 8), batch_sizes=(1,), warmup=0, runs=2, rounds=5)["a"]["rounds"] == 2
    with pytest.raises(ValueError, match="rounds"):
        measure_latencies(sessions, (3, 8, 8), runs=2, rounds=0)
