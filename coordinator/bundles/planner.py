"""Memory planner: the emulator + adapter's shape, and the largest micro-batch a device profile's budget holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

from coordinator.architectures import spec_for
from coordinator.errors import ConfigError
from device_profiles import DeviceProfile
from edge_runtime.memory import MIB, MemoryEstimate, ModelShape, choose_micro_batch, estimate
from edge_runtime.quantized import QUANTIZED_VALUES
from edge_runtime.soft_prompt import prompt_tokens
from edge_runtime.trainer import PLAN_MARGIN


def model_shape(
    emulator: PreTrainedModel, trainable: dict[str, Any], private: bool = False, recompute: bool = False
) -> ModelShape:
    """Sizes of `emulator` with `trainable` parameters (any mapping whose values are its parameters); `private`:
    trained with DP-SGD, which holds every row's gradient for clipping; `recompute`: layer activations recomputed
    in the backward pass. Weights stored as int8 (edge_runtime/quantized.py) count as frozen, at one byte each."""
    config = emulator.config
    hidden = config.hidden_size
    intermediate = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "ffn_dim", None)
        or getattr(config, "n_inner", None)
        or 4 * hidden
    )
    spec = spec_for(config.model_type)
    layers = emulator.get_submodule(spec.layers)
    trainable_ids = {id(parameter) for parameter in trainable.values()}
    holding = [index for index, layer in enumerate(layers) if any(id(p) in trainable_ids for p in layer.parameters())]
    lowest = min(holding, default=0)  # a soft prompt sits before every layer: the gradient goes through all
    unique = {id(p): p for p in emulator.parameters()}
    trainable_count = sum(p.numel() for key, p in unique.items() if key in trainable_ids)
    stored = {b.data_ptr(): b.numel() for name, b in emulator.named_buffers() if name.endswith(QUANTIZED_VALUES)}
    quantized = sum(stored.values())  # a tied head shares its embedding's int8 rows
    return ModelShape(
        hidden=hidden,
        intermediate=intermediate,
        heads=config.num_attention_heads,
        vocab=config.vocab_size,
        layers=len(layers),
        backprop_layers=len(layers) - lowest,
        frozen_parameters=sum(p.numel() for p in unique.values()) - trainable_count + quantized,
        trainable_parameters=trainable_count,
        prefix_tokens=prompt_tokens(emulator.get_submodule(spec.backbone)),
        per_example_gradients=private,
        quantized_parameters=quantized,
        recompute_layers=recompute,
    )


@dataclass(frozen=True)
class Plan:
    """The chosen micro-batch for a profile's budget, with the predicted peak of every candidate."""

    profile: str
    backend: str
    budget_bytes: int
    batch_size: int
    max_length: int
    kind: str
    micro_batch: int
    shape: ModelShape
    predicted: MemoryEstimate
    margin: float = PLAN_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "backend": self.backend,
            "budget_bytes": self.budget_bytes,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "micro_batch": self.micro_batch,
            "margin": self.margin,
            "shape": self.shape.to_dict(),
            "predicted": self.predicted.to_dict(),
        }


def check_backends(profile: DeviceProfile, backends: tuple[str, ...]) -> None:
    """Refuse a backend the device cannot run, before any work."""
    for backend in backends:
        if backend not in profile.backends:
            raise ConfigError(
                f"profile {profile.name} cannot run the {backend!r} backend (it runs {', '.join(profile.backends)}); "
                "choose from those with --backends"
            )


def make_plan(
    shape: ModelShape, profile: DeviceProfile, backend: str, batch_size: int, max_length: int, kind: str
) -> Plan:
    """Plan training on `profile`; raises BudgetError naming the smallest budget that would do."""
    check_backends(profile, (backend,))
    micro_batch, predicted = choose_micro_batch(
        shape, batch_size, max_length, kind, backend, profile.budget_bytes, PLAN_MARGIN
    )
    budget = profile.budget_bytes
    return Plan(profile.name, backend, budget, batch_size, max_length, kind, micro_batch, shape, predicted)


def format_plan(plan: Plan) -> str:
    """The plan as a Markdown table: the chosen configuration's parts, then every micro-batch's total."""
    lines = [
        f"profile {plan.profile}: budget {plan.budget_bytes / MIB:,.0f} MiB, backend {plan.backend}, "
        f"batch {plan.batch_size} x {plan.max_length} tokens, margin {plan.margin:.0%}",
        "",
        "| part | MiB |",
        "| --- | ---: |",
    ]
    labels = {
        "activations": "activations (a step's transient)",
        "logits": "logits (a step's transient)",
        "per_example_gradients": "DP-SGD's per-example gradients (a step's transient)",
        "checkpoint": "checkpoint write (a transient)",
        "total": "**predicted peak** = resident + "
        + ("both transients (the arena keeps a step's memory)" if plan.predicted.keeps_step_memory else "the larger"),
    }
    for part, size in plan.predicted.to_dict().items():
        lines.append(f"| {labels.get(part, part.replace('_', ' '))} | {size / MIB:,.1f} |")
    lines += ["", "| micro-batch | accumulation | predicted peak MiB | fits |", "| ---: | ---: | ---: | :---: |"]
    for micro in (m for m in range(1, plan.batch_size + 1) if plan.batch_size % m == 0):
        total = estimate(plan.shape, micro, plan.max_length, plan.kind, plan.backend).total
        fits = "yes" if total * (1 + plan.margin) <= plan.budget_bytes else "no"
        chosen = " (chosen)" if micro == plan.micro_batch else ""
        lines.append(f"| {micro}{chosen} | {plan.batch_size // micro} | {total / MIB:,.1f} | {fits} |")
    return "\n".join(lines)
