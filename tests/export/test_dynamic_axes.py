"""Declared dynamic axes beyond the batch axis (export.onnx.dynamic_axes): a small BERT of MiniLM's kind
(recipes/minilm_task.py, random weights from a config) exported with a dynamic sequence axis runs in ONNX
Runtime at other lengths and matches torch, fp32 and fp16; without the declaration the length is fixed."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.errors import BadInput
from export.onnx_export import export_onnx
from export.ort_runner import ort_session, predict_outputs

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from minilm_task import minilm  # noqa: E402

LENGTH = 16  # the example's sequence length
SEQUENCE = {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}}


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1:, length // 2 :] = 0  # padded rows: the mask must still apply at the new length
    return {"input_ids": torch.randint(0, 30522, (batch, length), generator=generator), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return minilm(layers=1, hidden=64)


@pytest.fixture(scope="module")
def files(bert: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The run's export step with the recipe option (original, fp32, fp16 files), and a plain export."""
    from compress.batches import flat_outputs
    from compress.export_stage import OriginalModel, export_and_verify
    from compress.metrics import cosine
    from compress.progress import RunProgress
    from compress.recipe import ExportConfig

    base = tmp_path_factory.mktemp("dynamic")
    cfg = ExportConfig.model_validate({
        "onnx": {"precisions": ["fp32", "fp16"], "dynamic_axes": SEQUENCE}, "tensorrt": {"build": "never"},
        "verify": {"max_drop": 0.01, "latency": False},
    })  # fmt: skip
    example, test_inputs = _tokens(1, LENGTH, 0), _tokens(4, LENGTH, 1)
    with torch.no_grad():
        torch_outputs = flat_outputs(bert(**test_inputs))
    with RunProgress(quiet=True) as progress:
        results = export_and_verify(
            bert, cfg, None, base, example=example, test_inputs=test_inputs, torch_outputs=torch_outputs,
            score=lambda flat: cosine(flat, torch_outputs), progress=progress,
            original=OriginalModel(bert, torch_outputs),
        )  # fmt: skip
    assert all(results[name]["gate"]["passed"] for name in ("original", "fp32", "fp16")), results
    # TensorRT profiles here vary only the batch axis: no script, and the report says why
    assert "dynamic dimension(s) [1]" in results["tensorrt"]["skipped"] and results["tensorrt"]["gate"]["passed"]
    files = {name: base / f"model.{name}.onnx" for name in ("original", "fp32", "fp16")}
    return {**files, "fixed": export_onnx(bert, example, base / "fixed.onnx")}


def _dims(path: Path) -> dict[str, list[str | int]]:
    graph = onnx.load(str(path)).graph
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }


def test_declared_sequence_axis_is_dynamic_and_inputs_stay_int64(files: dict[str, Path]) -> None:
    for name in ("original", "fp32", "fp16"):
        dims = _dims(files[name])
        assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
        assert dims["logits"][0] == "batch"
        graph = onnx.load(str(files[name])).graph
        assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64] * 2


@pytest.mark.parametrize("length", [LENGTH + 23, LENGTH // 2])
def test_fp32_and_fp16_files_match_torch_at_other_lengths(
    bert: torch.nn.Module, files: dict[str, Path], length: int
) -> None:
    tokens = _tokens(3, length, length)
    with torch.no_grad():
        expected = bert(**tokens).numpy()
    got = {name: predict_outputs(ort_session(files[name]), tokens)["logits"] for name in ("fp32", "fp16")}
    assert got["fp32"].shape == expected.shape == (3, 64)
    assert np.abs(got["fp32"] - expected).max() < 1e-5
    assert np.abs(got["fp16"] - expected).max() < 1e-2  # fp16 inside: a few of its steps on unit vectors


def test_without_the_declaration_the_sequence_axis_is_fixed(files: dict[str, Path]) -> None:
    assert _dims(files["fixed"])["input_ids"] == ["batch", LENGTH]
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="input_ids"):
        predict_outputs(ort_session(files["fixed"]), _tokens(2, LENGTH + 1, 0))


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (
            {"input_idz": {1: "sequence"}},
            (
                "'input_idz' is not an input or output of the ONNX file "
                "(inputs: input_ids, attention_mask; outputs: logits)"
            ),
        ),
        ({"attention_mask": {2: "sequence"}}, "attention_mask: axis 2 is out of range for a tensor of rank 2"),
        ({"logits": {0: "rows"}}, "logits: axis 0 is out of range"),
        ({"input_ids": {1: "batch"}}, "input_ids: axis 1: the label 'batch' is axis 0's"),
    ],
)
def test_bad_declarations_are_one_line_and_write_nothing(
    bert: torch.nn.Module, tmp_path: Path, declared: dict, expected: str
) -> None:
    with pytest.raises(BadInput) as info:
        export_onnx(bert, _tokens(1, LENGTH, 0), tmp_path / "m.onnx", dynamic_axes=declared)
    assert str(info.value).startswith(f"dynamic_axes: {expected}")
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
