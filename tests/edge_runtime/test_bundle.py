"""Bundle verification: a good bundle passes; any changed, missing, extra or foreign-signed byte is refused."""

import json
import shutil

import pytest

from edge_runtime.bundle import BundleError, verify_bundle
from edge_runtime.cli import main as edge
from exporters.bundle import generate_keys


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle["bundle"], copy)
    return copy


def test_a_fresh_bundle_verifies_and_lists_every_file(tiny_bundle, capsys):
    manifest = verify_bundle(tiny_bundle["bundle"], tiny_bundle["trust"])
    assert {
        "ort/training_model.onnx",
        "ort/frozen_weights.safetensors",
        "ort/optimizer_model.onnx",
        "ort/checkpoint",
        "torch/model.safetensors",
        "tokenizer/tokenizer.json",
        "adapter.safetensors",
    } <= set(manifest.files)
    assert manifest.plan.profile == "laptop-16gb" and manifest.backends == ["ort", "torch"]
    assert set(manifest.adapter.parameters.values()) >= {
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.5.mlp.up_proj.weight",
    }
    assert edge(["verify", str(tiny_bundle["bundle"]), "--trust", str(tiny_bundle["trust"])]) == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name", ["ort/checkpoint", "ort/frozen_weights.safetensors", "torch/model.safetensors", "tokenizer/tokenizer.json"]
)
def test_one_changed_byte_is_caught(bundle_copy, tiny_bundle, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match the manifest"):
        verify_bundle(bundle_copy, tiny_bundle["trust"])


def test_an_edited_manifest_breaks_the_signature(bundle_copy, tiny_bundle):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["training"]["steps"] = 10_000
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match="not signed by the trusted key"):
        verify_bundle(bundle_copy, tiny_bundle["trust"])


def test_a_bundle_signed_by_another_key_is_refused(tiny_bundle, tmp_path, capsys):
    _, other = generate_keys(tmp_path / "other")
    with pytest.raises(BundleError, match="not signed by the trusted key"):
        verify_bundle(tiny_bundle["bundle"], other)
    assert edge(["verify", str(tiny_bundle["bundle"]), "--trust", str(other)]) == 2
    assert "signed by another coordinator" in capsys.readouterr().err


def test_missing_and_extra_files_are_named(bundle_copy, tiny_bundle):
    (bundle_copy / "ort" / "optimizer_model.onnx").unlink()
    with pytest.raises(BundleError, match=r"missing ort/optimizer_model\.onnx"):
        verify_bundle(bundle_copy, tiny_bundle["trust"])
    shutil.copy(tiny_bundle["bundle"] / "ort" / "optimizer_model.onnx", bundle_copy / "ort" / "optimizer_model.onnx")
    (bundle_copy / "ort" / "plugin.so").write_bytes(b"\x7fELF")
    with pytest.raises(BundleError, match=r"does not list: \['ort/plugin.so'\]"):
        verify_bundle(bundle_copy, tiny_bundle["trust"])


def test_missing_signature_and_missing_trust_key_are_named(bundle_copy, tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match=r"does not exist; copy the coordinator's coordinator\.pub"):
        verify_bundle(bundle_copy, tmp_path / "nope.pub")
    (bundle_copy / "manifest.sig").unlink()
    with pytest.raises(BundleError, match=r"has no manifest\.sig"):
        verify_bundle(bundle_copy, tiny_bundle["trust"])
