"""Fidelity of compressed segmenters and a detector head (issue 18): torch vs int8-ort vs int8-trt.

Runs the task recipes (recipes/mnist-seg-lraspp.yaml, mnist-seg-deeplabv3.yaml, mnist-detector-head.yaml)
end to end at W8A8 and again at W4A8 (the quantize stage's weight_bits changed; gates set to `on_fail:
continue` so that both widths reach the export, whatever they score). The W4A8 run resumes the W8A8
run's pruning stage, so both widths quantize the same pruned model. Each exported file is then read back
in ONNX Runtime and compared with the original model's own fp32 file (export/model.original.onnx) on the
test split:
- segmenters: mean IoU against the per-pixel labels, and per-pixel agreement of the arg-max class with
  the original model's;
- detector head: cosine similarity to the original's outputs, per output (box regression, class
  logits), and the arg-max class agreement over all anchors and over the anchors matched to a digit.
"torch" is the compressed torch model, read through its fp32 file (the same graph; the run verifies its
parity). Latency is not measured here (bench/export.py and the demo do that).

    python bench/tasks.py [--quick] [--recipes lraspp,deeplabv3,detector] [--bits 8,4]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import ROOT  # noqa: E402  (puts the repository on sys.path)
from compress.batches import stack_samples
from compress.data import load_data
from compress.metrics import resolve_metric
from compress.recipe import load_recipe
from compress.runner import RunOptions, run_recipe
from export.ort_runner import ort_session, predict_outputs

RECIPES = {
    "lraspp": ROOT / "recipes" / "mnist-seg-lraspp.yaml",
    "deeplabv3": ROOT / "recipes" / "mnist-seg-deeplabv3.yaml",
    "detector": ROOT / "recipes" / "mnist-detector-head.yaml",
}
FILES = ("fp32", "int8-ort", "int8-trt")
LABEL = {"fp32": "torch", "int8-ort": "int8-ort", "int8-trt": "int8-trt"}
# --quick: fewer samples and epochs, the same steps
QUICK_DATA = {"lraspp": {"samples": 400}, "deeplabv3": {"samples": 400}, "detector": {"samples": 400}}


def variant(path: Path, bits: int, quick: bool, directory: Path, name: str) -> Path:
    recipe = yaml.safe_load(path.read_text())
    recipe = copy.deepcopy(recipe)
    for stage in recipe["stages"]:
        stage["gate"]["on_fail"] = "continue"
        if stage["pass"].startswith("quantize."):
            stage["params"]["weight_bits"] = bits
    recipe["export"]["onnx"]["precisions"] = list(FILES)
    recipe["export"]["verify"] = {"latency": False, "max_drop": 1.0}
    if quick:
        recipe["data"]["kwargs"].update(QUICK_DATA[name])
        if "train" in recipe["model"]:
            recipe["model"]["train"]["epochs"] = max(1, recipe["model"]["train"]["epochs"] // 2)
    out = directory / f"{name}.yaml"
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for module in (ROOT / "recipes").glob("*.py"):  # python: references resolve beside the recipe
        (directory / module.name).write_text(module.read_text())
    return out


def file_outputs(path: Path, inputs: object) -> list[np.ndarray]:
    return list(predict_outputs(ort_session(path), inputs).values())


def cosine_per_output(got: list[np.ndarray], want: list[np.ndarray]) -> list[float]:
    cosine = resolve_metric("cosine")
    return [cosine(torch.from_numpy(g), None, torch.from_numpy(w)) for g, w in zip(got, want)]


def measure(recipe_path: Path, run_dir: Path, name: str) -> dict[str, dict[str, float]]:
    recipe = load_recipe(recipe_path)
    data = load_data(recipe.data)
    inputs = stack_samples(data.test)
    original = file_outputs(run_dir / "export" / "model.original.onnx", inputs)
    rows: dict[str, dict[str, float]] = {}
    for file in FILES:
        got = file_outputs(run_dir / "export" / f"model.{file}.onnx", inputs)
        row: dict[str, float] = {}
        if name == "detector":
            boxes, scores = cosine_per_output(got, original)
            row["cosine boxes"], row["cosine classes"] = boxes, scores
            same = got[1].argmax(-1) == original[1].argmax(-1)
            row["class agreement"] = float(same.mean())
            matched = np.stack([data.test[i][1]["labels"].numpy() for i in range(len(data.test))]) > 0
            row["class agreement (matched anchors)"] = float(same[matched].mean())
        else:
            _, targets = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
            scores = torch.from_numpy(got[0])
            row["miou"] = resolve_metric("miou")(scores, targets)
            row["pixel agreement"] = resolve_metric("agreement")(scores, None, torch.from_numpy(original[0]))
        rows[file] = row
    original_row: dict[str, float] = {}
    if name != "detector":
        _, targets = next(iter(torch.utils.data.DataLoader(data.test, batch_size=len(data.test))))
        original_row["miou"] = resolve_metric("miou")(torch.from_numpy(original[0]), targets)
    rows["original"] = original_row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and reference epochs")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--bits", default="8,4")
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    for name in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            print(f"## {name}: {RECIPES[name].relative_to(ROOT)}{' (--quick)' if args.quick else ''}\n")
            table: list[str] = []
            notes: list[str] = []
            for bits in bits_list:
                recipe_path = variant(RECIPES[name], bits, args.quick, Path(tmp), name)
                started = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    report = run_recipe(recipe_path, RunOptions(out=run_dir, quiet=True))
                seconds = time.perf_counter() - started
                rows = measure(recipe_path, run_dir, name)
                columns = list(rows["fp32"])
                if not table:
                    baseline = report["baseline"]
                    notes.append(f"reference: {baseline['source']}, test {report['metric']['name']} "
                                 f"{baseline['test_metric']:.4f}; data: {report['data']['sizes']}")  # fmt: skip
                    if rows["original"]:
                        notes.append("original fp32 file: " + ", ".join(f"{k} {v:.4f}" for k, v in rows["original"].items()))
                    table += ["| weights | file | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
                for file in FILES:
                    table.append(f"| W{bits}A8 | {LABEL[file]} | " + " | ".join(f"{rows[file][c]:.4f}" for c in columns) + " |")
                stages = ", ".join(f"{s['name']} {s['test_metric']:.4f}" for s in report["stages"])
                notes.append(f"W{bits}A8 run: {seconds:.0f} s; stages' test {report['metric']['name']}: {stages}")
            print("\n".join(n for n in notes if not n.startswith("W")))
            print()
            print("\n".join(table))
            print()
            print("\n".join(n for n in notes if n.startswith("W")))
            print()

if __name__ == "__main__":
    main()
