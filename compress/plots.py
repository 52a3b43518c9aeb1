"""Plots of a run (PNG in DIR/plots), drawn from report.json alone so `compress report` can redraw them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def effective_size_bytes(entry: dict[str, Any]) -> float | None:
    """Bytes the weights need when zeros are not stored: nonzero params at their bit width."""
    if "params_nonzero" not in entry:
        return None
    bits = entry.get("bits")
    width = bits.get("average", 32) if isinstance(bits, dict) else (bits or 32)
    return entry["params_nonzero"] * width / 8


def _log_size_axis(ax: plt.Axes, label: str) -> None:
    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(label)
    ax.margins(x=0.2, y=0.12)  # room for the point labels
    ax.grid(alpha=0.3)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stages(report: dict[str, Any], path: Path) -> Path | None:
    entries = ([("baseline", report["baseline"])] if report.get("baseline") else []) + [
        (s["name"], s) for s in report.get("stages", [])
    ]
    if not entries:
        return None
    names = [n for n, _ in entries]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 4))
    x = range(len(names))
    ax.plot(x, [100 * e.get("metric", float("nan")) for _, e in entries], "o-", label="validation metric")
    ax.plot(x, [100 * e.get("test_metric", float("nan")) for _, e in entries], "s--", label="test metric")
    ax.set_ylabel("metric (%)")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_title("metric and size per stage")
    sizes = ax.twinx()
    sizes.bar(x, [(effective_size_bytes(e) or 0) / 1e3 for _, e in entries], alpha=0.25, color="gray", label="size")
    sizes.set_ylabel("weights without zeros (kB)")
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = sizes.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, loc="lower left", fontsize=8)
    ax.set_zorder(sizes.get_zorder() + 1)
    ax.patch.set_visible(False)
    return _save(fig, path)


def plot_layers(report: dict[str, Any], path: Path) -> Path | None:
    """Per-layer sparsity of the last stage (and bits, where a quantization stage recorded them)."""
    stages = [s for s in report.get("stages", []) if s.get("layer_sparsity")]
    if not stages:
        return None
    stage = stages[-1]
    layers = list(stage["layer_sparsity"])
    bits = stage.get("layer_bits") or {}
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.28 * len(layers) + 1.2)))
    y = range(len(layers))
    ax.barh(list(y), [100 * stage["layer_sparsity"][name] for name in layers], color="tab:blue")
    ax.set_yticks(list(y), layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (% of weights that are zero)")
    ax.set_title(f"per-layer sparsity after stage '{stage['name']}'")
    for i, name in enumerate(layers):
        if name in bits:
            ax.text(101, i, f"{bits[name]} bit", va="center", fontsize=7)
    return _save(fig, path)


def plot_latency(report: dict[str, Any], path: Path) -> Path | None:
    exports = {k: v for k, v in (report.get("export") or {}).items() if (v or {}).get("latency_ms")}
    if not exports:
        return None
    formats = list(exports)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 2.2 * len(formats) + 3), 3.8))
    for ax, batch in zip(axes, ("batch1", "batch64")):
        values = [exports[f]["latency_ms"].get(batch, float("nan")) for f in formats]
        ax.bar(formats, values, color="tab:green")
        ax.set_title(batch.replace("batch", "batch "))
        ax.set_ylabel("median latency (ms)")
        ax.tick_params(axis="x", labelrotation=20)
    threads = next(iter(exports.values()))["latency_ms"].get("threads")
    fig.suptitle("ONNX Runtime latency per export format" + (f" ({threads} threads, CPU)" if threads else ""))
    return _save(fig, path)


def plot_metric_vs_size(report: dict[str, Any], path: Path) -> Path | None:
    points = []
    if report.get("baseline"):
        points.append(("baseline", effective_size_bytes(report["baseline"]), report["baseline"].get("test_metric")))
    for stage in report.get("stages", []):
        points.append((stage["name"], effective_size_bytes(stage), stage.get("test_metric")))
    for fmt, entry in (report.get("export") or {}).items():
        if "size_bytes" in (entry or {}):
            points.append((f"{fmt}.onnx", entry["size_bytes"], entry.get("metric")))
    points = [(n, s, m) for n, s, m in points if s is not None and m is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, size, metric in points:
        marker = "s" if name.endswith(".onnx") else "o"
        ax.scatter(size / 1e3, 100 * metric, marker=marker)
        ax.annotate(name, (size / 1e3, 100 * metric), textcoords="offset points", xytext=(5, 4), fontsize=8)
    _log_size_axis(ax, "size (kB, log scale): stages = nonzero weights, .onnx = file")
    ax.set_ylabel("test metric (%)")
    ax.set_title("metric vs size")
    return _save(fig, path)


def plot_sensitivity(analysis: dict[str, Any], level: str, path: Path, title: str) -> Path:
    """Per-layer metric drop with only that layer pruned/quantized, most sensitive on top (sensitivity.py)."""
    layers = {n: e for n, e in analysis["layers"].items() if level in e["results"]}
    names = sorted(layers, key=lambda n: (-layers[n]["results"][level]["drop"], -layers[n]["results"][level]["kl"]))
    drops = [100 * layers[n]["results"][level]["drop"] for n in names]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(names) + 1.2)))
    y = list(range(len(names)))
    ax.barh(y, drops, color="tab:red")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    right = max(drops + [0.0])
    for i, name in enumerate(names):
        ax.text(right * 1.02 + 0.02, i, f"KL {layers[name]['results'][level]['kl']:.1e}", va="center", fontsize=6)
    ax.set_xlabel(f"validation metric drop (points), only this layer at {analysis['level']} {level}")
    ax.set_title(title)
    return _save(fig, path)


def plot_search(stage: dict[str, Any], path: Path) -> Path | None:
    """A gate search's trials: validation metric vs size, the gate's line, the kept trial starred."""
    search = stage.get("search") or {}
    trials = [t for t in search.get("trials", []) if t.get("size_bytes")]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for passed, color, label in ((True, "tab:green", "passed"), (False, "tab:red", "failed")):
        chosen = [t for t in trials if bool(t["passed"]) == passed]
        if chosen:
            ax.scatter([t["size_bytes"] / 1e3 for t in chosen], [100 * t["metric"] for t in chosen],
                       color=color, label=label, zorder=3)
    for t in trials:
        ax.annotate(str(t["trial"]), (t["size_bytes"] / 1e3, 100 * t["metric"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)
    best = next((t for t in trials if t["trial"] == search.get("best_trial")), None)
    if best is not None:
        ax.scatter([best["size_bytes"] / 1e3], [100 * best["metric"]], marker="*", s=220, color="gold",
                   edgecolor="black", zorder=4, label=f"kept (trial {best['trial']})")
    gate = stage.get("gate") or {}
    floor = [gate["reference_metric"] - gate["max_drop"]] if gate.get("max_drop") is not None else []
    floor += [gate["min_metric"]] if gate.get("min_metric") is not None else []
    if floor:
        ax.axhline(100 * max(floor), color="gray", linestyle="--", label="gate")
    _log_size_axis(ax, f"size (kB, log scale): {search.get('size_note', 'weights')}")
    ax.set_ylabel("validation metric (%)")
    ax.set_title(f"search of stage '{stage['name']}': {len(trials)} trials")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_bits(stage: dict[str, Any], path: Path) -> Path | None:
    """Per-layer weight bits of a mixed-precision stage (float layers drawn at 32)."""
    bits = dict(stage.get("bits") or {})
    floats = stage.get("float_layers") or []
    if not bits or (len(set(bits.values())) < 2 and not floats):
        return None
    layers = [n for n in (stage.get("layer_sparsity") or {}) if n in bits or n in floats] or list(bits) + floats
    values = [bits.get(n, 32) for n in layers]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.28 * len(layers) + 1.2)))
    y = list(range(len(layers)))
    ax.barh(y, values, color=["tab:gray" if v == 32 else "tab:purple" for v in values])
    ax.set_yticks(y, layers, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "float"])
    ax.set_xlabel("weight bits")
    ax.set_title(f"per-layer weight bits after stage '{stage['name']}'")
    return _save(fig, path)


def plot_run(report: dict[str, Any], out: Path) -> list[Path]:
    plots = out / "plots"
    made = [
        plot_stages(report, plots / "stages.png"),
        plot_layers(report, plots / "layers.png"),
        plot_latency(report, plots / "latency.png"),
        plot_metric_vs_size(report, plots / "metric_vs_size.png"),
    ]
    for stage in report.get("stages", []):
        made.append(plot_search(stage, plots / f"search-{stage['name']}.png"))
        made.append(plot_bits(stage, plots / f"bits-{stage['name']}.png"))
    return [p for p in made if p is not None]


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path | None:
    points = [r for r in rows if r.get("size_bytes") and r.get("metric") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in points:
        ax.scatter(row["size_bytes"] / 1e3, 100 * row["metric"])
        ax.annotate(row["run"], (row["size_bytes"] / 1e3, 100 * row["metric"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    _log_size_axis(ax, "deployed size (kB, log scale)")
    ax.set_ylabel("deployed test metric (%)")
    ax.set_title("runs compared")
    return _save(fig, path)
