"""Benchmark: plug-in accuracy on movie-review sentiment of bias and LoRA adapters trained with DP-SGD at ε = 1, 3, 8.

Each private run is `bench.adapter_kinds`' run of the kind (same emulator, split, 400 steps, 600 validation
reviews, the step kept chosen on them) with DP-SGD as a `--dp epsilon=E` bundle trains on the device: Poisson
batches of 8 expected reviews, each review's gradient clipped to C = 1, Gaussian noise, δ = 1e-5. The learning
rate is the one `bench.adapter_kinds` chose on validation for the non-private kind (not re-tuned per ε: each run
is ~20 minutes on 2 cores); ε = ∞ is that non-private run itself. The full model's zero-shot and fine-tune are
`bench.five_settings`' numbers, as in `bench.adapter_kinds`.

Run from the repository root: `python -m bench.privacy_accuracy [--kind SPEC ...] [--epsilon E ...]` (one results
file per kind and ε, so they can run in parallel processes); `--report-only` rewrites the BENCHMARKS.md section
and the plot from the saved results. `bench.adapter_kinds` must have run first for bias and LoRA.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

from bench import adapter_kinds
from bench.markdown import machine_line, measured_or_saved, save_figure, write_section
from coordinator.datasets import prepare_datasets
from edge_runtime.manifest import DPTarget

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "privacy_accuracy"
PLOT = REPO / "bench" / "results" / "privacy_accuracy.png"
KINDS = ("lora:r=8", "bias")
EPSILONS = (1.0, 3.0, 8.0)
DELTA, CLIP = 1e-5, 1.0


def _out(kind: str, epsilon: float) -> Path:
    return RESULTS / (re.sub(r"[^A-Za-z0-9]+", "_", f"{kind} epsilon {epsilon:g}").strip("_") + ".json")


def _saved(kind: str) -> dict[float, dict]:
    return {e: json.loads(_out(kind, e).read_text()) for e in EPSILONS if _out(kind, e).is_file()}


def non_private(kind: str) -> dict:
    """`bench.adapter_kinds`' saved run of `kind` at the rate it chose on validation (the first listed wins ties)."""
    runs = [adapter_kinds._out(kind, lr) for lr in adapter_kinds.KINDS[kind]]
    if not all(path.is_file() for path in runs):
        raise SystemExit(f"run `python -m bench.adapter_kinds --kind {kind}` first: {runs} are its results")
    return max((json.loads(path.read_text()) for path in runs), key=adapter_kinds._validation_best)


def measure(kind: str, epsilon: float, steps: int) -> dict:
    lr = non_private(kind)["lr"]
    print(f"{kind} at epsilon {epsilon:g}: lr {lr:g} (chosen without DP on validation), {steps} steps", flush=True)
    return adapter_kinds.measure(kind, lr, steps, DPTarget(epsilon, DELTA, CLIP)) | {"epsilon": epsilon}


def _accuracy(results: dict) -> tuple[float, float, int]:
    """Plug-in and tuned-emulator test accuracy (%) and the step kept on validation."""
    kept = results["offsite_emulator"]["train"]["selection"]["best_step"]
    return 100 * results["offsite_plugin"]["accuracy"], 100 * results["offsite_emulator"]["accuracy"], kept


def _plot(private: dict[str, dict[float, dict]], reference: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for kind, runs in private.items():
        epsilons = sorted(runs)
        # ∞ drawn one step past the largest ε, labelled as such
        positions = list(range(len(epsilons) + 1))
        values = [_accuracy(runs[e])[0] for e in epsilons] + [_accuracy(non_private(kind))[0]]
        axes.plot(positions, values, marker="o", label=f"{kind} plug-in")
        axes.set_xticks(positions, [f"{e:g}" for e in epsilons] + ["∞ (no DP)"])
    for key, style, label in (("full_zero_shot", ":", "full zero-shot"), ("full_finetune", "--", "full fine-tune")):
        axes.axhline(100 * reference[key]["accuracy"], color="black", linestyle=style, label=label)
    axes.set_xlabel(f"ε (δ = {DELTA:g}, C = {CLIP:g})")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("DP-SGD on the device: plug-in accuracy against the privacy budget")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, PLOT)


