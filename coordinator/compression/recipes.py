"""Emulator recipes behind one Protocol, the `NAME[:key=value,...]` spec that picks one, and `make_emulator`."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Protocol

from safetensors import SafetensorError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.architectures import decoder_layers
from coordinator.compression.calibration import Calibration, load_calibration, log_probs, prediction_fingerprint
from coordinator.compression.distill import DistillConfig, distill
from coordinator.compression.greedy import select_greedy
from coordinator.compression.harmonize import HarmonizeConfig, fit_harmonizers
from coordinator.compression.importance import select_important
from coordinator.compression.lowrank import compress_low_rank
from coordinator.compression.luc import FLOAT_BITS, bake, compress_layerwise
from coordinator.compression.share import MODES, build_shared
from coordinator.compression.storage import FLOAT32, store_frozen
from coordinator.emulator import Split, build_emulator, emulator_record, set_emulator_record
from coordinator.errors import ConfigError, DataError
from coordinator.models import cache_root
from edge_runtime.files import atomic_directory
from edge_runtime.low_rank import load_causal_lm
from edge_runtime.quantized import STORAGE_KINDS

# Bump when distillation or harmonizer fitting changes what they produce, so cached trained emulators miss.
TRAINED_FORMAT = 2
RECIPES = ("uniform", "importance", "greedy", "share", "luc", "lowrank")
SELECTIONS = ("uniform", "importance", "greedy")
SELECTORS = {
    "importance": select_important,
    "greedy": lambda model, split, calibration: select_greedy(model, split, calibration, cache_root() / "selection"),
}


class EmulatorRecipe(Protocol):
    """Turns a full model's middle into a frozen emulator; `build` may leave parametrizations for distillation."""

    name: str
    needs_calibration: bool

    def build(
        self, model: PreTrainedModel, split: Split, calibration: Calibration | None
    ) -> tuple[PreTrainedModel, dict[str, object]]:
        """The emulator and what the recipe measured and chose."""
        ...


def _selected(
    model: PreTrainedModel, split: Split, calibration: Calibration | None, select: str, recipe: str
) -> tuple[PreTrainedModel, dict[str, object]]:
    if select in SELECTORS:
        middle, details = SELECTORS[select](model, split, calibration)
        return build_emulator(model, split, middle, recipe), details | {"select": select}
    return build_emulator(model, split, recipe=recipe), {"select": select}


@dataclass(frozen=True)
class UniformDrop:
    """Keep `keep` evenly spaced middle layers (Offsite-Tuning's baseline)."""

    name: str = "uniform"
    needs_calibration: bool = False

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        return build_emulator(model, split), {}


@dataclass(frozen=True)
class ImportanceDrop:
    """Keep the `keep` middle layers whose removal moves the predictions most (ScaleOT-style importance)."""

    name: str = "importance"
    needs_calibration: bool = True

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        return _selected(model, split, calibration, "importance", self.name)


@dataclass(frozen=True)
class GreedyDrop:
    """Remove middle layers one at a time, each the one whose removal moves the predictions least so far."""

    name: str = "greedy"
    needs_calibration: bool = True

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        return _selected(model, split, calibration, "greedy", self.name)


@dataclass(frozen=True)
class SharedLayers:
    """Cluster adjacent middle layers by how alike their updates are; each cluster's medoid runs in all its
    positions (mode share, CRaSh) or once (mode drop)."""

    mode: str
    name: str = "share"
    needs_calibration: bool = True

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        return build_shared(model, split, calibration, self.mode)


@dataclass(frozen=True)
class LayerwiseCompression:
    """Select layers, then prune and fake-quantize each by its sensitivity to a compact-size target (Edge-LLM)."""

    size: float
    select: str = "uniform"
    name: str = "luc"
    needs_calibration: bool = True

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        emulator, details = _selected(model, split, calibration, self.select, self.name)
        return emulator, details | compress_layerwise(emulator, split, calibration, self.size)


@dataclass(frozen=True)
class LowRank:
    """Select layers, then factorize their weight matrices by activation-aware SVD (ScaleOT-style)."""

    energy: float | None
    size: float | None
    select: str = "uniform"
    name: str = "lowrank"
    needs_calibration: bool = True

    def build(self, model: PreTrainedModel, split: Split, calibration: Calibration | None) -> tuple:
        emulator, details = _selected(model, split, calibration, self.select, self.name)
        return emulator, details | compress_low_rank(emulator, split, calibration, self.energy, self.size)


