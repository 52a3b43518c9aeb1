"""Mixed precision under a budget (weight_bits: auto) against uniform bits, on the reference ResNet-20.

For each pass (rtn, adaround): uniform W{bits}A8, and auto with an average budget of {bits} bits per
weight (the knapsack over the per-layer sensitivity, compress/sensitivity.py). Prints validation and
test top-1, the average weight bits and the packed weight size. The sensitivity is measured once and
cached (both auto runs share it).

    python bench/mixed_precision.py [--bits 4] [--iterations 200] [--passes rtn,adaround]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from _common import reference, test_top1  # noqa: E402  (sets sys.path)
from compress.passes import get_pass
from compress.state import ModelState, StageContext


def run(model, data, pass_name: str, params: dict, stage_dir: Path) -> dict:
    spec = get_pass(pass_name)
    ctx = StageContext.standalone(data, seed=1, name="bench")
    ctx.stage_dir = stage_dir  # the sensitivity cache: RUN/analysis/NAME.json
    started = time.perf_counter()
    result = spec.apply(ModelState(copy.deepcopy(model)), spec.config_type.model_validate(params), ctx)
    info = result.info
    return {
        "val": ctx.evaluate(result.state.model),
        "test": test_top1(result.state.model, data),
        "avg_bits": info["average_weight_bits"],
        "packed_kb": info["size_bytes_packed"] / 1e3,
        "bits": info["bits"],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=200, help="AdaRound steps per layer")
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--passes", default="rtn,adaround")
    args = parser.parse_args()
    model, data, _ = reference()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stage_dir = Path(tmp) / "stages" / "01-quantize"
        for short in args.passes.split(","):
            pass_name = f"quantize.{short}"
            base = {"activation_bits": 8, "calibration_samples": args.calibration}
            if short == "adaround":
                base["iterations"] = args.iterations
            for label, params in (
                (f"uniform W{args.bits}A8", {**base, "weight_bits": args.bits}),
                (f"auto, average {args.bits} bits", {**base, "weight_bits": "auto", "budget": {"average_bits": args.bits}}),
            ):
                result = run(model, data, pass_name, params, stage_dir)
                rows.append((short, label, result))
                print(f"{short:9s} {label:24s} val {100 * result['val']:.2f}%  test {100 * result['test']:.2f}%  "
                      f"avg bits {result['avg_bits']:.3f}  packed {result['packed_kb']:.1f} kB  "
                      f"{result['seconds']:.0f}s", flush=True)
                if label.startswith("auto"):
                    print("          bits per layer: " + ", ".join(f"{n} {b}" for n, b in result["bits"].items()))
    print("\n| pass | weights | val top-1 | test top-1 | average bits | packed size |")
    print("|---|---|---|---|---|---|")
    for short, label, r in rows:
        print(f"| {short} | {label} | {100 * r['val']:.2f}% | {100 * r['test']:.2f}% | {r['avg_bits']:.3f} | "
              f"{r['packed_kb']:.1f} kB |")


if __name__ == "__main__":
    main()
