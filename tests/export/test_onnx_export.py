from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.errors import ExportError
from export.onnx_export import export_onnx
from export.ort_runner import ort_session, parity, predict, predict_outputs


class TinyResNet(nn.Module):
    """Conv/BN/ReLU stem, one residual block, global avgpool, Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = self.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


class EigNet(nn.Module):
    """aten::linalg_eig has no ONNX symbolic at any opset."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.linalg.eig(y[:, :, None] * y[:, None, :])[0].real


class BranchyNet(nn.Module):
    """Branch on a tensor value: tracing would silently keep only one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def _trained_like(model: nn.Module) -> nn.Module:
    # Non-trivial BN statistics, so a graph that ignored running stats would fail parity.
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return model


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return _trained_like(TinyResNet())


@pytest.fixture(scope="module")
def exported(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    tiny.eval()
    return export_onnx(tiny, torch.randn(1, 3, 16, 16), out)


def test_export_is_valid_single_file_with_named_dynamic_io(exported: Path) -> None:
    assert exported.is_file()
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.onnx"]
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_torch_at_any_batch(tiny: nn.Module, exported: Path, batch: int) -> None:
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    tiny.eval()
    with torch.no_grad():
        ref = tiny(x).numpy()
    got = predict(ort_session(exported), x.numpy())
    assert got.shape == (batch, 10) and got.dtype == np.float32
    p = parity(ref, got)
    assert p["max_abs_diff"] < 1e-4
    assert p["top1_agreement"] == 1.0


def test_export_leaves_model_modes_untouched(tmp_path: Path) -> None:
    model = TinyResNet()
    model.train()
    model.stem[1].eval()  # mixed tree: restoring with model.train(True) would lose this
    before = {name: m.training for name, m in model.named_modules()}
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx")
    assert {name: m.training for name, m in model.named_modules()} == before
    after = model.state_dict()
    assert all(torch.equal(params_before[k], after[k]) for k in params_before)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_export_of_non_fp32_model_is_fp32_and_leaves_model_alone(tmp_path: Path) -> None:
    model = TinyResNet().eval().double()
    out = export_onnx(model, torch.randn(1, 3, 16, 16, dtype=torch.float64), tmp_path / "m.onnx")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


def test_export_is_deterministic_and_leaves_no_temp_file(tiny: nn.Module, tmp_path: Path) -> None:
    tiny.eval()
    x = torch.randn(1, 3, 16, 16)
    a = export_onnx(tiny, x, tmp_path / "a.onnx")
    b = export_onnx(tiny, x, tmp_path / "b.onnx")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_export_overwrites_existing_file(tiny: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"stale")
    export_onnx(tiny.eval(), torch.randn(1, 3, 16, 16), out)
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    ("model", "example", "needle"),
    [
        (EigNet(), torch.randn(2, 4), "linalg_eig"),
        (BranchyNet(), torch.randn(2, 4), "control flow"),
    ],
    ids=["unsupported-op", "data-dependent-branch"],
)
def test_unexportable_model_raises_and_writes_nothing(
    model: nn.Module, example: torch.Tensor, needle: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as err:
        export_onnx(model.eval(), example, out)
    message = str(err.value)
    assert type(model).__name__ in message
    assert needle in message
    assert list(tmp_path.iterdir()) == []
    # The TorchScript exporter dumps its IR graph to fd 2 on failure; the CLI display must not see it.
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.err
    assert "Torch IR graph" not in captured.out


def test_failed_export_keeps_previous_file(tmp_path: Path) -> None:
    # Atomic-replace semantics: a failed export never touches what is already at the path.
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(ExportError):
        export_onnx(EigNet().eval(), torch.randn(2, 4), out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_multi_output_model_names_every_output(tmp_path: Path) -> None:
    class TwoHeads(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x + 1, x * 2

    path = export_onnx(TwoHeads(), torch.randn(2, 4), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["output_0", "output_1"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in graph.output)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = predict_outputs(ort_session(path), x)
    np.testing.assert_allclose(got["output_0"], x + 1)
    np.testing.assert_allclose(got["output_1"], x * 2)
    with pytest.raises(ValueError, match="predict_outputs"):
        predict(ort_session(path), x)


def test_sample_without_tensors_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="tensors only"):
        export_onnx(nn.Identity(), (torch.randn(1, 4), 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_errors_and_ort_runner_do_not_import_torch() -> None:
    # The Jetson side has tensorrt + onnx but no torch.
    import subprocess
    import sys

    code = "import sys, export.errors, export.ort_runner; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
