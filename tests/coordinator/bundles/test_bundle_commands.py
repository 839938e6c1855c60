"""`coordinator keys / plan / export / plug / evaluate --adapter` on a tiny model, and their errors."""

import json

import torch
import yaml

from coordinator.cli import main as coordinator
from coordinator.models import load_model
from device_profiles import PROFILE_DIRECTORY
from edge_runtime.manifest import Manifest
from edge_runtime.trainer import TrainOptions, train_bundle
from tests.conftest import make_bundle, sentiment_examples


def _small_profile(tmp_path, budget_gb):
    record = yaml.safe_load((PROFILE_DIRECTORY / "laptop-16gb.yaml").read_text())
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(record | {"name": "small", "training_budget_gb": budget_gb}))
    return path


def test_plan_prints_the_parts_and_the_chosen_micro_batch(tiny_bundle, capsys):
    assert (
        coordinator(
            [
                "plan",
                "--model",
                str(tiny_bundle["model"]),
                "--profile",
                "jetson-orin",
                "--adapter-layers",
                "1,1",
                "--keep",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "profile jetson-orin-nano-8gb" in out and "backend torch" in out
    for part in ("frozen weights", "optimizer state", "activations", "| 8 (chosen) |"):
        assert part in out


def test_plan_takes_recomputation_into_account(tiny_bundle, capsys):
    """`plan --recompute` plans the activations the export will (it planned them kept, as without it)."""
    base = ["plan", "--model", str(tiny_bundle["model"]), "--profile", "laptop-16gb", "--adapter-layers", "1,1"]
    base += ["--keep", "2", "--max-length", "512", "--batch-size", "32"]
    activations = []
    for extra in ([], ["--recompute"]):
        assert coordinator([*base, *extra]) == 0
        out = capsys.readouterr().out
        activations.append(next(line for line in out.splitlines() if line.startswith("| activations")))
    assert activations[0] != activations[1], activations


def test_plan_refuses_a_budget_too_small_and_names_what_it_needs(tiny_bundle, tmp_path, capsys):
    profile = _small_profile(tmp_path, 0.05)
    assert (
        coordinator(
            [
                "plan",
                "--model",
                str(tiny_bundle["model"]),
                "--profile",
                str(profile),
                "--adapter-layers",
                "1,1",
                "--keep",
                "2",
            ]
        )
        == 2
    )
    assert "training needs at least" in capsys.readouterr().err


def test_export_refuses_an_unknown_profile_and_a_backend_the_device_lacks(tiny_bundle, tmp_path, capsys):
    base = [
        "export",
        "--model",
        str(tiny_bundle["model"]),
        "--key",
        str(tiny_bundle["key"]),
        "--adapter-layers",
        "1,1",
        "--keep",
        "2",
        "--out",
        str(tmp_path / "b"),
    ]
    assert coordinator([*base, "--profile", "jetson-nano"]) == 2
    assert "known: jetson-agx-orin-64gb, jetson-orin" in capsys.readouterr().err
    assert coordinator([*base, "--profile", "jetson-orin", "--backends", "ort"]) == 2
    assert "cannot run the 'ort' backend" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_export_without_a_key_says_how_to_make_one(tiny_bundle, tmp_path, capsys):
    command = [
        "export",
        "--model",
        str(tiny_bundle["model"]),
        "--profile",
        "laptop-16gb",
        "--key",
        str(tmp_path / "none.key"),
        "--out",
        str(tmp_path / "b"),
    ]
    assert coordinator(command) == 2
    assert "run `coordinator keys init`" in capsys.readouterr().err


def test_keys_init_will_not_overwrite_a_key(tiny_bundle, capsys):
    assert coordinator(["keys", "init", "--out", str(tiny_bundle["key"].parent)]) == 2
    assert "pass --force" in capsys.readouterr().err


def test_a_device_result_plugs_in_and_evaluates(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    result = tmp_path / "result"
    train_bundle(bundle["bundle"], bundle["data"], result, bundle["trust"], TrainOptions(steps=30, progress=False))
    tuned = tmp_path / "tuned"
    assert coordinator(["plug", "--model", str(bundle["model"]), "--adapter", str(result), "--out", str(tuned)]) == 0
    trained = load_model(str(tuned)).model.state_dict()
    original = load_model(str(bundle["model"])).model.state_dict()
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(trained["model.layers.3.mlp.up_proj.weight"], original["model.layers.3.mlp.up_proj.weight"])
    plug = ["plug", "--model", str(bundle["model"]), "--adapter", str(result)]
    assert coordinator(plug) == 2 and "plug writes nothing: give --out DIR" in capsys.readouterr().err
    assert coordinator([*plug, "--gguf-lora", str(tmp_path / "l.gguf")]) == 2
    assert "--gguf-lora writes LoRA adapters; this result's adapter kind is 'layers'" in capsys.readouterr().err
    assert coordinator([*plug, "--gguf", str(tmp_path / "t.gguf")]) == 2  # a Hugging Face folder: no source GGUF
    assert "loaded from a Hugging Face folder" in capsys.readouterr().err and not (tmp_path / "t.gguf").exists()

    from coordinator.datasets import write_jsonl

    write_jsonl(tmp_path / "test.jsonl", sentiment_examples(16, seed=5))
    out = tmp_path / "r.json"
    command = [
        "evaluate",
        "--model",
        str(bundle["model"]),
        "--train",
        str(bundle["data"]),
        "--test",
        str(tmp_path / "test.jsonl"),
        "--adapter-layers",
        "1,1",
        "--keep",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--adapter",
        str(result),
        "--out",
        str(out),
    ]
    assert coordinator(command) == 0
    results = json.loads(out.read_text())
    assert results["offsite_emulator"]["train"]["on_device"] is True
    assert results["offsite_emulator"]["train"]["steps"] == 30

    assert coordinator([*command[:-4], "--keep", "3", "--adapter", str(result), "--out", str(out)]) == 2
    assert "pass the --adapter-layers, --keep, --emulator and --distill the bundle was exported with" in (
        capsys.readouterr().err
    )


def test_an_unfinished_result_is_not_plugged(tiny_bundle, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert (
        coordinator(
            [
                "plug",
                "--model",
                str(tiny_bundle["model"]),
                "--adapter",
                str(tmp_path / "r"),
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "not a finished result" in capsys.readouterr().err


def test_the_short_jetson_name_exports_a_torch_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "jetson"
    command = [
        "export",
        "--model",
        str(tiny_bundle["model"]),
        "--profile",
        "jetson-orin",
        "--adapter-layers",
        "1,1",
        "--keep",
        "2",
        "--key",
        str(tiny_bundle["key"]),
        "--out",
        str(out),
    ]
    assert coordinator(command) == 0
    manifest = Manifest.from_json((out / "manifest.json").read_bytes())
    assert manifest.backends == ["torch"] and manifest.profile.name == "jetson-orin-nano-8gb"
    assert not (out / "ort").exists() and (out / "torch" / "model.safetensors").is_file()
