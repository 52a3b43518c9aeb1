"""Post-training quantization on the reference ResNet-20 and ResNet-8 (mnist5k), side by side with peers.

    python bench/quantization.py [--quick] [--iterations 500] [--seeds 3] [--models resnet20,resnet8]
                                 [--bits 8,4,3,2] [--weight-grid full|narrow] [--no-aimet] [--no-unsigned]

Rows: fp32; quantize.rtn with the default weight ranges (auto: MSE, SQNR at 2 bits) and with min-max ones;
quantize.adaround (mean and spread over seeds) at W8A8, W4A8, W3A8, W2A8, and at W8A8 again with
unsigned_symmetric (ReLU outputs on the unsigned grid, ONNX Runtime only); ONNX Runtime's quantize_static
(QDQ, per-channel, MinMax) at W8A8, with zero-point int8 activations and with symmetric ones (TensorRT's
form, as ours), exact arithmetic; every W8A8 row also averaged over the same calibration draws (seeds) for
ours and the peer; Qualcomm AIMET's AdaRound at each width below 8 with the same iterations, calibration
images and batch size, run in its own virtual environment (/tmp/aimet-venv, created here when missing;
skipped with the reason when it cannot be installed). Wall times: our whole pass (fold, ranges, calibration,
AdaRound) against AIMET's fold + apply_adaround at the same width, both on this machine in this run (ours:
the mean over seeds).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, ort_quantize_static, reference, test_top1  # noqa: E402  (sets sys.path)
from compress.data import calibration_subset, dataset_tensors
from compress.passes import get_pass
from compress.state import ModelState, StageContext

AIMET_VENV = Path(os.environ.get("AIMET_VENV", "/tmp/aimet-venv"))
AIMET_PINS = ["aimet-torch", "torch==2.14.1", "torchvision==0.29.1", "mlxtend"]
CALIBRATION = 1024
CALIBRATION_SEED = 1  # our pass draws its calibration images with the stage seed; AIMET gets seed 1's


def run_pass(model, data, pass_name: str, params: dict, seed: int) -> tuple[float, float, dict]:
    spec = get_pass(pass_name)
    state = ModelState(copy.deepcopy(model))
    started = time.perf_counter()
    ctx = StageContext.standalone(data, seed=seed, name="bench")  # calibration_samples: 1024
    result = spec.apply(state, spec.config_type.model_validate(params), ctx)
    seconds = time.perf_counter() - started
    return test_top1(result.state.model, data), seconds, result.info


def ort_peer(model, data, workdir: Path, seeds: list[int]) -> dict[bool, list[float]]:
    """ONNX Runtime's quantize_static W8A8 in two forms, with each seed's calibration draw (as ours):
    int8 activations with a zero point (its default) and symmetric (TensorRT's form, the constraint ours
    work under without unsigned_symmetric); symmetric -> test accuracies. Evaluated with graph
    optimizations off, so the file's Q/DQ arithmetic is computed exactly: the optimized x86 kernels lose
    accuracy to int16 saturation on signed activations (ResNet-8 symmetric: 93.5% optimized, 97.9% exact),
    which says nothing about the quantization itself. Empty when ONNX Runtime's quantization is missing."""
    try:
        import onnxruntime as ort
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        print(f"  ORT peer skipped: {exc}")
        return {}
    from export.onnx_export import export_onnx
    from export.ort_runner import predict

    fp32 = export_onnx(model, dataset_tensors(data.test)[0][:1], workdir / "fp32.onnx")
    x, y = dataset_tensors(data.test)
    results: dict[bool, list[float]] = {False: [], True: []}
    for seed in seeds:
        for symmetric in (False, True):
            path = ort_quantize_static(fp32, data, workdir / f"int8-{symmetric}.onnx", unsigned_activations=False,
                                       symmetric_activations=symmetric, calibration_seed=seed)  # fmt: skip
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            logits = predict(session, x.numpy())
            results[symmetric].append(float((logits.argmax(1) == y.numpy()).mean()))
    return results


