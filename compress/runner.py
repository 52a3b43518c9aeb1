"""The run: baseline -> stages with gates -> export -> report, resumable stage by stage.

Everything that can be wrong with the input (recipe, model, checkpoint, data, output directory) is
checked before the run directory is touched, so bad input leaves nothing half-written.
"""
from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Subset

import compress
from compress import distributed
from compress.atomic import atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file
from compress.data import DataSplits, load_data
from compress.errors import BadInput, GateFailed
from compress.faults import pause_point
from compress.gate import check_gate
from compress.batches import call_model, example_input, flat_outputs, restructure, selected, stack_samples, structure_text
from compress.metrics import Metric, resolve_metric
from compress.models import build_model, load_checkpoint
from compress.models.pyref import first_line
from compress.passes import get_pass
from compress.passes.registry import check_stages
from compress.progress import RunProgress
from compress.recipe import Recipe, load_recipe, stable_hash
from compress.reference import obtain_reference
from compress.search import check_searchable, search_changed
from compress.resources import check_memory_budget
from compress.report import headline, print_summary, write_reports
from compress.sparsity import sparsity_stats
from compress.state import ModelState, StageContext
from compress.train import predict


@dataclass
class RunOptions:
    out: Path | None = None
    resume: bool = True
    device: str = "cpu"
    seed: int | None = None
    trust_checkpoint: bool = False
    quiet: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise BadInput("--device cuda: CUDA is not available on this machine")
        if distributed.launched_by_torchrun():
            return torch.device("cuda", distributed.local_rank())  # one GPU per process
        return torch.device("cuda")
    raise BadInput(f"--device: expected cpu or cuda, got {name!r}")


def check_output_dir(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"--out {out}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: directory {probe} is not writable")
    if out.is_dir():
        check_no_escaping_links(out)


def check_no_escaping_links(out: Path) -> None:
    """Writes into the run directory must stay in it: a symlink inside pointing elsewhere is refused."""
    root = out.resolve()
    for path in out.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise BadInput(f"--out {out}: {path} is a symlink to {path.resolve()}, outside the run directory")


