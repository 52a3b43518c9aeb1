"""bench/hf.py's table on a small BERT of MiniLM's kind: every row measured against the torch embeddings,
sizes and latencies against the first (fp32) row, and a compress run's int8 files added from its report.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # appended: bench/export.py must not shadow the export package
sys.path.insert(0, str(ROOT / "recipes"))
pytest.importorskip("transformers")

import hf  # noqa: E402
from minilm_task import minilm  # noqa: E402

from export.onnx_export import export_onnx  # noqa: E402


def test_rows_are_measured_against_torch_and_a_runs_int8_files_are_added(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bert = minilm(layers=1, hidden=64)
    generator = torch.Generator().manual_seed(0)
    tokens = {
        "input_ids": torch.randint(0, 30522, (8, 12), generator=generator),
        "attention_mask": torch.ones(8, 12, dtype=torch.int64),
    }
    tokens["attention_mask"][4:, 6:] = 0
    example = {k: v[:1] for k, v in tokens.items()}
    fp32 = export_onnx(bert, example, tmp_path / "model.fp32.onnx", dynamic_axes=hf.SEQUENCE)
    run = tmp_path / "minilm-run"
    (run / "export").mkdir(parents=True)
    quantize_dynamic(str(fp32), str(run / "export" / "model.int8-ort.onnx"), weight_type=QuantType.QInt8)
    export = {
        "fp32": {"path": "export/model.fp32.onnx"},
        "int8-ort": {"path": "export/model.int8-ort.onnx"},
        "tensorrt": {},
    }
    (run / "report.json").write_text(json.dumps({"export": export}))

    with torch.no_grad():
        reference = bert(**tokens).double().numpy()
    comparison = hf.Comparison(hf._numpy(tokens), reference, hf._numpy(example))
    comparison.add("fp32", fp32, 1.0)
    hf.add_compress_run(comparison, run)
    assert [r.name for r in comparison.rows] == ["fp32", "compress int8-ort (minilm-run)"]
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        comparison.add("missing", tmp_path / "absent.onnx")

    comparison.measure(runs=2, rounds=1)
    fp32_row, int8_row = comparison.rows
    assert fp32_row.cosine == pytest.approx(1.0, abs=1e-6) and fp32_row.worst <= fp32_row.cosine
    assert 0.5 < int8_row.cosine < 1 - 1e-6  # int8 weights move the embeddings, a little
    assert all(v > 0 for row in comparison.rows for v in (row.latency or {}).values())
    header, _, *lines = comparison.table()
    assert header.startswith("| file | cosine") and len(lines) == 2
    assert "(1.00x)" in lines[0] and lines[0].endswith("| 1 s |") and lines[1].endswith("| - |")
    ratio = float(lines[1].split("|")[3].split("(")[1].rstrip("x) "))
    assert ratio == pytest.approx(hf.file_size(run / "export" / "model.int8-ort.onnx") / hf.file_size(fp32), abs=0.005)
    assert ratio < 0.6 and np.isfinite(int8_row.worst)