def _reading(private: dict[str, dict[float, dict]], zero_shot: float) -> str:
    """What the table says, from its own numbers: each kind's gain over zero-shot with and without DP."""
    parts, flat = [], []
    for kind, runs in private.items():
        gains = [_accuracy(runs[e])[0] - zero_shot for e in sorted(runs)]
        plain = _accuracy(non_private(kind))[0] - zero_shot
        labels, epsilons = ", ".join(f"{g:+.1f}" for g in gains), ", ".join(f"{e:g}" for e in sorted(runs))
        parts.append(f"`{kind}` plugs in {labels} points over zero-shot at ε = {epsilons}, {plain:+.1f} without DP")
        flat += [f"`{kind}`"] if plain <= 0 else []
    text = "Reading: " + "; ".join(parts) + ". The ε covers all the run's steps, so every checkpoint (the one kept "
    text += "included) is released within it."
    if flat:
        text += (f" {' and '.join(flat)} does not beat zero-shot through this emulator even without DP, so the "
                 "noise is not what holds it back.")  # fmt: skip
    return text


def report(private: dict[str, dict[float, dict]]) -> str:
    reference = adapter_kinds._whole_layers()
    lines = [
        "## Differential privacy on the device: plug-in accuracy against ε",
        "",
        "Command: `python -m bench.privacy_accuracy` (ε = ∞ is `python -m bench.adapter_kinds`' run of the kind).",
        f"Machine: {machine_line()}.",
        "",
        f"SmolLM2-135M, emulator `{adapter_kinds._spec()}`, 2+2 adapter layers, "
        f"{reference['config']['adapter_training']['steps']} steps of DP-SGD as a `--dp` bundle trains on the "
        f"device (Poisson batches of 8 expected reviews, each review's gradient clipped to C = {CLIP:g}, Gaussian "
        f"noise σ·C, δ = {DELTA:g}, σ from dp-accounting's RDP accountant for the planned steps and sampling rate); "
        f"the step kept is the plug-in's best on {adapter_kinds.VALIDATION} validation reviews carved from the "
        f"training file; accuracy (%) on all {reference['config']['test_examples']:,} test reviews. The learning "
        "rate is the one chosen on validation without DP (`bench.adapter_kinds`), not re-tuned per ε. Full "
        f"zero-shot {100 * reference['full_zero_shot']['accuracy']:.1f} %, full fine-tune "
        f"{100 * reference['full_finetune']['accuracy']:.1f} %.",
        "",
        "| adapter | ε | σ | ε spent | lr | step kept | tuned emulator | plug-in | plug-in − zero-shot |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    zero_shot = 100 * reference["full_zero_shot"]["accuracy"]
    curves = ["", "The plug-in on the validation reviews every 50 steps (%), from which the step is chosen:", ""]
    for kind, runs in private.items():
        for epsilon in sorted(runs):
            results = runs[epsilon]
            privacy = results["offsite_emulator"]["train"]["privacy"]
            plugin, emulator, kept = _accuracy(results)
            lines.append(
                f"| {kind} | {epsilon:g} | {privacy['noise_multiplier']:.3f} | {privacy['epsilon']:.2f} | "
                f"{results['lr']:g} | {kept} | {emulator:.1f} | {plugin:.1f} | {plugin - zero_shot:+.1f} |"
            )
            curve = results["offsite_emulator"]["train"]["selection"]["validation_curve"]
            curves.append(f"- {kind}, ε {epsilon:g}: " + ", ".join(f"{100 * value:.1f}" for _, value in curve))
        plain = non_private(kind)
        plugin, emulator, kept = _accuracy(plain)
        lines.append(
            f"| {kind} | ∞ (no DP) | 0 | — | {plain['lr']:g} | {kept} | {emulator:.1f} | {plugin:.1f} | "
            f"{plugin - zero_shot:+.1f} |"
        )
    reading = [
        "",
        _reading(private, zero_shot),
        "",
        "A kept step of 0 means no trained checkpoint beat the untrained adapter on validation; the untrained "
        "adapter is a no-op for LoRA and bias, so the plug-in is then the full model's zero-shot. DP runs draw "
        "their batches and noise from the operating system's randomness (as the device does), so a rerun differs.",
        "",
        "![accuracy against epsilon](bench/results/privacy_accuracy.png)",
    ]
    _plot(private, reference)
    return "\n".join(lines + curves + reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", action="append", choices=KINDS, help="default: bias and LoRA")
    parser.add_argument("--epsilon", type=float, action="append", choices=EPSILONS, help="default: 1, 3 and 8")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the saved results")
    args = parser.parse_args()
    prepare_datasets()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind in [] if args.report_only else args.kind or KINDS:
        for epsilon in args.epsilon or EPSILONS:
            run = functools.partial(measure, kind, epsilon, args.steps)
            measured_or_saved(_out(kind, epsilon), "bench.privacy_accuracy", False, run)
    saved = {kind: _saved(kind) for kind in KINDS}
    write_section("privacy_accuracy", report({kind: runs for kind, runs in saved.items() if runs}))


if __name__ == "__main__":
    main()
