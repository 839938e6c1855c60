"""Device profiles: validated YAML descriptions of real devices (memory, budget, compute, runtimes), by name or path."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIRECTORY = Path(__file__).parent / "profiles"
ARCHITECTURES = ("x86_64", "aarch64", "armv7l")
GIB = 1024**3
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ProfileError(ValueError):
    """A profile is unknown, unreadable, or has bad fields (all of them are named at once)."""


@dataclass(frozen=True)
class DeviceProfile:
    """What a device offers for training: memory, the part of it training may use, compute, runtimes."""

    name: str
    description: str
    memory_gb: float
    training_budget_gb: float
    cpu_cores: int
    architecture: str
    execution_providers: tuple[str, ...]
    onnxruntime_training: bool
    peak_fp32_gflops: float | None = None
    accelerator: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def budget_bytes(self) -> int:
        """The training budget in bytes."""
        return int(self.training_budget_gb * GIB)

    @property
    def backends(self) -> tuple[str, ...]:
        """Training backends the device can run, preferred first."""
        return ("ort", "torch") if self.onnxruntime_training else ("torch",)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready fields (tuples as lists, unset optional fields left out)."""
        record = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        return {key: value for key, value in record.items() if value not in (None, [])}

    def to_yaml(self) -> str:
        """The profile as YAML that `load_profile` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item for item in value)


# field -> (required, check, what a good value looks like)
_RULES: dict[str, tuple[bool, Any, str]] = {
    "name": (True, lambda v: isinstance(v, str) and bool(_NAME.match(v)), "lower-case words joined by '-'"),
    "description": (True, lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty line of text"),
    "memory_gb": (True, lambda v: _is_number(v) and 0 < v <= 4096, "total memory in GiB, e.g. 8"),
    "training_budget_gb": (True, lambda v: _is_number(v) and v > 0, "GiB training may use, e.g. 5.5"),
    "cpu_cores": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "architecture": (True, lambda v: v in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}"),
    "execution_providers": (True, _is_string_list, "a list such as [CPUExecutionProvider]"),
    "onnxruntime_training": (True, lambda v: isinstance(v, bool), "true or false"),
    "peak_fp32_gflops": (False, lambda v: _is_number(v) and v > 0, "a positive number"),
    "accelerator": (False, lambda v: isinstance(v, str) and bool(v.strip()), "a line of text"),
    "aliases": (False, lambda v: _is_string_list(v) and all(_NAME.match(a) for a in v), "a list of short names"),
}


def validate(record: object, source: str) -> DeviceProfile:
    """Check every field of `record` (parsed YAML) and build the profile; raise one error listing every problem."""
    if not isinstance(record, dict):
        raise ProfileError(f"{source}: a profile is a YAML mapping of fields, got {type(record).__name__}")
    problems = []
    for key in sorted(set(record) - set(_RULES)):
        problems.append(f"unknown field {key!r}; known fields: {', '.join(_RULES)}")
    for key, (required, check, hint) in _RULES.items():
        if key not in record:
            if required:
                problems.append(f"missing field {key!r}: add {key}: <{hint}>")
        elif not check(record[key]):
            problems.append(f"field {key!r} is {record[key]!r}; it must be {hint}")
    budget, memory = record.get("training_budget_gb"), record.get("memory_gb")
    if _is_number(budget) and _is_number(memory) and budget > memory:
        problems.append(f"training_budget_gb {budget} exceeds memory_gb {memory}; lower it below the total")
    if problems:
        raise ProfileError(f"{source}: invalid device profile:\n  - " + "\n  - ".join(problems))
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in record.items()}
    values["memory_gb"], values["training_budget_gb"] = float(memory), float(budget)
    return DeviceProfile(**values)


def shipped_profiles() -> dict[str, DeviceProfile]:
    """Every profile shipped with the package, by name."""
    profiles = {}
    for path in sorted(PROFILE_DIRECTORY.glob("*.yaml")):
        profile = read_profile(path)
        profiles[profile.name] = profile
    return profiles


def _aliases(profiles: dict[str, DeviceProfile]) -> dict[str, str]:
    return {alias: profile.name for profile in profiles.values() for alias in profile.aliases}


def known_names() -> list[str]:
    """Shipped profile names and aliases, for error messages and help."""
    profiles = shipped_profiles()
    return sorted([*profiles, *_aliases(profiles)])


def read_profile(path: str | Path) -> DeviceProfile:
    """Read and validate one profile file."""
    path = Path(path)
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ProfileError(f"cannot read profile {str(path)!r}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ProfileError(f"{path}: not valid YAML: {error}") from None
    return validate(record, str(path))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name or alias (e.g. 'jetson-orin'), or a profile file by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return read_profile(text)
    profiles = shipped_profiles()
    name = _aliases(profiles).get(text, text)
    if name not in profiles:
        raise ProfileError(
            f"unknown device profile {text!r}; known: {', '.join(known_names())}, or a path to a .yaml profile "
            "(`edge-runtime profile --out my-device.yaml` measures this machine)"
        )
    return profiles[name]
