"""Present five-setting results: a text table, a PNG bar chart, and the JSON file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from coordinator.evaluation.five_settings import SETTINGS
from edge_runtime.files import atomic_path, write_json_atomic


def _value(results: dict, key: str) -> str:
    value = results[key][results["metric"]]
    return f"{100 * value:5.1f} %" if results["metric"] == "accuracy" else f"{value:8.2f}"


def format_table(results: dict) -> str:
    """The five settings as an aligned text table, with train time and trainable parameters where trained."""
    metric = results["metric"]
    lines = [f"{'setting':<22}{metric:>11}{'trainable':>14}{'train s':>10}{'eval s':>9}", "-" * 66]
    for key, title in SETTINGS:
        trained = results[key].get("train")
        trainable = f"{trained['trainable_parameters'] / 1e6:.1f} M" if trained else "-"
        seconds = f"{trained['seconds']:.0f}" if trained else "-"
        lines.append(
            f"{title:<22}{_value(results, key):>11}{trainable:>14}{seconds:>10}{results[key]['eval_seconds']:>9.0f}"
        )
    config, parameters = results["config"], results["parameters"]
    lines.append("")
    lines.append(
        f"model {results['model']['name']} ({parameters['full'] / 1e6:.1f} M params, "
        f"{results['model']['layers']} layers); "
        f"emulator {len(config['emulator_layers'])} layers ({parameters['emulator'] / 1e6:.1f} M); "
        f"adapter {config['adapter_layers'][0]}+{config['adapter_layers'][1]} layers; "
        f"{config['test_examples']} test examples"
    )
    device = results["offsite_emulator"]["train"]
    if device.get("on_device"):
        lines.append(
            f"offsite adapter trained on a device: {device['backend']} backend, {device['steps']} steps, "
            f"{device['samples']} samples, peak memory {device['peak_memory_bytes'] / 2**20:,.0f} MiB"
        )
    return "\n".join(lines)


def plot_results(results: dict, path: str | Path) -> None:
    """Bar chart of the five settings, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["metric"]
    scale = 100 if metric == "accuracy" else 1
    titles = [title for _, title in SETTINGS]
    values = [scale * results[key][metric] for key, _ in SETTINGS]
    colors = ["#9e9e9e", "#bdbdbd", "#1f77b4", "#ff7f0e", "#2ca02c"]
    figure, axes = plt.subplots(figsize=(8, 4.2))
    bars = axes.bar(titles, values, color=colors)
    axes.bar_label(bars, fmt="%.1f")
    axes.set_ylabel("accuracy (%)" if metric == "accuracy" else "perplexity (lower is better)")
    if metric == "accuracy":
        chance = 100 / len(results["config"]["label_words"])
        axes.axhline(chance, color="k", lw=0.8, ls=":")
        axes.annotate(f"chance {chance:.0f} %", (-0.45, chance + 1), fontsize=8)
        axes.set_ylim(0, 105)
    axes.set_title(f"Offsite tuning, {results['model']['name']}: five settings")
    axes.tick_params(axis="x", labelsize=9)
    save_figure(figure, path)


def save_figure(figure: object, path: str | Path) -> None:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def write_results(results: dict, path: str | Path, plot: Callable[[dict, Path], None] = plot_results) -> Path:
    """Write results JSON and its PNG chart (drawn by `plot`) beside it, same stem; returns the PNG path."""
    path = Path(path)
    write_json_atomic(path, results)
    chart = path.with_suffix(".png")
    plot(results, chart)
    return chart
