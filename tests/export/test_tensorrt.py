"""export/tensorrt.py: no torch, 2:4 detection, trtexec.sh / polygraphy.sh, the CLI, the skip result, and
engine builds where TensorRT and a GPU exist (skipped elsewhere)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import tensorrt as trt_export
from export.tensorrt import BuildOptions, Machine, engine_stem, export_tensorrt, inspect_onnx, write_scripts

REPO = Path(__file__).resolve().parents[2]


def _two_to_four(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """Random weights with exactly 2 nonzeros in every 4 consecutive values along ``axis``."""
    gen = np.random.default_rng(seed)
    moved = np.moveaxis(gen.standard_normal(shape).astype(np.float32), axis, -1)
    groups = moved.reshape(-1, 4)
    for row in groups:
        row[gen.choice(4, 2, replace=False)] = 0.0
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def _save(nodes: list, inits: list, path: Path, channels: int = 8, outputs: int = 3) -> Path:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conv_sparse (2:4 along C) -> conv_dense -> GlobalAveragePool -> Flatten -> gemm_sparse (transB=1,
    2:4 along K) -> matmul_dense."""
    inits = [
        numpy_helper.from_array(_two_to_four((8, 8, 3, 3), 1), "w_sparse"),
        numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8, 3, 3)).astype(np.float32), "w_dense"),
        numpy_helper.from_array(_two_to_four((4, 8), 1, seed=2), "w_gemm"),
        numpy_helper.from_array(np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32), "w_mm"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w_sparse"], ["a"], name="conv_sparse", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_dense"], ["b"], name="conv_dense", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["g"], name="gemm_sparse", transB=1),
        helper.make_node("MatMul", ["g", "w_mm"], ["logits"], name="matmul_dense"),
    ]
    return _save(nodes, inits, tmp_path_factory.mktemp("trt") / "model.fp32.onnx")


def test_module_imports_no_torch() -> None:
    code = "import sys, export.tensorrt, export.lint, export.fp16; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_2to4_detection_on_hand_made_onnx(sparse_model: Path) -> None:
    facts = inspect_onnx(sparse_model)
    assert facts.sparse_eligible == ("conv_sparse", "gemm_sparse")
    assert facts.sparse_candidates == 4
    assert facts.precision == "fp32" and not facts.has_fp16
    assert facts.inputs == (("input", (None, 8, 4, 4)),)


def test_2to4_is_found_through_dequantize_and_along_the_right_axis(tmp_path: Path) -> None:
    int8_sparse = np.round(_two_to_four((8, 8, 1, 1), 1, seed=3) * 50).astype(np.int8)
    wrong_axis = _two_to_four((8, 8, 1, 1), 0, seed=5)  # 2:4 along K, not along C: not what TensorRT reads
    inits = [
        numpy_helper.from_array(int8_sparse, "w_int8"),
        numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
        numpy_helper.from_array(wrong_axis, "w_wrong"),
        numpy_helper.from_array(_two_to_four((8, 3), 0, seed=6), "w_mm"),  # [K, N]: along K
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w_int8_dq"]),
        helper.make_node("Conv", ["input", "w_int8_dq"], ["a"], name="conv_int8"),
        helper.make_node("Conv", ["a", "w_wrong"], ["b"], name="conv_wrong_axis"),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "w_mm"], ["logits"], name="matmul"),
    ]
    facts = inspect_onnx(_save(nodes, inits, tmp_path / "q.onnx"))
    assert facts.sparse_eligible == ("conv_int8", "matmul")
    assert facts.precision == "int8"  # a DequantizeLinear makes it an int8 file


def test_engine_name_carries_version_gpu_and_precision(sparse_model: Path) -> None:
    facts = inspect_onnx(sparse_model)
    assert engine_stem(facts, "10.13.0.35", "NVIDIA H100 80GB HBM3") == "model.fp32.trt10.13.0.NVIDIA-H100-80GB-HBM3"
    assert engine_stem(facts, "8.6.2", "Orin", dla_core=1).endswith(".trt8.6.2.Orin.dla1")


