"""`on_fail: search`: when a stage fails its gate, find the most compressed variant that passes.

Trial 0 is the stage as written. The strategies then change only pass params, within the budget
(`gate.search.trials` and/or `minutes`, trial 0 included):

- pruning (prune.*): bisection of `sparsity` between the last passing level (the stage's input) and the
  target, on the density scale (1 - sparsity, geometric midpoints: 0 -> 0.99 tries 0.9, 0.968, ...),
  until the passing and failing densities are within `tolerance`; with `adaptive: true`, then the same
  between the best passing level and the target with the most sensitive layers (per-layer sensitivity,
  compress/sensitivity.py, at most `dense_share` of the weights) left dense through `ignore`;
- quantization (quantize.*): the most sensitive layers (sensitivity at the stage's bits) to 8 bits, one
  group more per trial, until the gate passes; if all at 8 bits still fails, the most sensitive to float
  (`skip`) likewise; then bits are won back layer by layer, least sensitive first, where the gate allows.

The kept trial is the passing one that compresses most (pruning: the highest sparsity; quantization:
the smallest size), ties to the higher metric. With none passing, the best failing one (highest metric)
is saved as search/best_failing.pt and the stage fails its gate.

Every finished trial is recorded in stages/NN-NAME/search/trials.json (config, metric, size, seconds)
right after it ends, and the best passing/failing model so far next to it: a killed search, run again,
replays the recorded trials (the strategy is deterministic given their results, and so is the budget,
counted in recorded trials and recorded seconds) and runs only the trials it had not finished.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress import distributed
from compress.atomic import atomic_torch_save, atomic_write_json, sha256_file
from compress.errors import BadInput
from compress.faults import pause_point
from compress.progress import RunProgress
from compress.recipe import SearchConfig, stable_hash
from compress.state import ModelState

LOG_FORMAT = "compress.search/1"
FLOAT = 32  # a layer left in float (skip), in the quantization search's bit assignments
RunTrial = Callable[[Any], tuple[ModelState, dict[str, Any]]]  # typed pass config -> (state, stage entry)
Judge = Callable[[float], dict[str, Any]]  # metric -> the gate's verdict


def check_searchable(pass_name: str, config: Any, where: str) -> None:
    """What the schema cannot see: a pruning search needs a sparsity to back off."""
    if pass_name.startswith("prune."):
        if getattr(config, "granularity", "unstructured") == "nm":
            raise BadInput(f"{where}.gate.on_fail: search cannot back off N:M pruning (its sparsity is fixed)")
        if getattr(config, "sparsity", None) is None:
            raise BadInput(f"{where}.gate.on_fail: search needs params.sparsity to back off")


def search_changed(entry: dict[str, Any], gate: Any, judge: Judge) -> bool:
    """A finished stage is searched on when its gate now fails it, or its search ran under another budget."""
    if not judge(entry["metric"])["passed"]:
        return True
    budget = (gate.search or SearchConfig()).model_dump(mode="json")
    return "search" in entry and entry["search"].get("budget") != budget


def deployed_size(entry: dict[str, Any]) -> int:
    """Quantized: weights packed at their bits (+ the rest); otherwise nonzero parameters at 4 bytes."""
    if "size_bytes_packed" in entry:
        return int(entry["size_bytes_packed"])
    return int(entry.get("params_nonzero", 0)) * 4


class Search:
    def __init__(
        self,
        *,
        pass_name: str,
        params: dict[str, Any],
        config_type: Any,
        budget: SearchConfig,
        key: str,
        run_trial: RunTrial,
        judge: Judge,
        directory: Path,
        template: ModelState,
        progress: RunProgress,
        name: str,
        resume: bool = True,
    ) -> None:
        self.pass_name, self.params, self.config_type = pass_name, params, config_type
        self.budget, self.key, self.run_trial, self.judge = budget, key, run_trial, judge
        self.directory, self.template, self.progress, self.name = directory, template, progress, name
        self.log_path = directory / "trials.json"
        self.kind = "prune" if pass_name.startswith("prune.") else "quantize"
        self.trials: list[dict[str, Any]] = []
        self.files: dict[str, dict[str, Any]] = {}  # "passing"/"failing" -> {"trial", "sha256"}
        self.replayed = 0
        self.states: dict[str, tuple[int, ModelState]] = {}  # best models this process holds in memory
        if resume:
            self._load()

    # --- the log -----------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            log = json.loads(self.log_path.read_text())
        except (OSError, ValueError):
            return
        if log.get("format") == LOG_FORMAT and log.get("key") == self.key:
            self.trials, self.files = log["trials"], log.get("files", {})
            self.progress.log(f"{self.name}: search resumes from {len(self.trials)} recorded trials")

    def _save_log(self) -> None:
        if distributed.is_main():
            atomic_write_json(self.log_path, {"format": LOG_FORMAT, "key": self.key, "trials": self.trials,
                                              "files": self.files})

    # --- trials --------------------------------------------------------------------------------------

    def spent_seconds(self) -> float:
        return sum(t["seconds"] for t in self.trials)

    def exhausted(self) -> bool:
        b = self.budget
        return (b.trials is not None and len(self.trials) >= b.trials) or (
            b.minutes is not None and self.spent_seconds() >= 60 * b.minutes
        )

    def passed(self, trial: dict[str, Any]) -> bool:
        return bool(self.judge(trial["metric"])["passed"])  # judged now: a changed gate re-judges old trials

    def rank(self, trial: dict[str, Any]) -> tuple[float, float]:
        if self.kind == "prune":
            return (trial["sparsity"], trial["metric"])
        return (-trial["size_bytes"], trial["metric"])

    def best(self, passing: bool) -> dict[str, Any] | None:
        chosen = [t for t in self.trials if self.passed(t) == passing]
        if not chosen:
            return None
        return max(chosen, key=self.rank) if passing else max(chosen, key=lambda t: (t["metric"], self.rank(t)))

    def trial(self, phase: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """The trial of the stage's params with `changes`: recorded ones are looked up, never rerun;
        None when the budget is spent."""
        params = {**self.params, **changes}
        digest = stable_hash(params)
        for recorded in self.trials:
            if recorded["params_hash"] == digest:
                return recorded
        if self.exhausted():
            return None
        config = self.config_type.model_validate(params)
        index = len(self.trials)
        started = time.perf_counter()
        state, entry = self.run_trial(config)
        gate = self.judge(entry["metric"])
        record = {
            "trial": index,
            "phase": phase,
            "changes": changes,
            "params_hash": digest,
            "metric": entry["metric"],
            "test_metric": entry.get("test_metric"),
            "drop": gate["drop"],
            "sparsity": entry.get("sparsity"),
            "size_bytes": deployed_size(entry),
            "average_bits": entry.get("average_weight_bits"),  # over weights, float layers at 32
            "float_layers": len(entry.get("float_layers") or []),
            "seconds": time.perf_counter() - started,
            "entry": entry,
        }
        self.trials.append(record)
        for which in ("passing", "failing"):  # keep the best model of each kind, before the log says so
            best = self.best(which == "passing")
            if best is record:
                self._keep(which, index, state)
        self._save_log()
        verdict = "pass" if gate["passed"] else "FAIL"
        self.progress.log(
            f"{self.name}: search trial {index} ({phase}) {self._describe(record)}: val {record['metric']:.4f}, "
            f"drop {record['drop']:+.4f}, {record['size_bytes'] / 1e3:.1f} kB: {verdict}"
        )
        self._advance()
        pause_point(f"search:{self.name}:trial:{index}")
        return record

    def _describe(self, record: dict[str, Any]) -> str:
        if self.kind == "prune":
            return f"sparsity {record['sparsity']:.4f}"
        return f"average bits {record['average_bits'] or 0:.2f}, {record['float_layers']} float layers"

    def _keep(self, which: str, index: int, state: ModelState) -> None:
        path = self.directory / ("best.pt" if which == "passing" else "best_failing.pt")
        self.states[which] = (index, state)
        if distributed.is_main():
            digest = atomic_torch_save(state.checkpoint(), path)
            self.files[which] = {"trial": index, "path": path.name, "sha256": digest}

    def load_best(self, which: str, trial: dict[str, Any]) -> ModelState:
        """The kept model of `trial`: in memory, or from its file; rerun only if the file is gone or is another
        trial's (a gate changed since, so a different trial is best now)."""
        held = self.states.get(which)
        if held is not None and held[0] == trial["trial"]:
            return held[1]
        info = self.files.get(which) or {}
        path = self.directory / info.get("path", "-")
        if info.get("trial") == trial["trial"] and path.exists() and sha256_file(path) == info.get("sha256"):
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state = ModelState.from_checkpoint(copy.deepcopy(self.template.model), payload)
            return state
        self.progress.log(f"{self.name}: search: rebuilding trial {trial['trial']} (its model was not kept)")
        state, _ = self.run_trial(self.config_type.model_validate({**self.params, **trial["changes"]}))
        self._keep(which, trial["trial"], state)
        self._save_log()
        return state

    # --- progress ------------------------------------------------------------------------------------

    def _advance(self) -> None:
        if self._bar is not None:
            self._bar(1, f"{len(self.trials)} trials, {self.spent_seconds() / 60:.1f} min")

    _bar: Callable[..., None] | None = None

    # --- strategies ----------------------------------------------------------------------------------

    def run(self, sensitivity: Callable[[], Any]) -> None:
        total = self.budget.trials or max(len(self.trials) + 1, 8)
        with self.progress.task(f"{self.name}: search", total) as bar:
            bar(min(len(self.trials), total))
            self._bar = bar
            try:
                first = self.trial("target", {})
                if first is None or self.passed(first):
                    return
                if self.kind == "prune":
                    self._prune(sensitivity)
                else:
                    self._quantize(sensitivity, first)
            finally:
                self._bar = None

    def _bisect(self, phase: str, passing: float, failing: float, extra: dict[str, Any]) -> None:
        """Densities: `passing` passed (or is the input), `failing` failed; geometric midpoints between."""
        while failing < passing and passing / max(failing, 1e-12) > 1 + self.budget.tolerance:
            sparsity = round(1 - math.sqrt(passing * failing), 4)
            if not 1 - passing < sparsity < 1 - failing:
                return  # the grid of 4 decimals has no level left between them
            record = self.trial(phase, {"sparsity": sparsity, **extra})
            if record is None:
                return
            if self.passed(record):
                passing = 1 - sparsity
            else:
                failing = 1 - sparsity

    def _prune(self, sensitivity: Callable[[], Any]) -> None:
        target = self.params["sparsity"]
        start = min(self._input_sparsity(), target)
        self._bisect("bisect", 1 - start, 1 - target, {})
        if not self.budget.adaptive:
            return
        if self.exhausted() and not any(t["phase"] == "adaptive" for t in self.trials):
            return  # no trial left to spend on it: do not measure the sensitivity
        dense = self._dense_layers(sensitivity())
        if not dense:
            return
        self.progress.log(f"{self.name}: search: adaptive, kept dense: {', '.join(dense)}")
        extra = {"ignore": list(self.params.get("ignore") or []) + dense}
        passing = [t["changes"]["sparsity"] for t in self.trials if self.passed(t) and "sparsity" in t["changes"]]
        lowest = max([start, *passing])
        record = self.trial("adaptive", {"sparsity": target, **extra})
        if record is not None and not self.passed(record):
            self._bisect("adaptive", 1 - lowest, 1 - target, extra)

    def _input_sparsity(self) -> float:
        from compress.sparsity import sparsity_stats

        return float(sparsity_stats(self.template.model)["sparsity"])

    def _dense_layers(self, analysis: Any) -> list[str]:
        """The most sensitive layers, in order, while they hold at most dense_share of the weights."""
        total = sum(entry["weights"] for entry in analysis.layers.values())
        chosen, used = [], 0
        for name in analysis.ranking(f"{self.params['sparsity']:g}"):
            weights = analysis.layers[name]["weights"]
            if analysis.layers[name]["results"][f"{self.params['sparsity']:g}"]["drop"] <= 0:
                break
            if used + weights <= self.budget.dense_share * total:
                chosen.append(name)
                used += weights
        return chosen

    def _quantize(self, sensitivity: Callable[[], Any], first: dict[str, Any]) -> None:
        analysis = sensitivity()
        planned = first["entry"].get("bits") or {}
        level = str(self.params["weight_bits"]) if self.params["weight_bits"] != "auto" else str(
            min(self.params["bits_choices"]))
        order = [n for n in analysis.ranking(level) if n in planned and planned[n] < 8]
        if not order:
            return
        group = self.budget.group or max(1, math.ceil(len(order) / 6))
        user_bits = dict(self.params.get("layer_bits") or {})
        user_skip = list(self.params.get("skip") or [])

        def changes(assigned: dict[str, int]) -> dict[str, Any]:
            """Layer -> bits (FLOAT: skipped); exact names first, as make_plan takes the first matching pattern."""
            out: dict[str, Any] = {"layer_bits": {**{n: b for n, b in assigned.items() if b != FLOAT}, **user_bits}}
            floats = [n for n, b in assigned.items() if b == FLOAT]
            if floats:
                out["skip"] = user_skip + floats
            return out

        found: dict[str, int] | None = None
        for target in (8, FLOAT):  # the most sensitive to 8 bits, a group more a trial; then to float
            for k in range(group, len(order) + group, group):
                assigned = {n: target for n in order[:k]}
                if target == FLOAT:
                    assigned = {**{n: 8 for n in order}, **assigned}
                record = self.trial("to 8 bits" if target == 8 else "to float", changes(assigned))
                if record is None:
                    return
                if self.passed(record):
                    found = assigned
                    break
            if found is not None:
                break
        if found is None:
            return
        # win bits back, least sensitive first, one rung a trial: float -> 8 -> 4 -> the stage's bits
        assigned = dict(found)
        moved = True
        while moved:
            moved = False
            for name in reversed(order):
                if name not in assigned:
                    continue
                rungs = [b for b in (FLOAT, 8, 4) if b > planned[name]] + [planned[name]]
                lower = rungs[rungs.index(assigned[name]) + 1] if assigned[name] != planned[name] else None
                if lower is None:
                    continue
                attempt = dict(assigned)
                if lower == planned[name]:
                    del attempt[name]
                else:
                    attempt[name] = lower
                record = self.trial("win back", changes(attempt))
                if record is None:
                    return
                if self.passed(record):
                    assigned, moved = attempt, True

    # --- the outcome ---------------------------------------------------------------------------------

    def summary(self, best: dict[str, Any] | None, outcome: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "budget": self.budget.model_dump(mode="json"),
            "outcome": outcome,
            "best_trial": best["trial"] if best else None,
            "trials_run_now": len(self.trials) - self.replayed,
            "trials_replayed": self.replayed,
            "seconds": self.spent_seconds(),
            "size_note": "nonzero params x 4 bytes" if self.kind == "prune" else "weights packed at their bits",
            "log": str(self.log_path.relative_to(self.directory.parent.parent.parent)),
            "trials": [{k: v for k, v in t.items() if k != "entry"} | {"passed": self.passed(t)} for t in self.trials],
        }


