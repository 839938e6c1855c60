"""The head-to-head section of BENCHMARKS.md and its plot, from bench.head_to_head's results."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.markdown import save_figure

PLOT = Path(__file__).resolve().parent / "results" / "head_to_head.png"
MIB = 2**20
# Reported by the papers against full (vanilla) fine-tuning: (throughput ×, memory ÷).
PAPERS = {"Offsite-Tuning (OPT-1.3B, GPU)": (6.5, 5.6), "Edge-LLM (GPU)": (2.9, 4.0)}


def _tokens_per_second(result: dict, backend: str | None = None) -> float:
    seconds = result["backends"][backend]["step_seconds_median"] if backend else result["step_seconds_median"]
    return result["tokens"]["tokens_per_step"] / seconds


def _peak(result: dict, backend: str | None = None) -> int:
    return result["backends"][backend]["peak_memory_bytes"] if backend else result["peak_memory_bytes"]


def _first_at(curve: list, target: float) -> int | None:
    return next((step for step, accuracy in curve if accuracy >= target), None)


def _time_to_target(result: dict, target: float, seconds_per_step: float) -> str:
    step = _first_at(result["curve"], target)
    if step is None:
        return f"not in {result['curve'][-1][0]} steps"
    return f"{step * seconds_per_step:,.0f} s ({step} steps)"


def speed_ratio(result: dict, backend: str) -> float:
    """Median of the paired tokens/s ratios (this run ÷ its round's full fine-tuning run)."""
    return statistics.median(result["backends"][backend]["speed_ratios"])


def memory_ratio(result: dict, backend: str) -> float:
    """Median of the paired peak-memory ratios (its round's full fine-tuning run ÷ this run)."""
    return statistics.median(result["backends"][backend]["memory_ratios"])


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def _speed_table(results: dict, target: float) -> list[str]:
    full = results["full"]
    full_speed, full_peak = _tokens_per_second(full), _peak(full)
    lines = [
        "| configuration | trainable | backend | tokens/s | × full (range) | peak MiB | full ÷ this (range) "
        "| time to target |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| full fine-tuning | {full['shape']['trainable_parameters'] / 1e6:.1f} M | torch | {full_speed:,.0f} | 1.00× "
        f"| {full_peak / MIB:,.0f} | 1.00× | {_time_to_target(full, target, full['step_seconds_median'])} |",
    ]
    for result in results["offsite"]:
        for backend, run in result["backends"].items():
            speed, peak = _tokens_per_second(result, backend), _peak(result, backend)
            mark = _remeasured_mark(results, result)
            lines.append(
                f"| {result['label']}{mark} | {_count(result['shape']['trainable_parameters'])} | {backend} "
                f"| {speed:,.0f} | {_spread(run['speed_ratios'])} | {peak / MIB:,.0f} "
                f"| {_spread(run['memory_ratios'])} | {_time_to_target(result, target, run['step_seconds_median'])} |"
            )
    return lines


def _utility_table(results: dict) -> list[str]:
    steps = [step for step, _ in results["full"]["curve"]]
    lines = [
        "| configuration | " + " | ".join(f"step {step}" for step in steps) + " | best |",
        "| --- | " + " | ".join("---:" for _ in steps) + " | ---: |",
    ]
    for label, result in [("full fine-tuning", results["full"])] + [(r["label"], r) for r in results["offsite"]]:
        accuracies = [accuracy for _, accuracy in result["curve"]]
        cells = " | ".join(f"{accuracy:.1%}" for accuracy in accuracies)
        lines.append(f"| {label} | {cells} | {max(accuracies):.1%} |")
    return lines


def _floor_table(results: dict) -> list[str]:
    lines = [
        "| configuration | weights | trainable state | activations | floor | measured ORT | measured torch "
        "| ORT ÷ floor | torch ÷ floor | bundle MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    full = results["full"]
    floor = full["floor"]
    lines.append(
        f"| full fine-tuning | {floor['weights'] / MIB:,.0f} | {floor['trainable_state'] / MIB:,.0f} "
        f"| {floor['activations'] / MIB:,.0f} | {floor['total'] / MIB:,.0f} | | {_peak(full) / MIB:,.0f} | "
        f"| {_peak(full) / floor['total']:.2f}× | |"
    )
    for result in results["offsite"]:
        floor, ort, torch = result["floor"], _peak(result, "ort"), _peak(result, "torch")
        lines.append(
            f"| {result['label']} | {floor['weights'] / MIB:,.0f} | {floor['trainable_state'] / MIB:,.0f} "
            f"| {floor['activations'] / MIB:,.0f} | {floor['total'] / MIB:,.0f} | {ort / MIB:,.0f} "
            f"| {torch / MIB:,.0f} "
            f"| {ort / floor['total']:.2f}× | {torch / floor['total']:.2f}× | {result['bundle_bytes'] / MIB:,.0f} |"
        )
    return lines


def _profile_table(results: dict) -> list[str]:
    full = results["full"]["profile"]
    lines = [
        "| configuration | forward s | backward s | optimizer s | step s | full ÷ this |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("full fine-tuning", full)] + [(r["label"], r["profile"]) for r in results["offsite"]]
    for label, profile in rows:
        step = profile["forward_seconds"] + profile["backward_seconds"] + profile["optimizer_seconds"]
        full_step = full["forward_seconds"] + full["backward_seconds"] + full["optimizer_seconds"]
        lines.append(
            f"| {label} | {profile['forward_seconds']:.2f} | {profile['backward_seconds']:.2f} "
            f"| {profile['optimizer_seconds']:.2f} | {step:.2f} | {full_step / step:.2f}× |"
        )
    return lines


def _remeasuring_commands(results: dict) -> list[str]:
    """The commands of later `--only` runs, in the order their rows first appear."""
    commands = [result["remeasured"]["command"] for result in results["offsite"] if "remeasured" in result]
    return list(dict.fromkeys(commands))


def _remeasured_mark(results: dict, result: dict) -> str:
    if "remeasured" not in result:
        return ""
    return f" †{_remeasuring_commands(results).index(result['remeasured']['command']) + 1}"


def _remeasured_note(results: dict) -> list[str]:
    """Which rows later `--only` runs measured again, with the full fine-tuning runs each run paired them with."""
    lines = []
    for number, command in enumerate(_remeasuring_commands(results), 1):
        again = next(r["remeasured"] for r in results["offsite"] if r.get("remeasured", {}).get("command") == command)
        lines.append(
            f"†{number} Measured again, after the rest, by `{command}`: {again['pairs']} rounds paired with full "
            f"fine-tuning runs of their own (median {again['full']['peak_memory_bytes'] / MIB:,.0f} MiB, "
            f"{again['full']['step_seconds_median']:.2f} s/step); the ratios are to those runs."
        )
    return ["", *"\n\n".join(lines).split("\n")] if lines else []


def _against_papers(results: dict) -> list[str]:
    speed = max((speed_ratio(r, b), r["label"], b) for r in results["offsite"] for b in r["backends"])
    memory = max((memory_ratio(r, b), r["label"], b) for r in results["offsite"] for b in r["backends"])
    lines = [
        f"- Best throughput ratio here: **{speed[0]:.2f}×** ({speed[1]}, {speed[2]}); "
        f"best memory ratio: **{memory[0]:.2f}×** ({memory[1]}, {memory[2]})."
    ]
    for paper, (paper_speed, paper_memory) in PAPERS.items():
        lines.append(
            f"- {paper}: {paper_speed}× throughput, {paper_memory}× less memory. Here throughput is "
            f"{_relative(speed[0], paper_speed)}, memory {_relative(memory[0], paper_memory)}."
        )
    return lines


def _relative(ours: float, theirs: float) -> str:
    """'1.8× theirs' when ours is larger, 'short of theirs by 1.5×' when smaller."""
    return f"{ours / theirs:.2f}× theirs" if ours >= theirs else f"short of theirs by {theirs / ours:.2f}×"


def _plot(results: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsite, full = results["offsite"], results["full"]
    labels = ["full"] + [r["label"].replace(" · ", "\n").replace(" keep", "\nkeep") for r in offsite]
    x = list(range(len(labels)))
    figure, (speed_axes, memory_axes, curve_axes) = plt.subplots(1, 3, figsize=(17, 4.8))
    for offset, backend in ((-0.2, "ort"), (0.2, "torch")):
        speeds = [_tokens_per_second(full) if backend == "torch" else 0]
        speeds += [_tokens_per_second(r, backend) for r in offsite]
        peaks = [_peak(full) / MIB if backend == "torch" else 0] + [_peak(r, backend) / MIB for r in offsite]
        speed_axes.bar([i + offset for i in x], speeds, 0.4, label=backend)
        memory_axes.bar([i + offset for i in x], peaks, 0.4, label=f"measured, {backend}")
    floors = [r["floor"]["total"] / MIB for r in [full, *offsite]]
    memory_axes.scatter(x, floors, marker="_", s=700, color="black", label="floor")
    for axes, title in ((speed_axes, "training tokens/s (median)"), (memory_axes, "peak memory, MiB (whole process)")):
        axes.set_xticks(x, labels, fontsize=7)
        axes.set_title(title)
        axes.legend(fontsize=8)
    for label, result, seconds in [("full (torch)", full, full["step_seconds_median"])] + [
        (r["label"] + " (ort)", r, r["backends"]["ort"]["step_seconds_median"]) for r in offsite
    ]:
        steps, accuracies = zip(*result["curve"], strict=True)
        curve_axes.plot([s * seconds for s in steps], accuracies, marker="o", label=label)
    curve_axes.axhline(target, color="black", linestyle=":", label="target")
    curve_axes.set_xlabel("training seconds on this CPU")
    curve_axes.set_title("plug-in accuracy (full fine-tune: its own)")
    curve_axes.legend(fontsize=7)
    figure.suptitle(f"SmolLM2-135M, sentiment, batch {results['batch_size']}: offsite tuning vs full fine-tuning")
    figure.tight_layout()
    save_figure(figure, PLOT)


def _count(parameters: int) -> str:
    return f"{parameters / 1e6:.1f} M" if parameters >= 1e6 else f"{parameters / 1e3:,.1f} k"


def _other_rates(results: dict) -> str:
    """A sentence naming the rows that train at another learning rate (the small adapter kinds)."""
    other = [r for r in results["offsite"] if r.get("lr", results["lr"]["adapter"]) != results["lr"]["adapter"]]
    if not other:
        return ""
    rows = ", ".join(f"{r['label']} at {r['lr']:g}" for r in other)
    return (
        f" The LoRA, bias and prompt rows train only their branches, bias terms or prompt vectors, at a larger "
        f"step: {rows} (their common default, not tuned here)."
    )


def report(results: dict) -> str:
    """The Markdown section: speed and memory, utility, memory floor, step profile, and the papers' figures."""
    curve = results["curve"]
    target = curve["zero_shot"] + 0.02
    _plot(results, target)
    lines = [
        "## Offsite tuning vs full fine-tuning on the device",
        "",
        f"Command: `{results['command']}` (part of `make bench`).",
        f"Machine: {results['machine']}.",
        "",
        f"SmolLM2-135M (30 layers), movie-review sentiment, batch {results['batch_size']}, length cap "
        f"{results['max_length']} tokens, every run on the same batch stream. Offsite rows train a bundle with "
        "`edge-runtime train` (ORT with torch blocked, and the PyTorch backend); full fine-tuning trains every weight "
        "with the same graph, loss, batches and AdamW settings (`bench/profiled_training.py`). Each run is its own "
        f"process of {results['steps']} steps; peak memory is the whole process's high-water mark; tokens/s counts "
        f"real (unpadded) tokens. The runs are interleaved in {results['pairs']} rounds (full fine-tuning, then every "
        "offsite configuration on both backends); tokens/s and peak MiB are medians over the rounds, and the ratios "
        "are the medians (and ranges) of each run against its own round's full fine-tuning run.",
        "",
        f"Time to target: target = full zero-shot + 2 points = {target:.1%} on the first {curve['test_examples']} "
        f"test reviews. Learning curves are trained here in PyTorch with the device's schedule (adapter lr "
        f"{results['lr']['adapter']:g} through the bundle's own emulator, full lr {results['lr']['full']:g}), "
        f"scored every {curve['every']} steps; time = the first step at or above target × that backend's median "
        "s/step." + _other_rates(results),
        "",
        *_speed_table(results, target),
        *_remeasured_note(results),
        "",
        "Plug-in accuracy (the adapter in the full model) along training:",
        "",
        *_utility_table(results),
        "",
        "Physical floor (MiB; see `bench/floor.py`) beside what each run used:",
        "",
        *_floor_table(results),
        "",
        "Where a step's time goes (PyTorch, one profiled run each, median seconds per phase):",
        "",
        *_profile_table(results),
        "",
        *_against_papers(results),
        "",
        "![offsite vs full fine-tuning](bench/results/head_to_head.png)",
    ]
    return "\n".join(lines)
