"""Device profiles: every shipped one validates, names and aliases resolve, bad fields are all named at once."""

import subprocess
import sys

import pytest
import yaml

from device_profiles import PROFILE_DIRECTORY, ProfileError, load_profile, read_profile, shipped_profiles, validate

SHIPPED = ["jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "raspberry-pi-5-8gb", "laptop-16gb"]


@pytest.mark.parametrize("path", sorted(PROFILE_DIRECTORY.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_validates_and_is_named_after_its_file(path):
    profile = read_profile(path)
    assert profile.name == path.stem
    assert 0 < profile.training_budget_gb <= profile.memory_gb
    assert validate(yaml.safe_load(profile.to_yaml()), "round trip") == profile


def test_the_devices_users_name_are_all_shipped():
    assert set(SHIPPED) <= set(shipped_profiles())


def test_the_short_name_resolves_and_jetsons_train_with_torch():
    profile = load_profile("jetson-orin")
    assert profile.name == "jetson-orin-nano-8gb"
    assert profile.backends == ("torch",)  # no onnxruntime-training wheel for aarch64
    assert load_profile("laptop-16gb").backends == ("ort", "torch")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ProfileError, match=r"unknown device profile 'jetson-nano'.*jetson-orin,.*laptop-16gb"):
        load_profile("jetson-nano")


def test_every_bad_field_is_named_with_its_fix(tmp_path):
    record = yaml.safe_load((PROFILE_DIRECTORY / "laptop-16gb.yaml").read_text())
    record |= {"memory_gb": "lots", "cpu_cores": 0, "architecture": "sparc", "colour": "grey"}
    del record["onnxruntime_training"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(record))
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    for expected in (
        "'memory_gb' is 'lots'",
        "'cpu_cores' is 0",
        "'architecture' is 'sparc'",
        "unknown field 'colour'",
        "missing field 'onnxruntime_training'",
        str(path),
    ):
        assert expected in message


def test_budget_above_memory_is_refused():
    record = yaml.safe_load((PROFILE_DIRECTORY / "laptop-16gb.yaml").read_text()) | {"training_budget_gb": 20}
    with pytest.raises(ProfileError, match="training_budget_gb 20 exceeds memory_gb 16"):
        validate(record, "x")


def test_unreadable_yaml_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(ProfileError, match=r"broken\.yaml: not valid YAML"):
        load_profile(path)


def test_measured_profile_of_this_machine_validates(tmp_path):
    out = tmp_path / "me.yaml"
    command = [sys.executable, "-m", "edge_runtime.cli", "profile", "--out", str(out), "--name", "ci-box"]
    subprocess.run(command, check=True, capture_output=True)
    profile = load_profile(out)
    assert profile.name == "ci-box" and profile.cpu_cores >= 1 and profile.peak_fp32_gflops > 0
    assert profile.training_budget_gb == pytest.approx(0.75 * profile.memory_gb, abs=0.01)
