"""Per-device configuration: memory, deadline and utility decide each device's emulator, steps and micro-batch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.bundles.request import BundleRequest
from coordinator.errors import ConfigError
from coordinator.fleet import utility
from coordinator.fleet.cli import format_configurations
from coordinator.fleet.configure import Candidate, Fleet, candidate_shapes, candidates, configure
from coordinator.fleet.cost import Throughput, step_flops
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.utility import expected_utility, interpolate, measured_steps, recipe_key
from coordinator.models import LoadedModel
from coordinator.train import TrainConfig
from device_profiles import GIB, validate
from edge_runtime.memory import estimate
from edge_runtime.trainer import PLAN_MARGIN
from tests.conftest import make_model, make_tokenizer

STEPS, BATCH, LENGTH = 40, 8, 32


def _profile(name: str, budget_bytes: float, gflops: float) -> object:
    return validate(
        {
            "name": name,
            "description": f"{name}, made in a test",
            "memory_gb": 64.0,
            "training_budget_gb": budget_bytes / GIB,
            "cpu_cores": 4,
            "architecture": "aarch64",
            "execution_providers": ["CPUExecutionProvider"],
            "onnxruntime_training": False,
            "peak_fp32_gflops": gflops,
        },
        "test profile",
    )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    tokenizer = make_tokenizer()
    return LoadedModel(
        "tiny-llama",
        make_model("llama", num_layers=8, vocab_size=len(tokenizer)),
        tokenizer,
        tmp_path_factory.mktemp("m"),
    )


def _spec(**change: object) -> JobSpec:
    request = BundleRequest(
        "tiny-llama", (1, 1), keep=4, emulator="uniform", training=TrainConfig(STEPS, 1e-3, BATCH, LENGTH)
    )
    return replace(JobSpec("reviews", request, rounds=1, per_device=True, deadline_s=60.0), **change)


def test_three_profiles_get_three_configurations_each_within_its_budget(loaded):
    spec = _spec(candidate_emulators=("uniform:keep=2",))
    order = candidates(spec)
    assert [c.label() for c in order] == [
        "uniform:keep=4, layers",
        "uniform:keep=4,store=int8 + recompute, layers",
        "uniform:keep=2, layers",
        "uniform:keep=2,store=int8 + recompute, layers",
    ]
    shapes = candidate_shapes(loaded, spec, order)
    peaks = [estimate(shapes[c], 1, LENGTH, "classification", "torch").total for c in order]
    # On a model this small int8 storage saves less than its dequantization buffers take: the smaller emulator is
    # the one that fits a budget between the two float emulators' needs.
    assert peaks[2] < peaks[0] < min(peaks[1], peaks[3])
    tight = (peaks[0] + peaks[2]) / 2 * (1 + PLAN_MARGIN)
    flops = step_flops(shapes[order[0]], BATCH, LENGTH, "classification")
    slow_gflops = flops * STEPS / 2 / (60.0 * 0.7) / 1e9  # half the steps in the deadline's training share
    profiles = {"big": _profile("big", 64 * GIB, 5000), "tight": _profile("tight", tight, 5000)}
    profiles["slow"] = _profile("slow", 64 * GIB, slow_gflops)
    speeds = {d: Throughput(p.peak_fp32_gflops, "profile") for d, p in profiles.items()}  # type: ignore[attr-defined]
    chosen = configure(loaded, spec, Fleet(profiles, {d: "torch" for d in profiles}, speeds))

    assert chosen.left_out == {}
    big, small, slow = chosen.chosen["big"], chosen.chosen["tight"], chosen.chosen["slow"]
    assert (big.candidate, big.steps, big.micro_batch) == (order[0], STEPS, BATCH)
    assert small.candidate == order[2] and small.steps == STEPS  # only the smaller emulator fits its memory
    assert slow.candidate == order[0] and STEPS // 4 <= slow.steps < STEPS  # as many steps as the deadline holds
    assert len({(c.candidate, c.steps, c.micro_batch) for c in chosen.chosen.values()}) == 3
    for choice in chosen.chosen.values():
        assert choice.predicted_peak_bytes * (1 + PLAN_MARGIN) <= choice.budget_bytes
        assert choice.round_seconds <= 60.0 * 0.7
        assert choice.candidate.label() in choice.describe()
    # The one configuration all three could run: the smaller emulator, at the steps the slow device has for it.
    assert {c.candidate for c in chosen.fixed.values()} == {order[2]}
    fixed_steps = {c.steps for c in chosen.fixed.values()}
    assert len(fixed_steps) == 1 and slow.steps < fixed_steps.pop() < STEPS  # the smaller emulator is faster


def test_a_device_nothing_fits_is_left_out_with_every_reason(loaded):
    spec = _spec()
    profiles = {"tiny": _profile("tiny", 64 * 1024**2, 5000)}  # 64 MiB: not even the runtime
    chosen = configure(loaded, spec, Fleet(profiles, {"tiny": "torch"}, {"tiny": Throughput(5000, "profile")}))
    assert chosen.chosen == {} and "does not fit 64 MiB" in chosen.left_out["tiny"] and chosen.fixed == {}
    assert chosen.left_out["tiny"].count("does not fit") == 2


def test_lora_jobs_offer_smaller_ranks_and_the_jobs_own_wins_ties(loaded):
    request = BundleRequest("tiny-llama", (1, 1), keep=4, emulator="uniform", adapter_kind="lora:r=8",
                            training=TrainConfig(STEPS, 1e-3, BATCH, LENGTH))  # fmt: skip
    spec = replace(_spec(), bundle=request)
    kinds = [c.adapter_kind for c in candidates(spec) if not c.recompute]
    assert kinds == ["lora:r=8,alpha=16", "lora:r=4,alpha=16", "lora:r=2,alpha=16"]
    assert [c.adapter_kind for c in candidates(replace(spec, lora_ranks=(4, 1)))][:2] == [
        "lora:r=4,alpha=16",
        "lora:r=1,alpha=16",
    ]
    profiles = {"big": _profile("big", 64 * GIB, 5000)}
    chosen = configure(loaded, spec, Fleet(profiles, {"big": "torch"}, {"big": Throughput(5000, "profile")}))
    assert chosen.chosen["big"].candidate == Candidate("uniform:keep=4", False, "lora:r=8,alpha=16")


def test_the_measured_table_ranks_by_validation_accuracy_and_others_by_the_prior(tmp_path: Path):
    measured = expected_utility("smollm2-135m", "classification", "greedy:harmonize=64", 22, "layers", 300, 26)
    early = expected_utility("smollm2-135m", "classification", "greedy:harmonize=64", 22, "layers", 49, 26)
    small = expected_utility("smollm2-135m", "classification", "greedy", 9, "layers", 300, 26)
    assert measured.accuracy is not None and early.accuracy is not None and small.accuracy is not None
    assert measured.measured_as_run and early.measured_as_run and not small.measured_as_run
    assert measured.key() > small.key() and measured.key() > early.key()  # keep 9 never beat zero-shot
    prior = expected_utility("tiny-llama", "classification", "uniform", 2, "layers", 10, 4)
    assert prior.accuracy is None and prior.middle_kept == 0.5 and prior.source == "prior"


def test_choosing_per_device_options_need_per_device():
    with pytest.raises(ConfigError, match="add --per-device"):
        JobSpec("reviews", min_steps=3)
    with pytest.raises(ConfigError, match="--lora-ranks"):
        JobSpec("reviews", per_device=True, lora_ranks=(4,))  # the default adapter is whole layers


def test_fleet_dispatch_queues_a_per_device_job_and_refuses_bad_ranks(tmp_path: Path, capsys):
    from coordinator.cli import main as coordinator
    from coordinator.fleet.registry import Registry

    state = ["--state", str(tmp_path / "state")]
    base = ["fleet", "dispatch", "--dataset", "reviews", "--adapter-kind", "lora:r=8", *state]
    assert coordinator([*base, "--per-device", "--lora-ranks", "8,2", "--deadline", "300", "--min-steps", "10"]) == 0
    (job,) = Registry(tmp_path / "state").jobs()
    spec = JobSpec.from_dict(job["spec"])
    assert (spec.per_device, spec.lora_ranks, spec.deadline_s, spec.min_steps) == (True, (8, 2), 300.0, 10)
    assert coordinator([*base, "--per-device", "--lora-ranks", "8,x"]) == 2
    assert "--lora-ranks '8,x' is not a comma-separated list" in capsys.readouterr().err
    assert coordinator([*base, "--lora-ranks", "4"]) == 2
    assert "add --per-device" in capsys.readouterr().err


def _runs_table(path: Path, curve: list[list[float]], aggregates: list[list[float]] | None = None) -> Path:
    row = {"model": "tiny-llama", "task": "classification", "emulator": recipe_key("uniform", 4), "adapter": "layers"}
    rows = [row | {"kind": "runs", "curve": curve}]
    if aggregates:
        rows.append(row | {"kind": "aggregates", "curve": aggregates})
    path.write_text(json.dumps({"schema": 1, "curves": rows}))
    return path


def test_runs_curves_interpolate_between_measured_steps_and_stay_flat_past_them(tmp_path: Path):
    curve = [(0, 0.8), (10, 0.6), (30, 0.9)]
    assert [interpolate(curve, n) for n in (0, 5, 10, 20, 30, 500)] == pytest.approx([0.8, 0.7, 0.6, 0.75, 0.9, 0.9])
    table = _runs_table(tmp_path / "table.json", [[0, 0.8], [10, 0.6], [30, 0.9]])
    assert measured_steps("tiny-llama", "classification", "uniform", 4, "layers", 5, 25, path=table) == [10, 25]
    assert measured_steps("tiny-llama", "classification", "uniform", 4, "layers", 5, 30, path=table) == [10, 30]
    assert measured_steps("other", "classification", "uniform", 4, "layers", 5, 25, path=table) == [25]  # no curve
    run = expected_utility("tiny-llama", "classification", "uniform", 4, "layers:x", 20, 6, path=table)
    assert run.measured_as_run and run.accuracy == pytest.approx(0.75) and "at 20 steps" in run.source


def test_a_device_trains_fewer_steps_where_the_measured_runs_peak_earlier(loaded, tmp_path, monkeypatch):
    # Complete runs of this recipe: 10 steps help, 20 hurt (the early dip), 40 help most.
    monkeypatch.setattr(utility, "TABLE", _runs_table(tmp_path / "table.json", [[0, 0.8], [10, 0.85], [20, 0.7],
                                                                               [40, 0.9]]))  # fmt: skip
    spec = _spec()  # 40 steps, at least 10, a 60 s deadline
    order = candidates(spec)
    flops = step_flops(candidate_shapes(loaded, spec, order[:1])[order[0]], BATCH, LENGTH, "classification")
    profiles = {"fast": _profile("fast", 64 * GIB, 5000), "slow": _profile("slow", 64 * GIB, 1)}
    speeds = {"fast": Throughput(5000, "profile"), "slow": Throughput(flops * 25.5 / (60.0 * 0.7) / 1e9, "profile")}
    chosen = configure(loaded, spec, Fleet(profiles, {d: "torch" for d in profiles}, speeds))

    fast, slow = chosen.chosen["fast"], chosen.chosen["slow"]
    assert (fast.candidate, fast.steps, fast.steps_fit) == (order[0], STEPS, STEPS)
    assert fast.utility.accuracy == pytest.approx(0.9)
    # 25 steps fit the slow device; 10 are expected to do better than 20 or 25 (0.85 against 0.70 and 0.75).
    assert (slow.candidate, slow.steps, slow.steps_fit) == (order[0], 10, 25)
    assert "10 steps (25 fit; the measured runs peak earlier)" in slow.describe()
    # One configuration for all is held to the slow device's 25 steps and chooses 10 of them too: never better
    # than each device's own.
    assert {(c.candidate, c.steps) for c in chosen.fixed.values()} == {(order[0], 10)}
    for device, choice in chosen.chosen.items():
        assert choice.utility.key() >= chosen.fixed[device].utility.key()
    detail = {name: {d: c.to_dict() for d, c in choices.items()} for name, choices in
              (("configurations", chosen.chosen), ("fixed", chosen.fixed))}  # fmt: skip
    assert "one configuration for all would be: uniform:keep=4, layers, 10 steps each (85.0 % expected)" in (
        format_configurations(detail)
    )
    # Expected below the full model's own 80 %: the choice says so.
    assert slow.untrained == pytest.approx(0.8) and "below the untrained" not in slow.describe()
    worse = replace(slow, utility=replace(slow.utility, accuracy=0.7))
    assert "below the untrained full model's 80.0 %: more steps or a longer deadline" in worse.describe()


def test_a_job_of_several_devices_scores_steps_by_the_aggregate_of_devices_runs(loaded, tmp_path, monkeypatch):
    # One device's runs dip at 20 steps; the aggregate of several devices' runs does not (averaging cancels it).
    runs, aggregates = [[0, 0.8], [10, 0.85], [20, 0.7], [40, 0.9]], [[0, 0.8], [10, 0.82], [20, 0.86], [40, 0.9]]
    monkeypatch.setattr(utility, "TABLE", _runs_table(tmp_path / "table.json", runs, aggregates))
    recipe = ("tiny-llama", "classification", "uniform", 4, "layers")
    alone, job = expected_utility(*recipe, 20, 6, devices=1), expected_utility(*recipe, 20, 6, devices=3)
    assert (alone.accuracy, job.accuracy) == pytest.approx((0.7, 0.86))
    assert job.measured_as_run and job.source.startswith("aggregates of devices' runs") and "runs of" in alone.source
    assert measured_steps(*recipe, 5, 25, devices=3) == [10, 20, 25]

    spec = _spec()  # 40 steps, at least 10, a 60 s deadline
    order = candidates(spec)
    flops = step_flops(candidate_shapes(loaded, spec, order[:1])[order[0]], BATCH, LENGTH, "classification")
    profiles = {"fast": _profile("fast", 64 * GIB, 5000), "slow": _profile("slow", 64 * GIB, 1)}
    speeds = {"fast": Throughput(5000, "profile"), "slow": Throughput(flops * 25.5 / (60.0 * 0.7) / 1e9, "profile")}
    slow = configure(loaded, spec, Fleet(profiles, {d: "torch" for d in profiles}, speeds)).chosen["slow"]
    # Alone its runs would peak at 10 of the 25 steps that fit (the test above); in the job it trains all 25.
    assert (slow.steps, slow.steps_fit) == (25, 25) and slow.utility.accuracy == pytest.approx(0.87)


def test_the_shipped_utility_table_is_the_one_the_saved_studies_make():
    from bench.utility_table import curves

    shipped = json.loads(utility.TABLE.read_text())["curves"]
    assert shipped == curves()  # python -m bench.utility_table rewrites it after a study
    assert {row["kind"] for row in shipped} == {utility.RUNS, utility.AGGREGATES, utility.CHECKPOINTS}
