"""The privacy–utility table: emulator recipes side by side, each zero-shot, offsite and plugged in, by size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from coordinator.compression import EmulatorSpec
from coordinator.evaluation.five_settings import (
    RESULTS_SCHEMA,
    Experiment,
    full_finetune,
    measure_offsite,
    model_summary,
    task_config,
    timed_score,
)
from coordinator.evaluation.report import save_figure
from coordinator.models import LoadedModel
from coordinator.tasks import Task
from edge_runtime import __version__
from edge_runtime.data import Example


def run_tradeoff(
    loaded: LoadedModel,
    task: Task,
    train_examples: Sequence[Example],
    test_examples: Sequence[Example],
    experiment: Experiment,
    specs: Sequence[EmulatorSpec],
    validation: Sequence[Example] = (),
    finetune: bool = False,
) -> dict[str, object]:
    """Full zero-shot once (and, with `finetune`, the full fine-tune), then for each recipe: its size, emulator
    zero-shot, offsite on it, plug-in, gap."""
    metric = task.metric
    results: dict[str, object] = {
        "schema": RESULTS_SCHEMA,
        "tool_version": __version__,
        "metric": metric,
        "model": model_summary(loaded),
        "full_zero_shot": timed_score(task, loaded.model, test_examples, experiment.eval_batch_size),
        "recipes": [],
    }
    if finetune:
        print("full fine-tune ...", flush=True)
        results["full_finetune"] = full_finetune(
            task, loaded.model, train_examples, test_examples, experiment, validation
        )
    for spec in specs:
        print(f"emulator {spec.label()} ...", flush=True)
        recipe = replace(experiment, emulator=spec)
        measured = measure_offsite(loaded, task, train_examples, test_examples, recipe, validation=validation)
        plugin, emulator = measured["offsite_plugin"][metric], measured["emulator_zero_shot"][metric]
        results["recipes"].append(measured | {"gap": plugin - emulator})
    results["config"] = {
        "adapter_layers": [experiment.split.bottom, experiment.split.top],
        "adapter_training": asdict(experiment.adapter_training),
        "full_training": asdict(experiment.full_training) if finetune else None,
        "check_every": experiment.check_every,
        "layer_window": experiment.layer_window,
        "eval_batch_size": experiment.eval_batch_size,
        "train_examples": len(train_examples),
        "validation_examples": len(validation),
        "test_examples": len(test_examples),
        **task_config(task),
    }
    return results


def _shown(metric: str, value: float) -> str:
    return f"{100 * value:.1f} %" if metric == "accuracy" else f"{value:.2f}"


def format_tradeoff(results: dict) -> str:
    """One row per recipe: size (middle, compact, % of the full middle), device parameters, the three scores, gap."""
    metric = results["metric"]
    unit = "points" if metric == "accuracy" else "perplexity"
    header = (
        f"{'recipe':<34}{'layers':>7}{'middle':>9}{'device':>9}{'emulator':>10}{'offsite':>10}{'plug-in':>10}"
        f"{'gap':>11}{'build s':>9}"
    )
    lines = [header, f"{'':<34}{'':>7}{'size':>9}{'params':>9}{'0-shot':>10}{'on emu':>10}{'':>10}", "-" * len(header)]
    for row in results["recipes"]:
        emulator = row["emulator"]
        gap = 100 * row["gap"] if metric == "accuracy" else row["gap"]
        lines.append(
            f"{emulator['spec']:<34}{len(emulator['layer_map']):>7}{100 * emulator['middle_fraction']:>8.1f}%"
            f"{emulator['parameters'] / 1e6:>8.1f}M{_shown(metric, row['emulator_zero_shot'][metric]):>10}"
            f"{_shown(metric, row['offsite_emulator'][metric]):>10}{_shown(metric, row['offsite_plugin'][metric]):>10}"
            f"{gap:>+11.1f}{emulator['build_seconds']:>9.0f}"
        )
    finetuned = results.get("full_finetune")
    lines += [
        "",
        *([f"full fine-tune: {_shown(metric, finetuned[metric])}"] if finetuned else []),
        f"full model zero-shot: {_shown(metric, results['full_zero_shot'][metric])}; middle size = the kept middle's "
        f"compact size as a share of the full model's middle; gap = plug-in − emulator zero-shot ({unit}).",
    ]
    return "\n".join(lines)


def plot_tradeoff(results: dict, path: str | Path) -> None:
    """Utility against emulator size: plug-in (filled) and emulator zero-shot (hollow) per recipe; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["metric"]
    scale = 100 if metric == "accuracy" else 1
    figure, axes = plt.subplots(figsize=(8, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    same_size: dict[float, int] = {}
    for index, row in enumerate(results["recipes"]):
        size = 100 * row["emulator"]["middle_fraction"]
        nudge = same_size[round(size, 1)] = same_size.get(round(size, 1), -1) + 1
        size += 0.3 * nudge  # recipes of one size side by side, not on top of each other
        plugin, emulator = scale * row["offsite_plugin"][metric], scale * row["emulator_zero_shot"][metric]
        color = colors[index % len(colors)]
        axes.plot([size, size], [emulator, plugin], color=color, lw=0.8, ls=":")
        axes.scatter([size], [plugin], color=color, s=40, label=row["emulator"]["spec"])
        axes.scatter([size], [emulator], facecolors="none", edgecolors=color, s=40)
    axes.axhline(scale * results["full_zero_shot"][metric], color="k", lw=0.8, ls="--", label="full model zero-shot")
    if "full_finetune" in results:
        axes.axhline(scale * results["full_finetune"][metric], color="k", lw=0.8, ls="-", label="full fine-tune")
    axes.set_xlabel("emulator middle size, % of the full middle (compact storage)")
    if metric == "accuracy":
        axes.set_ylabel("accuracy (%)")
    else:
        axes.set_yscale("log")  # emulators reach perplexities thousands of times the plug-in's
        axes.set_ylabel("perplexity, log scale (lower is better)")
    axes.set_title(f"{results['model']['name']}: plug-in (filled) vs emulator zero-shot (hollow)")
    axes.legend(fontsize=7, loc="best")
    save_figure(figure, path)