def test_trtexec_and_polygraphy_scripts(sparse_model: Path, tmp_path: Path) -> None:
    facts = inspect_onnx(sparse_model)
    options = BuildOptions(batch=(2, 4, 8), workspace_mb=256, sparse=True, timing_cache=tmp_path / "timing.cache")
    scripts = write_scripts([facts], tmp_path, options)
    trtexec = Path(scripts["trtexec"]).read_text()
    for expected in (
        "--minShapes=input:2x8x4x4", "--optShapes=input:4x8x4x4", "--maxShapes=input:8x8x4x4",
        "--sparsity=enable", "--timingCacheFile=timing.cache", "--memPoolSize=workspace:256",
        "--stronglyTyped", "--skipInference", "--exportLayerInfo=", "if selected model.fp32 ",
        os.path.relpath(sparse_model, tmp_path),
    ):
        assert expected in trtexec, expected
    polygraphy = Path(scripts["polygraphy"]).read_text()
    for expected in (
        "polygraphy run", "--trt --onnxrt", "--trt-min-shapes 'input:[2,8,4,4]'", "--trt-max-shapes 'input:[8,8,4,4]'",
        "--sparse-weights", "--strongly-typed", f"--pool-limit workspace:{256 << 20}",
    ):
        assert expected in polygraphy, expected
    for path in scripts.values():
        assert os.stat(path).st_mode & stat.S_IXUSR
        subprocess.run(["bash", "-n", path], check=True)  # valid bash


def _fake_trtexec(tmp_path: Path, banner: str) -> Path:
    """Answers --help like trtexec (8.6's help has no --stronglyTyped) and logs each build's arguments."""
    typed = "" if "v8" in banner else "echo '  --stronglyTyped  strongly typed';"
    fake = tmp_path / "fake-trtexec"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"if [ \"$1\" = --help ]; then echo '&&&& RUNNING TensorRT.trtexec [{banner}] # trtexec --help'; {typed} exit 0; fi\n"
        f"{{ printf '%s\\n' \"$@\"; echo ---; }} >> {tmp_path}/args.txt\n"
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize(("banner", "version", "fp32_flags", "fp16_flags"), [
    ("TensorRT v101300", "10.13.0", {"--stronglyTyped"}, {"--stronglyTyped"}),
    ("TensorRT v8601", "8.6.1", set(), {"--fp16"}),
])
def test_trtexec_script_runs_with_a_fake_trtexec(
    sparse_model: Path, tmp_path: Path, banner: str, version: str, fp32_flags: set, fp16_flags: set
) -> None:
    from export.fp16 import convert_to_fp16

    fp16 = convert_to_fp16(sparse_model, tmp_path / "model.fp16.onnx")
    scripts = write_scripts([inspect_onnx(sparse_model), inspect_onnx(fp16)], tmp_path, BuildOptions(dla_core=0))
    env = {**os.environ, "TRTEXEC": str(_fake_trtexec(tmp_path, banner))}
    # A name that is not in the script builds nothing; one name builds that model; none builds all.
    subprocess.run([scripts["trtexec"], "other.model"], check=True, env=env, capture_output=True, timeout=60)
    assert not (tmp_path / "args.txt").exists()
    subprocess.run([scripts["trtexec"], "model.fp16"], check=True, env=env, capture_output=True, timeout=60)
    assert (tmp_path / "args.txt").read_text().count("---") == 1
    (tmp_path / "args.txt").unlink()
    subprocess.run([scripts["trtexec"]], check=True, env=env, capture_output=True, timeout=60)
    builds = [b.split() for b in (tmp_path / "args.txt").read_text().split("---") if b.strip()]
    assert len(builds) == 2
    precision_flags = {"--stronglyTyped", "--fp16", "--int8"}
    for args, name, flags in ((builds[0], "model.fp32", fp32_flags), (builds[1], "model.fp16", fp16_flags)):
        engine = next(a for a in args if a.startswith("--saveEngine="))
        assert engine.startswith(f"--saveEngine={name}.trt{version}.") and engine.endswith(".dla0.engine")
        assert precision_flags & set(args) == flags
        assert "--useDLACore=0" in args and "--allowGPUFallback" in args and "--sparsity=enable" not in args
        assert "--minShapes=input:1x8x4x4" in args and "--maxShapes=input:64x8x4x4" in args  # default batch
        assert Path(tmp_path, engine.removeprefix("--saveEngine=").replace(".engine", ".build.log")).is_file()