@dataclass(frozen=True)
class EmulatorSpec:
    """A recipe and its settings, written `NAME[:key=value,...]`, e.g. `luc:keep=26,size=0.15,distill=200`.

    keep: middle layers kept (default: the command's --keep); size: luc's compact size or lowrank's weight
    fraction of the kept layers; energy: lowrank's Σσ² fraction; select: uniform|importance|greedy (luc, lowrank);
    distill: distillation steps (default: the command's --distill); harmonize: rank of the harmonizer fitted in
    place of each run of removed layers (any recipe that removes layers; 0 = none); mode: share's share (the
    kept layer of each cluster runs in all its positions, the default) or drop (it runs once); store: how the
    device holds the frozen matrices, float32 (default) or int8 (a scale per row, dequantized where used).

    >>> EmulatorSpec.parse("luc:size=0.25,keep=12").label()
    'luc:keep=12,size=0.25'
    """

    recipe: str = "uniform"
    keep: int | None = None
    size: float | None = None
    energy: float | None = None
    select: str = "uniform"
    distill: int = 0
    harmonize: int = 0
    mode: str | None = None
    calibration: str | None = None  # public text (.jsonl, .csv, .txt) to measure and distill on; default Wikipedia
    store: str = FLOAT32  # how the device holds the frozen matrices: float32, or int8 (coordinator/compression/storage)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"emulator recipe {self.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
        if self.select not in SELECTIONS:
            raise ConfigError(f"select={self.select!r} is unknown; choose one of {', '.join(SELECTIONS)}")
        compressing = self.recipe in ("luc", "lowrank")
        if not compressing and (self.size, self.energy, self.select) != (None, None, "uniform"):
            raise ConfigError(
                f"{self.recipe} takes keep=, distill=, harmonize= (and share mode=) only; size, energy, select are for "
                "luc/lowrank"
            )
        if self.recipe == "luc" and (self.size is None or self.energy is not None):
            raise ConfigError("luc needs size=F, the compact size as a fraction of float32 (e.g. luc:size=0.25)")
        if self.recipe == "lowrank" and (self.size is None) == (self.energy is None):
            raise ConfigError("lowrank needs exactly one of energy=E or size=F (e.g. lowrank:energy=0.9)")
        if self.distill < 0:
            raise ConfigError(f"distill={self.distill} must be 0 (none) or a number of steps")
        if self.mode is not None and (self.recipe != "share" or self.mode not in MODES):
            raise ConfigError(f"mode={self.mode!r} is for the share recipe only, one of {', '.join(MODES)}")
        if self.recipe == "share" and self.mode != "drop" and self.harmonize:
            raise ConfigError(
                "share runs a layer in every removed position, so there is no gap to harmonize; "
                "use share:mode=drop,harmonize=RANK"
            )
        if self.harmonize < 0:
            raise ConfigError(f"harmonize={self.harmonize} must be 0 (none) or a rank, e.g. harmonize=64")
        if self.store not in STORAGE_KINDS:
            raise ConfigError(f"store={self.store!r} is not one of {', '.join(STORAGE_KINDS)}; e.g. store=int8")

    @classmethod
    def parse(
        cls, text: str, keep: int | None = None, distill: int = 0, calibration: str | None = None
    ) -> EmulatorSpec:
        """Parse `NAME[:key=value,...]`; `keep`, `distill` and `calibration` fill in what the text leaves out."""
        name, _, rest = text.partition(":")
        values: dict[str, object] = {"recipe": name.strip(), "keep": keep, "distill": distill}
        values["calibration"] = calibration
        kinds = {
            "keep": int,
            "size": float,
            "energy": float,
            "select": str,
            "distill": int,
            "harmonize": int,
            "mode": str,
            "store": str,
        }
        for item in filter(None, rest.split(",")):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or key not in kinds:
                raise ConfigError(f"{item!r} in emulator spec {text!r} is not KEY=VALUE with KEY in {', '.join(kinds)}")
            try:
                values[key] = kinds[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} in emulator spec {text!r} is not {kinds[key].__name__}") from None
        return cls(**values)

    def options(self) -> dict[str, object]:
        """The recipe and the settings it uses (what the manifest records)."""
        chosen: dict[str, object] = {"recipe": self.recipe, "keep": self.keep}
        chosen |= {key: getattr(self, key) for key in ("size", "energy") if getattr(self, key) is not None}
        if self.recipe in ("luc", "lowrank"):
            chosen["select"] = self.select
        if self.recipe == "share":
            chosen["mode"] = self.mode or "share"
        chosen |= {"distill": self.distill} if self.distill else {}
        chosen |= {"harmonize": self.harmonize} if self.harmonize else {}
        return chosen | ({"store": self.store} if self.store != FLOAT32 else {})

    def label(self) -> str:
        """The spec written back as text (select only where it is not uniform)."""
        shown = {k: v for k, v in self.options().items() if k != "recipe" and v is not None}
        shown = {k: v for k, v in shown.items() if (k, v) not in (("select", "uniform"), ("mode", "share"))}
        return self.recipe + (":" + ",".join(f"{k}={v}" for k, v in shown.items()) if shown else "")

    def split_for(self, split: Split) -> Split:
        """`split` with this spec's keep, if it names one."""
        return split if self.keep is None else replace(split, keep=self.keep)

    def recipe_object(self) -> EmulatorRecipe:
        if self.recipe == "uniform":
            return UniformDrop()
        if self.recipe == "importance":
            return ImportanceDrop()
        if self.recipe == "greedy":
            return GreedyDrop()
        if self.recipe == "share":
            return SharedLayers(self.mode or "share")
        if self.recipe == "luc":
            return LayerwiseCompression(self.size, self.select)
        return LowRank(self.energy, self.size, self.select)


