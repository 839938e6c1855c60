"""How long a training step takes on a device: a FLOP count of the step, over the device's measured throughput."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from device_profiles import DeviceProfile
from edge_runtime.memory import ModelShape

# Before a device has returned a result, its throughput is its profile's matmul peak (`edge-runtime profile`
# measures it) times this. Measured on the development machine (2 x86-64 cores, numpy matmul 197 GFLOP/s): the
# default SmolLM2 bundle, batch 32 of 75 tokens, trained at 183 GFLOP/s on ONNX Runtime and 145 on PyTorch
# (bench.device_training, 2 GiB rows; FLOPs counted by `step_flops`): 0.93 and 0.73 of the peak.
PRIOR_EFFICIENCY = 0.75
ASSUMED_PEAK_GFLOPS = 50.0  # a profile that states no peak: a small Arm board's worth, on the safe side


def step_flops(shape: ModelShape, batch_size: int, sequence: int, kind: str) -> float:
    """Floating-point operations of one optimizer step: forward through every layer, backward through those below
    the highest layer that trains down to the lowest (input gradients), weight gradients for what trains, one more
    forward of those layers with `recompute_layers`. Embedding lookups cost nothing; an untied head's weights are
    counted as layer weights (a small overestimate)."""
    tokens = sequence + shape.prefix_tokens
    layer_weights = (shape.frozen_parameters + shape.trainable_parameters - shape.vocab * shape.hidden) / shape.layers
    attention = 4 * tokens * shape.hidden  # scores and the weighted sum, per token and layer
    forward = shape.layers * (2 * layer_weights + attention)
    backprop = shape.backprop_layers * (2 * layer_weights + 2 * attention)
    recompute = shape.backprop_layers * (2 * layer_weights + attention) if shape.recompute_layers else 0
    head_rows = 1 if kind == "classification" else tokens  # a classifier reads the last position's logits only
    head = 4 * shape.vocab * shape.hidden * head_rows / tokens  # forward and the input gradient
    per_token = forward + backprop + recompute + 2 * shape.trainable_parameters + head
    return per_token * tokens * batch_size


@dataclass(frozen=True)
class Throughput:
    """A device's training throughput in GFLOP/s and where the number came from."""

    gflops: float
    source: str  # "measured: JOB round N" or "profile peak × efficiency"

    def step_seconds(self, flops: float) -> float:
        return flops / (self.gflops * 1e9)


def prior_throughput(profile: DeviceProfile) -> Throughput:
    """The profile's throughput before any measurement."""
    if profile.peak_fp32_gflops is None:
        return Throughput(ASSUMED_PEAK_GFLOPS * PRIOR_EFFICIENCY, f"assumed {ASSUMED_PEAK_GFLOPS:g} GFLOP/s peak")
    return Throughput(profile.peak_fp32_gflops * PRIOR_EFFICIENCY, f"profile peak × {PRIOR_EFFICIENCY:g}")


def measured_throughput(task: dict[str, Any], configuration: dict[str, Any]) -> Throughput | None:
    """A device's throughput from one of its results (a registry task row) of a per-device job, whose
    `configuration` recorded the shape it trained; None when the result lacks a step time."""
    metrics = task.get("metrics") or {}
    seconds, sequence = metrics.get("step_seconds_median"), metrics.get("sequence")
    if not seconds or not sequence or "shape" not in configuration:
        return None
    shape = ModelShape(**configuration["shape"])
    flops = step_flops(shape, metrics.get("batch_size") or configuration["batch_size"], sequence, configuration["task"])
    return Throughput(flops / seconds / 1e9, f"measured: {task['job']} round {task['round']}")