def ensure_aimet() -> str | None:
    """None when AIMET's environment works, else the reason it is skipped."""
    python = AIMET_VENV / "bin" / "python"
    probe = [str(python), "-c", "import aimet_torch.adaround.adaround_weight"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    print(f"setting up AIMET in {AIMET_VENV} (pip install {' '.join(AIMET_PINS)}) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(AIMET_VENV)], [str(python), "-m", "pip", "install", "-q", *AIMET_PINS]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return "skipped: cannot install aimet-torch: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return "skipped: aimet_torch installed but does not import"
    return None


AIMET_SCRIPT = r'''
import json, sys, time, types, importlib.util, tempfile, os, warnings, logging
warnings.filterwarnings("ignore")
import torch
from torch.utils.data import DataLoader, TensorDataset
args = json.loads(sys.argv[1])
# the model class alone, without the compress package (not installed in AIMET's environment)
registry = types.ModuleType("compress.models.registry")
registry.register_builtin = lambda name: (lambda fn: fn)
for name in ("compress", "compress.models"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["compress.models.registry"] = registry
spec = importlib.util.spec_from_file_location("resnet_cifar", args["module"])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
blob = torch.load(args["data"], weights_only=True)
model = mod.ResNetCifar(args["blocks"], in_channels=1, num_classes=10, input_size=28)
model.load_state_dict(blob["state_dict"]); model.eval()
from aimet_torch.common.defs import QuantScheme
from aimet_torch.batch_norm_fold import fold_all_batch_norms
from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
from aimet_torch.quantsim import QuantizationSimModel
logging.disable(logging.WARNING)
calib = blob["calib"]
loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=32, shuffle=False)
config = {
    "defaults": {"ops": {"is_output_quantized": "True"}, "params": {"is_quantized": "True", "is_symmetric": "True"},
                 "strict_symmetric": "False", "unsigned_symmetric": "False", "per_channel_quantization": "True"},
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {},
    "supergroups": [{"op_list": ["Conv", "Relu"]}, {"op_list": ["Gemm", "Relu"]}],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}
work = tempfile.mkdtemp()
config_path = os.path.join(work, "config.json")
json.dump(config, open(config_path, "w"))
dummy = torch.randn(1, 1, 28, 28)
started = time.perf_counter()
fold_all_batch_norms(model, (1, 1, 28, 28))
params = AdaroundParameters(data_loader=loader, num_batches=len(loader), default_num_iterations=args["iterations"])
ada = Adaround.apply_adaround(model, dummy, params, path=work, filename_prefix="ada", default_param_bw=args["bits"],
                              default_quant_scheme=QuantScheme.post_training_tf_enhanced, default_config_file=config_path)
seconds = time.perf_counter() - started
sim = QuantizationSimModel(ada, dummy, quant_scheme=QuantScheme.post_training_tf_enhanced, default_output_bw=8,
                           default_param_bw=args["bits"], config_file=config_path)
sim.set_and_freeze_param_encodings(encoding_path=os.path.join(work, "ada.encodings"))
sim.compute_encodings(lambda m, _: [m(x) for x, _y in loader], None)
correct = 0
with torch.no_grad():
    for i in range(0, len(blob["test_x"]), 256):
        correct += int((sim.model(blob["test_x"][i:i+256]).argmax(1) == blob["test_y"][i:i+256]).sum())
print("RESULT " + json.dumps({"top1": correct / len(blob["test_y"]), "seconds": seconds}))
'''


def aimet_adaround(model, data, blocks: int, bits: int, iterations: int, workdir: Path) -> dict | str:
    calib, _ = dataset_tensors(calibration_subset(data.train, CALIBRATION, CALIBRATION_SEED))
    test_x, test_y = dataset_tensors(data.test)
    blob = workdir / "aimet-input.pt"
    torch.save({"state_dict": model.state_dict(), "calib": calib, "test_x": test_x, "test_y": test_y}, blob)
    script = workdir / "aimet_run.py"
    script.write_text(AIMET_SCRIPT)
    args = {"module": str(ROOT / "compress" / "models" / "resnet_cifar.py"), "data": str(blob),
            "blocks": blocks, "bits": bits, "iterations": iterations}  # fmt: skip
    done = subprocess.run([str(AIMET_VENV / "bin" / "python"), str(script), json.dumps(args)],
                          capture_output=True, text=True)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"skipped: AIMET run failed ({tail})"


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return pct(values[0])
    return f"{pct(statistics.mean(values))} ({pct(min(values))}-{pct(max(values))})"


def bench_model(arch: str, args: argparse.Namespace, aimet_status: str | None) -> list[list[str]]:
    model, data, _ = reference(arch)
    blocks = {"resnet8": 1, "resnet20": 3}[arch]
    fp32 = test_top1(model, data)
    print(f"\n## {arch}: fp32 {pct(fp32)}% (test split, {len(data.test)} images)", flush=True)
    rows: list[list[str]] = []
    ours_seconds: dict[int, float] = {}
    widths = [(bits, False) for bits in args.bits] + ([(8, True)] if 8 in args.bits and args.unsigned else [])
    for bits, unsigned in widths:
        params = {"weight_bits": bits, "weight_grid": args.weight_grid, "unsigned_symmetric": unsigned}
        label = f"W{bits}A8" + (" unsigned_symmetric" if unsigned else "")
        rtn_auto, _, _ = run_pass(model, data, "quantize.rtn", params, CALIBRATION_SEED)
        rtn_minmax, _, _ = run_pass(model, data, "quantize.rtn", {**params, "weight_range": "minmax"}, CALIBRATION_SEED)
        accs, seconds = [], []
        for seed in range(1, args.seeds + 1):
            acc, secs, info = run_pass(model, data, "quantize.adaround", {**params, "iterations": args.iterations}, seed)
            accs.append(acc)
            seconds.append(secs)
            per_layer = ", ".join(f"{layer['seconds']:.1f}" for layer in info["layers"])
            threads = "/".join(str(layer["threads"]) for layer in info["layers"])
            print(f"  {label} adaround seed {seed}: {pct(acc)}% in {secs:.1f}s (prepare {info['prepare_seconds']:.1f}s; "
                  f"per layer: {per_layer}; threads {threads})", flush=True)  # fmt: skip
        if not unsigned:
            ours_seconds[bits] = statistics.mean(seconds)
        rows.append([arch, label, pct(fp32), pct(rtn_auto), pct(rtn_minmax), spread(accs),
                     f"{statistics.mean(seconds):.1f}", "", ""])  # fmt: skip
        print(f"  {label}: rtn auto {pct(rtn_auto)}, rtn minmax {pct(rtn_minmax)}, adaround {spread(accs)} "
              f"(per seed {' '.join(pct(a) for a in accs)})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if 8 in args.bits:  # both forms beside ours (symmetric), zero-point beside ours unsigned
            peer = ort_peer(model, data, Path(tmp), list(range(1, args.seeds + 1)))
            if peer:  # zero-point is ORT's default, symmetric is the form ours has
                rows[args.bits.index(8)][7] = (f"ORT quantize_static {spread(peer[False])} zero-point, "
                                               f"{spread(peer[True])} symmetric (same calibration draws)")
                if args.unsigned:
                    rows[-1][7] = f"ORT quantize_static {spread(peer[False])} (zero-point activations; same draws)"
                print(f"  W8A8 ORT quantize_static per draw: zero-point {' '.join(pct(a) for a in peer[False])}, "
                      f"symmetric {' '.join(pct(a) for a in peer[True])}", flush=True)
        # AIMET at every width below 8 it shares with ours: its accuracy on this very model, and the time ratio
        for bits in (b for b in args.bits if b < 8):
            peer = aimet_status or aimet_adaround(model, data, blocks, bits, args.iterations, Path(tmp))
            row = rows[args.bits.index(bits)]
            if isinstance(peer, dict):
                row[7] = f"AIMET AdaRound {pct(peer['top1'])} ({peer['seconds']:.1f}s)"
                row[8] = f"{ours_seconds[bits] / peer['seconds']:.2f}"
                print(f"  W{bits}A8 AIMET: {pct(peer['top1'])}% in {peer['seconds']:.1f}s", flush=True)
            else:
                row[7] = f"AIMET {peer}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-8, W4 and W3, 100 iterations, 1 seed, no AIMET")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default="resnet20,resnet8")
    parser.add_argument("--bits", default="8,4,3,2", help="weight bit widths (activations int8)")
    parser.add_argument("--no-aimet", action="store_true")
    parser.add_argument("--no-unsigned", dest="unsigned", action="store_false", help="without the W8A8 unsigned_symmetric row")
    parser.add_argument("--weight-grid", choices=["full", "narrow"], default="full",
                        help="our weight grid: [-2^(b-1), 2^(b-1)-1] (full, AIMET's) or +-(2^(b-1)-1)")
    args = parser.parse_args()
    args.bits = [int(b) for b in args.bits.split(",")]
    if args.quick:
        args.models, args.iterations, args.seeds, args.no_aimet, args.bits = "resnet8", 100, 1, True, [4, 3]
    aimet_status = "skipped: --no-aimet" if args.no_aimet else ensure_aimet()
    act_ranges = get_pass("quantize.adaround").config_type.model_fields["act_calibration"].default
    print(f"torch threads {torch.get_num_threads()}, iterations {args.iterations}, calibration {CALIBRATION} "
          f"images, batch 32, seeds {args.seeds}; weights per-channel symmetric, zero point 0, "
          f"{'[-2^(b-1), 2^(b-1)-1]' if args.weight_grid == 'full' else '+-(2^(b-1)-1)'} ({args.weight_grid} grid); "
          f"activations int8 symmetric, {act_ranges} ranges (the default act_calibration)")
    rows = []
    for arch in args.models.split(","):
        rows += bench_model(arch, args, aimet_status)
    header = ["model", "bits", "fp32", "rtn (auto range)", "rtn (minmax range)", f"adaround {args.iterations} it", "ours s",
              "peer", "ours/AIMET time"]  # fmt: skip
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