def make_emulator(
    model: PreTrainedModel,
    split: Split,
    spec: EmulatorSpec,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: Calibration | None = None,
) -> PreTrainedModel:
    """Build the emulator `spec` describes (its keep overrides `split`'s), distill it and fit harmonizers if asked,
    and record the recipe, its settings, what it measured and the emulator's size in its config. `model` is not
    changed.

    Recipes that measure, distill or harmonize use `calibration`, by default the prepared public Wikipedia text.
    An emulator that was trained (distilled or harmonized) is kept under the cache, named by the model's
    predictions on the calibration text and the spec, so building it again loads it instead of training again.
    The storage (`store=`) is applied last, to the float emulator, cached or not.
    """
    split = spec.split_for(split)
    split.check(model.config.num_hidden_layers)
    spec = replace(spec, keep=split.keep)
    return store_frozen(_trained_or_built(model, split, spec, tokenizer, calibration), split, spec.store)


def _trained_or_built(
    model: PreTrainedModel,
    split: Split,
    spec: EmulatorSpec,
    tokenizer: PreTrainedTokenizerBase | None,
    calibration: Calibration | None,
) -> PreTrainedModel:
    recipe = spec.recipe_object()
    if calibration is None and (recipe.needs_calibration or spec.distill or spec.harmonize):
        if tokenizer is None:
            raise ConfigError(f"emulator recipe {spec.label()} needs calibration text or a tokenizer to make it")
        calibration = load_calibration(tokenizer, spec.calibration)
    if not (spec.distill or spec.harmonize):
        return _build(model, split, spec, calibration)
    assert calibration is not None
    batches = calibration.measure_batches()
    float_options = replace(spec, store=FLOAT32).options()  # storage is applied after: one cached emulator for both
    settings = (split.bottom, split.top, float_options, calibration.describe(), TRAINED_FORMAT)
    folder = cache_root() / "emulators" / prediction_fingerprint(batches, log_probs(model, batches), *settings)
    if (folder / "config.json").is_file():
        with suppress(OSError, ValueError, SafetensorError, DataError):  # a damaged entry is built again, not trusted
            return load_causal_lm(folder)
    emulator = _build(model, split, spec, calibration)
    with atomic_directory(folder) as staging:
        emulator.save_pretrained(staging)
    return emulator


def _build(
    model: PreTrainedModel, split: Split, spec: EmulatorSpec, calibration: Calibration | None
) -> PreTrainedModel:
    emulator, details = spec.recipe_object().build(model, split, calibration)
    if spec.distill:
        assert calibration is not None
        details["distill"] = distill(emulator, model, split, calibration, DistillConfig(spec.distill))
    bake(emulator)
    if spec.harmonize:
        assert calibration is not None
        details["harmonize"] = fit_harmonizers(emulator, model, calibration, HarmonizeConfig(spec.harmonize))
    if calibration is not None:
        details["calibration"] = calibration.describe()
    details["footprint"] = footprint(emulator, model, split, details)
    record = replace(emulator_record(emulator), options=spec.options(), details=details)
    set_emulator_record(emulator.config, record)
    return emulator


def _middle_parameters(model: PreTrainedModel, split: Split) -> int:
    layers = decoder_layers(model)
    held = {id(p): p.numel() for i in range(split.bottom, len(layers) - split.top) for p in layers[i].parameters()}
    return sum(held.values())  # a shared layer's weights count once


def footprint(
    emulator: PreTrainedModel, model: PreTrainedModel, split: Split, details: dict[str, object]
) -> dict[str, object]:
    """The emulator's size: its middle's compact size (harmonizers included) against the full model's middle,
    and its device weights."""
    harmonizers = details.get("harmonize", {}).get("parameters", 0)
    middle = _middle_parameters(emulator, split) + harmonizers
    bits = details.get("compact_bits", (middle - harmonizers) * FLOAT_BITS) + harmonizers * FLOAT_BITS
    full_bits = _middle_parameters(model, split) * FLOAT_BITS
    return {
        "middle_parameters": middle,
        "middle_compact_bytes": int(bits) // 8,
        "middle_fraction": round(bits / full_bits, 5),
        "device_parameters": sum(p.numel() for p in emulator.parameters()),
    }