def versions() -> dict[str, str]:
    found = {"compress": compress.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "torch_pruning"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            pass
    found["platform"] = platform.platform()
    return found


def stage_dir_name(index: int, name: str) -> str:
    return f"{index + 1:02d}-{name}"


class Evaluator:
    """Metric of a model on one split; the validation split feeds the gates, the test split the report.

    Metrics read the outputs `model.output` selects. Fidelity metrics (agreement, cosine, sqnr, mse)
    compare with the reference model's outputs on the same split: the uncompressed model's, computed once
    per split when first needed and kept.
    """

    def __init__(
        self, data: DataSplits, metric: Metric, device: torch.device, batch_size: int, output: str | None = None
    ) -> None:
        self.data, self.metric, self.device, self.batch_size, self.output = data, metric, device, batch_size, output
        self.reference_model: nn.Module | None = None
        self._reference: dict[str, Any] = {}
        self._template: Any = None  # the structure of the outputs models return (exported files' are flat)

    def set_reference(self, model: nn.Module) -> None:
        """The model fidelity metrics compare with (the baseline); kept as is, never trained."""
        self.reference_model, self._reference = model, {}

    def predict(self, model: nn.Module, split: str) -> tuple[Any, Any]:
        """(all outputs as the model gives them, targets or None) on one split."""
        outputs, targets = predict(model, getattr(self.data, split), batch_size=self.batch_size, device=self.device)
        self._template = outputs
        return outputs, targets

    def reference(self, split: str) -> Any:
        """The reference model's selected outputs on `split` (None when no fidelity metric needs them)."""
        if not self.metric.against_reference:
            return None
        if split not in self._reference:
            if self.reference_model is None:
                raise RuntimeError("Evaluator: a fidelity metric needs set_reference() first")
            self._reference[split] = selected(self.predict(self.reference_model, split)[0], self.output)
        return self._reference[split]

    def judge(self, flat: dict[str, Any], targets: Any, split: str) -> float:
        """The metric of an exported file's outputs (flat by name, in the torch model's `leaves` order)
        on `split`: put back into the torch model's structure first, so the metric reads them alike."""
        outputs = restructure([torch.as_tensor(v) for v in flat.values()], self._template)
        return float(self.metric(selected(outputs, self.output), targets, self.reference(split)))

    def score(self, model: nn.Module, split: str = "val") -> float:
        return self.score_and_outputs(model, split)[0]

    def score_and_outputs(self, model: nn.Module, split: str = "val") -> tuple[float, Any]:
        """The metric and the selected outputs it was computed from."""
        outputs, targets = self.predict(model, split)
        chosen = selected(outputs, self.output)
        return float(self.metric(chosen, targets, self.reference(split))), chosen


class StageStore:
    """A stage's directory: checkpoint plus metrics.json, the latter written last as the completion mark."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.checkpoint = directory / "model.pt"
        self.metrics = directory / "metrics.json"

    def load_if_complete(self, key: str, template: nn.Module) -> tuple[ModelState, dict[str, Any]] | None:
        import json

        try:
            record = json.loads(self.metrics.read_text())
        except (OSError, ValueError):
            return None
        if record.get("key") != key or not self.checkpoint.exists():
            return None
        # a checkpoint torn or replaced after its stage finished is never taken as finished
        if sha256_file(self.checkpoint) != record.get("checkpoint_sha256"):
            return None
        payload = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        return ModelState.from_checkpoint(template, payload), record["entry"]

    def save(self, key: str, state: ModelState, entry: dict[str, Any]) -> None:
        self.metrics.unlink(missing_ok=True)
        digest = atomic_torch_save(state.checkpoint(), self.checkpoint)
        atomic_write_json(self.metrics, {"key": key, "checkpoint_sha256": digest, "entry": entry})


class Runner:
    def __init__(self, recipe: Recipe, options: RunOptions, recipe_path: str = "") -> None:
        self.recipe = recipe
        self.options = options
        self.recipe_path = recipe_path
        self.device = resolve_device(options.device)
        # under torchrun every rank runs the whole recipe in step; only rank 0 writes files and prints
        distributed.init_from_env(self.device.type)
        self.metric = resolve_metric(recipe.metric)
        self.out = options.out or Path("runs") / recipe.name
        check_output_dir(self.out)
        self._check_export_tools()
        check_stages(recipe, recipe_path)
        for index, (stage, config) in enumerate(zip(recipe.stages, recipe.pass_configs())):
            if stage.gate.on_fail == "search":
                check_searchable(stage.pass_name, config, f"{recipe_path or 'recipe'}: stages[{index}]")
        self.data = load_data(recipe.data)
        self.evaluator = Evaluator(
            self.data, self.metric, self.device, max(256, recipe.data.batch_size), recipe.model.output
        )
        self.report: dict[str, Any] = {}

    def _check_export_tools(self) -> None:
        export = self.recipe.export
        if export is not None and export.tensorrt.build == "required":
            from export.tensorrt import unavailable_reason

            reason = unavailable_reason()
            if reason is not None:
                raise BadInput(f"export.tensorrt.build: 'required' but no engine can be built here: {reason}")

    # --- model --------------------------------------------------------------------------------------

    def load_model(self, progress: RunProgress) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.recipe.model
        if self.data.input_shape is None and cfg.arch.startswith("builtin:"):
            raise BadInput(
                f"model.arch: {cfg.arch} takes (C, H, W) images; the data's samples are "
                f"{structure_text(example_input(self.data.test))} per batch of one"
            )
        channels, height, _ = self.data.input_shape or (None, None, None)
        torch.manual_seed(self.recipe.seed)
        model = build_model(cfg, in_channels=channels, num_classes=self.data.num_classes, input_size=height)
        self.resources = check_memory_budget(self.recipe, self.data, model)
        if cfg.checkpoint:
            model = load_checkpoint(model, cfg.checkpoint, trust=self.options.trust_checkpoint, arch=cfg.arch)
            source = {"source": "checkpoint", "path": cfg.checkpoint, "sha256": sha256_file(cfg.checkpoint)}
        elif self.data.targets == "none":
            # nothing to train a reference on: the model is used as its constructor made it (pretrained
            # weights a python: constructor loads, say)
            source = {"source": "constructed", "arch": cfg.arch, "note": "no checkpoint and no targets: used as constructed"}
            progress.log(f"reference: {cfg.arch} used as constructed (no checkpoint, and the data has no targets to train on)")
        else:
            # a model that cannot take the data, or a metric that fails, is found before minutes of training
            self._check_forward(model, torch.device("cpu"))
            self._check_metric(model, torch.device("cpu"))
            source = obtain_reference(model, self.recipe, self.data, self.device, progress)
        model = model.to(self.device)
        self._check_forward(model)
        self._check_metric(model)
        return model.eval(), source

    def _check_forward(self, model: nn.Module, device: torch.device | None = None) -> None:
        example = example_input(self.data.test, device or self.device)
        try:
            with torch.no_grad():
                outputs = call_model(model.eval(), example)
        except Exception as exc:
            raise BadInput(
                f"model.arch: {self.recipe.model.arch} cannot take the data's samples ({structure_text(example)}): "
                f"{type(exc).__name__}: {first_line(exc)}"
            ) from None
        if not flat_outputs(outputs):
            raise BadInput(f"model.arch: {self.recipe.model.arch} returned {type(outputs).__name__}, no tensors")
        export = self.recipe.export
        if export is not None and export.onnx.dynamic_axes:
            from export.onnx_export import onnx_dynamic_axes

            # a name or axis the file will not have is found now, not after the stages
            onnx_dynamic_axes(export.onnx.dynamic_axes, example, outputs, where="export.onnx.dynamic_axes")
        chosen = selected(outputs, self.recipe.model.output)
        if self.metric.reads_class_scores and self.data.num_classes is not None and isinstance(chosen, torch.Tensor):
            classes = chosen.shape[-1 if chosen.dim() == 3 else 1] if chosen.dim() >= 2 else 0
            if classes < self.data.num_classes:
                raise BadInput(
                    f"model.arch: output shape {tuple(chosen.shape)} does not give {self.data.num_classes} "
                    "class scores per sample (set model.kwargs.num_classes?)"
                )

    def _check_metric(self, model: nn.Module, device: torch.device | None = None) -> None:
        """The metric runs once on a few validation samples before anything is written: a user's metric
        that fails does so here, as one line naming it (resolve_metric), not after stages have run."""
        probe = Subset(self.data.val, range(min(16, len(self.data.val))))
        outputs, targets = predict(model, probe, batch_size=16, device=device or self.device)
        chosen = selected(outputs, self.recipe.model.output)
        # a fidelity metric compares the model with itself here: what is probed is that it runs
        self.metric(chosen, targets, chosen)

    # --- the run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        with RunProgress(quiet=self.options.quiet or not distributed.is_main()) as progress:
            model, source = self.load_model(progress)
            resolved = self.recipe.resolved()
            recipe_hash = stable_hash(resolved)
            if distributed.is_main():
                self.out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(
                    self.out / "recipe.yaml",
                    f"# recipe hash: {recipe_hash}\n" + yaml.safe_dump(resolved, sort_keys=False),
                )
            self.report = {
                "status": "running",
                "recipe": resolved,
                "recipe_hash": recipe_hash,
                "versions": versions(),
                "device": str(self.device),
                "seed": self.recipe.seed,
                "baseline": {},
                "stages": [],
                "export": {},
                "failed_stage": None,
                "resources": self.resources,
                "data": self.data.describe(),
                "metric": {"name": self.metric.name, "unit": self.metric.unit,
                           "against": "reference outputs" if self.metric.against_reference else "targets"},
            }
            try:
                state = self._baseline(model, source, progress)
                state = self._stages(state, progress)
                if self.recipe.export is not None:
                    self._export(state, progress)
                self.report["status"] = "passed"
            except GateFailed:
                self.report["status"] = "gate_failed"
                raise
            finally:
                if self.report["status"] == "running":
                    self.report["status"] = "error"
                self.report["seconds"] = time.perf_counter() - started
                if distributed.is_main():
                    write_reports(self.report, self.out)
                    print_summary(self.report, self.out, progress.console)
        return self.report

    def _baseline(self, model: nn.Module, source: dict[str, Any], progress: RunProgress) -> ModelState:
        state = ModelState(model)
        self.baseline_state = ModelState(copy.deepcopy(model).eval())
        self.evaluator.set_reference(self.baseline_state.model)
        metric = self.evaluator.score(model, "val")
        test_metric = self.evaluator.score(model, "test")
        stats = sparsity_stats(model)
        entry = {"metric": metric, "test_metric": test_metric, **stats, **source}
        baseline_dir = self.out / "baseline"
        if distributed.is_main():
            atomic_torch_save(state.checkpoint(), baseline_dir / "model.pt")
            atomic_write_json(baseline_dir / "metrics.json", entry)
        self.report["baseline"] = entry
        # whether the reference came from the cache is not part of what the model is
        identity = {k: v for k, v in source.items() if k != "cached"}
        self.baseline_key = stable_hash({"source": identity, "seed": self.recipe.seed})
        progress.log(f"baseline: val {metric:.4f}, test {test_metric:.4f}")
        return state

    def _stages(self, state: ModelState, progress: RunProgress, until: int | None = None) -> ModelState:
        """The stages in order (with `until`, only those before that index: the input of stage `until`)."""
        previous_key = self.baseline_key
        baseline_metric = self.report["baseline"]["metric"]
        previous_metric = baseline_metric
        resolved_stages = self.recipe.resolved()["stages"]
        for index, (stage, config) in enumerate(zip(self.recipe.stages, self.recipe.pass_configs())):
            if until is not None and index >= until:
                break
            # the gate is not part of the key: tightening a gate re-judges a stage, it does not redo it
            stage_section = {k: v for k, v in resolved_stages[index].items() if k != "gate"}
            key = stable_hash({"previous": previous_key, "stage": stage_section, "seed": self.recipe.seed})
            store = StageStore(self.out / "stages" / stage_dir_name(index, stage.name))
            # loading fills the template in place: a search stage keeps its input intact to search on from it
            template = copy.deepcopy(state.model) if stage.gate.on_fail == "search" else state.model
            loaded = store.load_if_complete(key, template) if self.options.resume else None
            judge = lambda m, g=stage.gate, p=previous_metric: check_gate(g, m, baseline=baseline_metric, previous=p)  # noqa: E731
            if loaded is not None:
                stage_input = state
                state, entry = loaded
                entry["resumed"] = True
                progress.log(f"{stage.name}: finished earlier, loaded from {store.checkpoint}")
                if stage.gate.on_fail == "search" and search_changed(entry, stage.gate, judge):
                    loaded = None  # a tightened gate or a new budget: search on (its recorded trials are reused)
                    state, entry = self._search_stage(index, stage, config, stage_input, key, judge, progress)
            elif stage.gate.on_fail == "search":
                state, entry = self._search_stage(index, stage, config, state, key, judge, progress)
            else:
                state, entry = self._run_stage(index, stage, config, state, progress)
            entry["gate"] = judge(entry["metric"])
            entry["drop"] = entry["gate"]["drop"]
            passed = entry["gate"]["passed"]
            if loaded is None and (passed or stage.gate.on_fail == "continue") and distributed.is_main():
                store.save(key, state, entry)
            distributed.barrier()  # a stage's files are complete before any rank moves on
            pause_point(f"after-stage:{stage.name}")
            self.report["stages"].append(entry)
            if not passed:
                if stage.gate.on_fail in ("stop", "search"):
                    self.report["failed_stage"] = stage.name
                    searched = f"; search: {entry['search']['outcome']}" if "search" in entry else ""
                    raise GateFailed(f"stage {stage.name!r} failed its gate: {entry['gate']['reason']}{searched}")
                progress.log(f"warning: {stage.name} failed its gate ({entry['gate']['reason']}); continuing")
            previous_key, previous_metric = key, entry["metric"]
        return state

    def _run_stage(
        self, index: int, stage: Any, config: Any, state: ModelState, progress: RunProgress
    ) -> tuple[ModelState, dict[str, Any]]:
        spec = get_pass(stage.pass_name)
        seed = self.recipe.seed * 1000 + index + 1
        torch.manual_seed(seed)
        ctx = StageContext(
            data=self.data,
            device=self.device,
            seed=seed,
            batch_size=self.recipe.data.batch_size,
            progress=progress,
            evaluate=lambda m: self.evaluator.score(m, "val"),
            stage_name=stage.name,
            stage_dir=self.out / "stages" / stage_dir_name(index, stage.name),
            recipe_dir=Path(self.recipe_path).resolve().parent if self.recipe_path else None,
            baseline=self.baseline_state,
            calibration_samples=self.recipe.data.calibration_samples,
            metric=self.metric,
            output=self.recipe.model.output,
            score_and_outputs=lambda m: self.evaluator.score_and_outputs(m, "val"),
        )
        started = time.perf_counter()
        result = spec.apply(state, config, ctx)
        seconds = time.perf_counter() - started
        state = result.state
        metric = self.evaluator.score(state.model, "val")
        test_metric = self.evaluator.score(state.model, "test")
        progress.log(f"{stage.name}: val {metric:.4f}, test {test_metric:.4f} ({seconds:.1f}s)")
        entry = {
            "name": stage.name,
            "pass": stage.pass_name,
            "metric": metric,
            "test_metric": test_metric,
            "test_drop": self.report["baseline"]["test_metric"] - test_metric,
            "seconds": seconds,
            **sparsity_stats(state.model),
            **result.info,
            "checkpoint": str(Path("stages") / stage_dir_name(index, stage.name) / "model.pt"),
            "resumed": False,
        }
        return state, entry

    def _search_stage(
        self, index: int, stage: Any, config: Any, state: ModelState, key: str, judge: Any, progress: RunProgress
    ) -> tuple[ModelState, dict[str, Any]]:
        """on_fail: search (compress/search.py): trials of this stage on copies of its input `state`."""
        from compress.search import search_stage

        return search_stage(
            pass_name=stage.pass_name,
            params=config.model_dump(mode="json"),
            config_type=type(config),
            budget=stage.gate.search,
            key=key,
            input_state=state,
            run_trial=lambda cfg: self._run_stage(index, stage, cfg, copy.deepcopy(state), progress),
            judge=judge,
            directory=self.out / "stages" / stage_dir_name(index, stage.name) / "search",
            sensitivity=lambda: self.stage_sensitivity(index, stage, config, state, progress),
            progress=progress,
            name=stage.name,
            resume=self.options.resume,
        )

    def stage_sensitivity(self, index: int, stage: Any, config: Any, state: ModelState, progress: RunProgress) -> Any:
        """Per-layer sensitivity of stage `index` on its input `state`, cached in DIR/analysis/."""
        from compress.sensitivity import analysis_path, stage_sensitivity

        path = analysis_path(self.out / "stages" / stage_dir_name(index, stage.name))
        return stage_sensitivity(
            stage.pass_name, config, state, self.evaluator.score_and_outputs, path, progress,
            class_scores=self.metric.reads_class_scores, example=example_input(self.data.train, self.device),
        )  # fmt: skip

    def _export(self, state: ModelState, progress: RunProgress) -> None:
        from compress.export_stage import OriginalModel, export_and_verify

        results = None
        if distributed.is_main():
            torch_outputs, targets = self.evaluator.predict(state.model, "test")
            original = None
            if self.recipe.stages:  # without stages the fp32 file is the original
                original_model = self.baseline_state.model
                original = OriginalModel(original_model, flat_outputs(self.evaluator.predict(original_model, "test")[0]))
            results = export_and_verify(
                state.model,
                self.recipe.export,
                self.data,
                self.out / "export",
                example=example_input(self.data.test),
                test_inputs=stack_samples(self.data.test),
                torch_outputs=flat_outputs(torch_outputs),
                score=lambda outputs: self.evaluator.judge(outputs, targets, "test"),
                progress=progress,
                original=original,
            )
        # every rank ends with the same verdict (and exit code) as rank 0, which alone exported
        results = distributed.broadcast_object(results)
        self.report["export"] = results
        self.report["headline"] = headline(self.report)
        failures = [f"{name}: {r['gate']['reason']}" for name, r in results.items() if not r["gate"]["passed"]]
        if failures:
            self.report["failed_stage"] = "export"
            raise GateFailed("export failed its verification gate: " + "; ".join(failures))

def run_recipe(recipe_path: str | Path, options: RunOptions) -> dict[str, Any]:
    recipe = load_recipe(recipe_path)
    if options.seed is not None:
        recipe.seed = options.seed
    try:
        return Runner(recipe, options, str(recipe_path)).run()
    finally:
        distributed.shutdown()
