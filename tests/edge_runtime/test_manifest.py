"""Typed manifest and result records: read back exactly, and a bad field refused by its dotted name."""

import base64
import json
import shutil
from dataclasses import dataclass

import pytest

from edge_runtime.bundle import BundleError, verify_bundle
from edge_runtime.manifest import Manifest, ResultMetrics, read_metrics
from edge_runtime.records import RecordError, from_dict, to_dict
from edge_runtime.trainer import TrainOptions, train_bundle
from exporters.bundle import load_private_key


@dataclass(frozen=True)
class Inner:
    count: int
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    items: list[Inner]
    optional: Inner | None = None


def test_a_nested_record_reads_back_from_its_json():
    record = Outer("a", Inner(1, 0.25), [Inner(2), Inner(3, 1.0)], None)
    assert from_dict(Outer, json.loads(json.dumps(to_dict(record)))) == record
    assert from_dict(Outer, {"name": "b", "inner": {"count": 1}, "items": [], "optional": {"count": 4}}).optional == (
        Inner(4)
    )


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"inner": {"count": 1}, "items": []}, "Outer lacks its 'name' field"),
        ({"name": "a", "inner": {"count": "1"}, "items": []}, "Outer.inner.count = '1' is not int"),
        ({"name": "a", "inner": {"count": True}, "items": []}, "Outer.inner.count = True is not int"),
        ({"name": "a", "inner": {"count": 1}, "items": [{"count": 1}, {"ratio": 1.0}]}, "Outer.items\\[1\\] lacks"),
        ({"name": "a", "inner": [], "items": []}, "Outer.inner = \\[\\] is not a Inner record"),
    ],
)
def test_a_bad_field_is_refused_by_its_dotted_name(data, named):
    with pytest.raises(RecordError, match=named):
        from_dict(Outer, data)


def _resigned(tiny_bundle, tmp_path, edit) -> object:
    """A copy of the tiny bundle whose manifest `edit` changed, signed again by the coordinator's key."""
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle["bundle"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (copy / "manifest.json").write_text(text)
    signature = load_private_key(tiny_bundle["key"]).sign(text.encode())
    (copy / "manifest.sig").write_text(base64.b64encode(signature).decode() + "\n")
    return copy


def test_the_manifest_reads_back_exactly_as_it_was_written(tiny_bundle):
    manifest = verify_bundle(tiny_bundle["bundle"], tiny_bundle["trust"])
    on_disk = json.loads((tiny_bundle["bundle"] / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk
    assert Manifest.from_json(json.dumps(manifest.to_dict())) == manifest


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda m: m["adapter"].update(kind="prefix"), "manifest.adapter: kind = 'prefix' is not an adapter kind"),
        (lambda m: m["training"].update(steps="ten"), "manifest.training.steps = 'ten' is not int"),
        (lambda m: m["task"].pop("label_token_ids"), "manifest.task: a classification task needs"),
        (lambda m: m["plan"]["shape"].pop("hidden"), "manifest.plan.shape lacks its 'hidden' field"),
        (lambda m: m["adapter"]["parameters"].update(x=3), "manifest.adapter.parameters.x = 3 is not str"),
        (lambda m: m.pop("backends"), "manifest lacks its 'backends' field"),
    ],
)
def test_a_signed_but_malformed_manifest_is_refused_naming_the_field(tiny_bundle, tmp_path, edit, named):
    bundle = _resigned(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=named):
        verify_bundle(bundle, tiny_bundle["trust"])


def test_a_result_reads_back_and_a_bad_one_names_its_field(tiny_bundle, tmp_path):
    options = TrainOptions(steps=2, progress=False, threads=1)
    written = train_bundle(tiny_bundle["bundle"], tiny_bundle["data"], tmp_path / "r", tiny_bundle["trust"], options)
    metrics = read_metrics((tmp_path / "r" / "metrics.json").read_bytes())
    assert isinstance(metrics, ResultMetrics) and metrics.to_dict() == written
    assert metrics.steps == 2 and metrics.privacy.epsilon is None and metrics.aggregate is None
    for change, named in [
        ({"examples": 0}, "examples = 0 must be at least 1"),
        ({"examples": "64"}, "metrics.examples = '64' is not int"),
        ({"format": "other"}, "is not an offsite-edge result"),
        ({"model": {"name": "x"}}, "metrics.model lacks its 'sha256' field"),
    ]:
        with pytest.raises(RecordError, match=named):
            read_metrics(json.dumps(written | change))
    with pytest.raises(RecordError, match="not JSON"):
        read_metrics(b"{cut")
