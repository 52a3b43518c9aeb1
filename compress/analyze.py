"""`compress analyze RECIPE [--stage NAME]`: per-layer sensitivity of prune/quantize stages, table and chart.

A stage is analysed on its input, the model the stages before it produce: those are taken from the run
directory when finished there (as `--resume` does), run otherwise. Results go to DIR/analysis/NN-NAME.json
(the cache the gate search and `weight_bits: auto` read too) and DIR/analysis/NN-NAME.png.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from compress import distributed
from compress.errors import BadInput
from compress.plots import plot_sensitivity
from compress.progress import RunProgress
from compress.recipe import load_recipe
from compress.runner import Runner, RunOptions, stage_dir_name
from compress.sensitivity import analysis_path, primary_level, table


def analyze_recipe(recipe_path: str | Path, options: RunOptions, stage: str | None = None) -> list[dict[str, Any]]:
    recipe = load_recipe(recipe_path)
    if options.seed is not None:
        recipe.seed = options.seed
    analysable = [i for i, s in enumerate(recipe.stages) if s.pass_name.startswith(("prune.", "quantize."))]
    if stage is not None:
        names = [s.name for s in recipe.stages]
        if stage not in names:
            raise BadInput(f"--stage: no stage {stage!r} in {recipe_path} (stages: {', '.join(names) or 'none'})")
        analysable = [names.index(stage)]
        if not recipe.stages[analysable[0]].pass_name.startswith(("prune.", "quantize.")):
            raise BadInput(f"--stage {stage}: sensitivity is measured for prune.* and quantize.* stages only")
    if not analysable:
        raise BadInput(f"{recipe_path}: no prune.* or quantize.* stage to analyse")
    configs = recipe.pass_configs()
    for index in analysable:  # what cannot be measured is refused before anything runs
        cfg, name = configs[index], recipe.stages[index].name
        if recipe.stages[index].pass_name.startswith("prune.") and (
            getattr(cfg, "sparsity", None) is None or cfg.granularity != "unstructured"
        ):
            raise BadInput(f"stage {name!r}: sensitivity needs unstructured pruning with params.sparsity")
    try:
        runner = Runner(recipe, options, str(recipe_path))
        return _analyze(runner, analysable)
    finally:
        distributed.shutdown()


def _analyze(runner: Runner, indices: list[int]) -> list[dict[str, Any]]:
    recipe = runner.recipe
    results = []
    with RunProgress(quiet=runner.options.quiet or not distributed.is_main()) as progress:
        model, source = runner.load_model(progress)
        runner.report = {"status": "analyzing", "baseline": {}, "stages": [], "export": {}, "failed_stage": None}
        baseline = runner._baseline(model, source, progress)
        configs = recipe.pass_configs()
        for index in indices:
            runner.report["stages"] = []
            state = runner._stages(copy.deepcopy(baseline), progress, until=index)
            stage, config = recipe.stages[index], configs[index]
            analysis = runner.stage_sensitivity(index, stage, config, state, progress)
            level = primary_level(stage.pass_name, config)
            title = f"sensitivity of stage '{stage.name}' ({stage.pass_name}), validation split"
            path = analysis_path(runner.out / "stages" / stage_dir_name(index, stage.name))
            chart = plot_sensitivity(analysis.data, level, path.with_suffix(".png"), title) if distributed.is_main() else None
            if not runner.options.quiet and distributed.is_main():
                progress.console.print(table(analysis, level, title))
                progress.console.print(f"sensitivity: {path}, chart: {chart}")
            results.append({"stage": stage.name, "path": str(path), "chart": str(chart), **analysis.data})
    return results