def search_stage(
    *,
    pass_name: str,
    params: dict[str, Any],
    config_type: Any,
    budget: SearchConfig | None,
    key: str,
    input_state: ModelState,
    run_trial: RunTrial,
    judge: Judge,
    directory: Path,
    sensitivity: Callable[[], Any],
    progress: RunProgress,
    name: str,
    resume: bool = True,
) -> tuple[ModelState, dict[str, Any]]:
    """Run (or continue) the search of one stage; the kept model and its stage entry with `search` added.

    The entry's metric is the kept trial's: the runner judges it like any stage (and fails the run when
    no trial passed)."""
    search = Search(
        pass_name=pass_name, params=params, config_type=config_type, budget=budget or SearchConfig(), key=key,
        run_trial=run_trial, judge=judge, directory=directory, template=input_state, progress=progress, name=name,
        resume=resume,
    )
    search.replayed = len(search.trials)
    search.run(sensitivity)
    best = search.best(True)
    if best is not None:
        outcome = f"passed: trial {best['trial']} of {len(search.trials)} kept"
        state = search.load_best("passing", best)
    else:
        best = search.best(False)
        assert best is not None  # trial 0 always runs on a fresh search (the budget is at least one trial)
        where = search.directory / "best_failing.pt"
        outcome = (f"no trial passed in {len(search.trials)}; the best failing one (trial {best['trial']}, "
                   f"val {best['metric']:.4f}) is saved at {where}")
        state = search.load_best("failing", best)
    entry = dict(best["entry"])
    entry["search"] = search.summary(best, outcome)
    progress.log(f"{name}: search {outcome}")
    return state, entry