def test_cli_scripts_only_and_bad_input(sparse_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "export.tensorrt", str(sparse_model), "--out", str(out), "--scripts-only",
           "--sparse", "--batch", "1,8,32", "--workspace-mb", "512"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 layer(s): conv_sparse, gemm_sparse" in proc.stdout
    assert "engines skipped: --scripts-only" in proc.stdout
    text = (out / "trtexec.sh").read_text()
    assert "--maxShapes=input:32x8x4x4" in text and "--timingCacheFile=timing.cache" in text
    assert (out / "polygraphy.sh").is_file()
    for bad in (["--batch", "8,4,1"], ["--batch", "x"], ["--workspace-mb", "0"]):
        proc = subprocess.run([*cmd, *bad], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (bad, proc.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "export.tensorrt", str(tmp_path / "absent.onnx"), "--scripts-only"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "no such ONNX file" in proc.stderr


def test_dynamic_spatial_input_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(trt_export.ExportError, match=r"dynamic dimension\(s\) \[2, 3\]"):
        inspect_onnx(path)


def test_without_tensorrt_the_result_is_skipped_with_the_reason(
    sparse_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_trt = Machine(None, None, "TensorRT is not installed on this machine (ImportError: no module)")
    monkeypatch.setattr(trt_export, "probe", lambda: no_trt)
    report = export_tensorrt([sparse_model], tmp_path, BuildOptions(sparse=True))
    assert report["skipped"] == no_trt.reason
    entry = report["engines"]["model.fp32"]
    assert entry["status"] == "skipped" and entry["reason"] == no_trt.reason
    assert entry["sparsity"]["eligible"] == ["conv_sparse", "gemm_sparse"]
    assert Path(report["scripts"]["trtexec"]).is_file()
    assert not list(tmp_path.glob("*.engine"))


def test_this_machine_reports_why_it_cannot_build() -> None:
    machine = trt_export.probe()
    if machine.reason is None:
        pytest.skip(f"this machine can build engines (TensorRT {machine.tensorrt}, {machine.gpu})")
    assert machine.reason  # e.g. "TensorRT is not installed on this machine (only its type stubs are)"
    assert trt_export.unavailable_reason() == machine.reason


def test_recipe_required_fails_before_the_expensive_part(tiny_recipe: dict, write_recipe, tmp_path: Path) -> None:
    from compress.errors import BadInput
    from compress.runner import RunOptions, run_recipe

    reason = trt_export.unavailable_reason()
    if reason is None:
        pytest.skip("this machine can build engines")
    tiny_recipe["export"]["tensorrt"] = {"build": "required"}
    out = tmp_path / "run"
    with pytest.raises(BadInput, match="export.tensorrt.build: 'required' but no engine can be built here: "):
        run_recipe(write_recipe(tiny_recipe), RunOptions(out=out, quiet=True))
    assert not out.exists()


# --- where TensorRT and a GPU exist -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine() -> Machine:
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed, not TensorRT")
    found = trt_export.probe()
    if found.reason is not None:
        pytest.skip(found.reason)
    return found


def test_build_fp32_engine_with_log_layers_and_timing_cache(machine: Machine, sparse_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    options = BuildOptions(batch=(1, 2, 4), workspace_mb=256, sparse=True, timing_cache=cache)
    report = export_tensorrt([sparse_model], tmp_path, options)
    entry = report["engines"]["model.fp32"]
    assert entry["status"] == "built", entry
    engine = Path(entry["engine"])
    assert engine.is_file() and engine.stat().st_size == entry["size_bytes"]
    assert engine.name == engine_stem(inspect_onnx(sparse_model), machine.tensorrt or "", machine.gpu or "") + ".engine"
    json.loads(Path(entry["layers"]).read_text())
    assert Path(entry["build_log"]).is_file() and cache.is_file()
    assert entry["sparsity"]["enabled"] is True
    again = export_tensorrt([sparse_model], tmp_path, options)["engines"]["model.fp32"]
    assert again["status"] == "built"  # with the timing cache from the first build


def test_build_fp16_engine_from_the_converted_file(machine: Machine, sparse_model: Path, tmp_path: Path) -> None:
    from export.fp16 import convert_to_fp16

    fp16 = convert_to_fp16(sparse_model, tmp_path / "model.fp16.onnx")
    entry = export_tensorrt([fp16], tmp_path, BuildOptions(batch=(1, 1, 4)))["engines"]["model.fp16"]
    assert entry["status"] == "built", entry
    assert ".fp16.trt" in entry["engine"]
