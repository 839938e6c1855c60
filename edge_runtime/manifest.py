"""The bundle manifest and the device's result metrics as typed records, validated field by field when read.

Nothing outside these records reads a manifest or a metrics.json by string key: `Manifest.from_json` (after the
signature verifies) and `read_metrics` are the only ways in, and a malformed field is refused by its dotted name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.memory import ModelShape
from edge_runtime.records import from_dict, json_object, to_dict
from edge_runtime.split_wire import cut_body_bytes

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language-model"
TASK_KINDS = (CLASSIFICATION, LANGUAGE_MODEL)
# Adapter kinds this runtime trains; a bundle naming another is refused before anything loads.
ADAPTER_KINDS = ("layers", "lora", "bias", "prompt")
RESULT_FORMAT = "offsite-edge/result"
RESULT_SCHEMA = 1


@dataclass(frozen=True)
class ModelRecord:
    """The full model the bundle was cut from: its name, sha256 of its source files, layer count."""

    name: str
    sha256: str
    num_layers: int


@dataclass(frozen=True)
class ArchitectureRecord:
    """Module paths of the backbone, head and layer list (coordinator/architectures.py)."""

    model_type: str
    backbone: str
    head: str
    layers: str


@dataclass(frozen=True)
class EmulatorRecord:
    """What an emulator remembers of its source: which full-model layer each of its layers came from, the
    recipe and settings that built it, and what the recipe measured and chose (`details`)."""

    recipe: str
    source_num_layers: int
    layer_map: list[int]
    bottom: int
    top: int
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WindowRecord:
    """One layer window: its emulator layers, the layer it exits after, its trainable ONNX names, graph folder.

    `layers` and `exit` are None for the one window of a bundle without windows (every adapter layer, final exit).
    """

    layers: list[int] | None
    exit: int | None
    parameters: list[str]
    ort: str
    exit_source: int | None = None


@dataclass(frozen=True)
class AdapterRecord:
    """What trains on the device: the kind, its layers, and each trainable ONNX name's full-model name."""

    kind: str
    bottom: int
    top: int
    count: int
    parameters: dict[str, str]
    windows: list[WindowRecord] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the kind's settings, e.g. LoRA's r and alpha

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(
                f"kind = {self.kind!r} is not an adapter kind this runtime trains ({', '.join(ADAPTER_KINDS)}); "
                "upgrade the runtime or export the bundle with one of those"
            )

    def training_windows(self, plain_directory: str) -> list[WindowRecord]:
        """The windows training walks through, bottom first; one window of every parameter if none were exported."""
        if self.windows:
            return self.windows
        return [WindowRecord(None, None, sorted(self.parameters), plain_directory)]


@dataclass(frozen=True)
class TaskRecord:
    """What the device needs to encode its data exactly as the coordinator would."""

    kind: str
    max_length: int
    pad_token_id: int
    eos_token_id: int | None = None
    template: str | None = None
    label_words: dict[str, str] | None = None
    label_token_ids: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind = {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.max_length < 2:
            raise ValueError(f"max_length = {self.max_length} must be at least 2 tokens")
        if self.kind == CLASSIFICATION and (self.template is None or not self.label_token_ids):
            raise ValueError("a classification task needs its template and label_token_ids")
        if self.kind == LANGUAGE_MODEL and self.eos_token_id is None:
            raise ValueError("a language-model task needs its eos_token_id (documents are joined with it)")


@dataclass(frozen=True)
class OptimizerRecord:
    """AdamW as both backends run it."""

    name: str
    eps: float
    weight_decay: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainingRecord:
    """The device's defaults: steps, learning rate and its warm-up, batch, data order seed, checkpoint period."""

    steps: int
    lr: float
    batch_size: int
    warmup_ratio: float
    seed: int
    checkpoint_every: int
    optimizer: OptimizerRecord

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.checkpoint_every) < 1:
            raise ValueError(
                f"steps {self.steps}, batch_size {self.batch_size} and checkpoint_every {self.checkpoint_every} "
                "must each be at least 1"
            )


@dataclass(frozen=True)
class ProfileRecord:
    """The device profile the bundle was planned for (device_profiles/), with its budget in bytes."""

    name: str
    budget_bytes: int
    memory_gb: float
    training_budget_gb: float
    cpu_cores: int
    architecture: str
    execution_providers: list[str]
    onnxruntime_training: bool
    description: str = ""
    peak_fp32_gflops: float | None = None
    accelerator: str | None = None
    aliases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlanRecord:
    """The memory plan for the first backend (micro-batch, predicted peak), and one per exported backend."""

    profile: str
    backend: str
    budget_bytes: int
    batch_size: int
    max_length: int
    micro_batch: int
    margin: float
    shape: ModelShape
    predicted: dict[str, int]
    per_backend: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class FileDigest:
    """One bundle file's sha256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class DPTarget:
    """A job's differential-privacy ask: train within (epsilon, delta)-DP, each example's gradient clipped to
    `clip` (L2). The device sets the noise for its own example count (edge_runtime/privacy.py)."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon = {self.epsilon} must be a positive number (smaller is more private)")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta = {self.delta} must be in (0, 1), well under 1/examples (e.g. 1e-5)")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip = {self.clip} must be a positive L2 norm")


