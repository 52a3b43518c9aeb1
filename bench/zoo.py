"""Model zoo: the whole pipeline on the models people deploy, one row per model (compress.zoo).

For each of issue 10's twelve models (torchvision classifiers and transformers with random weights at
32-64 px, and a plain nn.TransformerEncoder classifier) and issue 19's two `transformers` models from small
configs (hf_vit: ViTForImageClassification; gpt2: GPT2LMHeadModel on random token ids, agreement of the
next token per position): channel pruning (Torch-Pruning; attention heads
as whole groups) and its checkpoint reload, unstructured pruning, a short distill.dot, a short
quantize.adaround (W7A8, see compress.zoo.Settings), the Q/DQ export turned into int8-trt ONNX, the
TensorRT Q/DQ lint, and ONNX Runtime against the torch quantized model on random inputs.

Columns: each step's status (ok / fail / skip), top-1 agreement and max |logit difference| between the
int8 ONNX (ONNX Runtime CPU, all graph optimizations) and the torch quantized model, size (int8-trt ONNX
bytes / fp32 ONNX bytes of the unpruned model), latency (int8-trt / fp32 ONNX Runtime, batch 1, one
thread), heads (attention heads before -> after pruning). Failed steps are listed below the table with
the module and the reason.

    python bench/zoo.py                     # all fourteen (about 10-15 minutes on 2 busy cores)
    python bench/zoo.py vit_b_16 swin_t     # some of them
    python bench/zoo.py --json out.json     # also write every step's details
    python bench/zoo.py --seconds 600       # start no new model after 10 minutes (the table shows what ran)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict

import _common  # noqa: F401  (puts the repo on sys.path)

from compress.zoo import ZOO, Settings, format_table, run_zoo_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--seconds", type=float, default=None, help="start no new model after this long")
    args = parser.parse_args()
    known = {z.name: z for z in ZOO}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [known[m] for m in args.models] if args.models else list(ZOO)
    settings = Settings()
    warnings.filterwarnings("ignore")
    results = []
    started = time.perf_counter()
    for zoo in chosen:
        if args.seconds is not None and time.perf_counter() - started > args.seconds:
            print(f"time budget spent: not run: {', '.join(z.name for z in chosen[len(results):])}")
            break
        result = run_zoo_model(zoo, settings)
        results.append(result)
        steps = " ".join(f"{name}={step.status}" for name, step in result.steps.items())
        print(f"[{time.perf_counter() - started:6.0f}s] {zoo.name}: {steps}", flush=True)
    print()
    print(format_table(results))
    passed = [r.model for r in results if r.passed]
    print(f"\n{len(passed)}/{len(results)} models pass every step ({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