@dataclass(frozen=True)
class SplitRecord:
    """A split bundle's cut: the device holds the embeddings, the soft prompt and the model's first `cut_after`
    layers and exchanges every step with the job's split server; `positions` (prompt plus longest input) and
    `hidden_size` bound what crosses. How the device prunes its data and noises the cut comes with it."""

    cut_after: int
    prompt_tokens: int
    hidden_size: int
    positions: int
    prune_fraction: float = 0.0
    prune_score: str = "el2n"
    cut_dp: DPTarget | None = None
    final_norm: str = "norm"  # the backbone's final norm, an identity on the device side (the cut comes before it)

    def __post_init__(self) -> None:
        if min(self.cut_after, self.prompt_tokens, self.hidden_size) < 1 or self.positions <= self.prompt_tokens:
            raise ValueError(f"cut_after {self.cut_after}, prompt_tokens {self.prompt_tokens} and hidden_size "
                             f"{self.hidden_size} must be at least 1, and positions {self.positions} above the "
                             "prompt's")  # fmt: skip
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction = {self.prune_fraction} must be in [0, 1)")
        if not self.final_norm.isidentifier():
            raise ValueError(f"final_norm = {self.final_norm!r} must name an attribute of the backbone, e.g. 'norm'")

    def max_bytes(self, batch_size: int) -> int:
        """A cut's body at its largest (float32 hidden states, a byte of mask a position): either side's limit."""
        return cut_body_bytes(batch_size, self.positions, self.hidden_size)


@dataclass(frozen=True)
class Manifest:
    """Everything a device reads from a bundle; `signer` and `files` are filled in when the bundle is sealed."""

    format: str
    schema: int
    tool_version: str
    created: str
    model: ModelRecord
    architecture: ArchitectureRecord
    emulator: EmulatorRecord
    adapter: AdapterRecord
    task: TaskRecord
    profile: ProfileRecord
    plan: PlanRecord
    training: TrainingRecord
    backends: list[str]
    export_check: dict[str, Any] | None = None
    privacy: DPTarget | None = None  # differentially private training (DP-SGD) when set
    split: SplitRecord | None = None  # a split bundle: the device side of a split job (edge_runtime/split_job.py)
    signer: str = ""
    files: dict[str, FileDigest] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: bytes | str) -> Manifest:
        """Parse and validate a manifest; RecordError names the first bad field (e.g. `manifest.adapter.kind`)."""
        return from_dict(cls, json_object(text, "manifest"), "manifest")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def size(self) -> int:
        """Bytes of every listed file together."""
        return sum(digest.size for digest in self.files.values())


@dataclass(frozen=True)
class PrivacyRecord:
    """How the adapter's training was privatized; every field empty while training is not differentially private."""

    mechanism: str | None = None
    epsilon: float | None = None  # spent, by the accountant
    delta: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    steps: int | None = None
    sampling_rate: float | None = None
    accountant: str | None = None
    target_epsilon: float | None = None


@dataclass(frozen=True)
class TrainedWindow:
    """A layer window as a result reports it: its emulator layers and the layer it exited after."""

    layers: list[int]
    exit: int


@dataclass(frozen=True)
class AggregateRecord:
    """How an aggregate result was made from device results."""

    method: str  # fedavg, median, trimmed-mean:BETA or krum:f=F
    round: int
    devices: int
    clip_norm: float | None = None  # each device's update was clipped to this L2 norm first


@dataclass(frozen=True)
class ResultMetrics:
    """A result folder's metrics.json: a device's training run, or (with `aggregate`) a round's average of them.

    The fields after `peak_memory_bytes` describe one device run and are None in an aggregate.
    """

    format: str
    schema: int
    model: ModelRecord
    emulator: EmulatorRecord
    backend: str
    steps: int
    samples: int
    examples: int
    first_loss: float
    final_loss: float
    loss_curve: list[float]
    wall_seconds: float
    peak_memory_bytes: int
    tool_version: str = ""
    adapter_kind: str = "layers"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    aggregate: AggregateRecord | None = None
    privacy: PrivacyRecord = field(default_factory=PrivacyRecord)
    bundle: str | None = None
    threads: int | None = None
    start_adapter: str | None = None
    resumed_from_step: int | None = None
    step_seconds_median: float | None = None
    batch_size: int | None = None
    sequence: int | None = None
    micro_batch: int | None = None
    micro_batch_changes: list[dict[str, int]] = field(default_factory=list)
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    peak_memory_sampled_bytes: int | None = None
    layer_windows: list[TrainedWindow] | None = None
    split: dict[str, Any] | None = None  # a split run's report: exchanges, bytes each way, pruning, the cut's ε

    def __post_init__(self) -> None:
        if self.format != RESULT_FORMAT:
            raise ValueError(f"format = {self.format!r} is not {RESULT_FORMAT!r}: it is not an offsite-edge result")
        if self.schema != RESULT_SCHEMA:
            raise ValueError(f"schema = {self.schema} is not {RESULT_SCHEMA}: update the older side")
        if self.examples < 1:
            raise ValueError(f"examples = {self.examples} must be at least 1 (FedAvg weighs results by it)")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def read_metrics(text: bytes | str, where: str = "metrics") -> ResultMetrics:
    """Parse and validate a metrics.json; RecordError names the first bad field."""
    return from_dict(ResultMetrics, json_object(text, where), where)
