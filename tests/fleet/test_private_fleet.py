"""A differentially private fleet job: each device trains with DP-SGD and reports its ε, the fleet table shows it,
the aggregate records the largest, and a device's lifetime budget turns away the round it cannot afford."""

from __future__ import annotations

from pathlib import Path

from coordinator.fleet.cli import format_results
from edge_runtime.manifest import DPTarget, read_metrics
from tests.fleet.conftest import tiny_spec, wait_for


def test_a_dp_job_reports_epsilon_per_device_and_the_aggregate_the_largest(broker, make_fleet) -> None:
    fleet = make_fleet(broker)
    fleet.start_service()
    fleet.start_daemon("a", backend="torch", privacy_budget=4.0)
    fleet.start_daemon("b", backend="torch", privacy_budget=4.0)
    registry = fleet.service.registry
    spec = tiny_spec(fleet.files, rounds=2, adapter_kind="bias", dp=DPTarget(3.0, 1e-5, 1.0))
    job = registry.add_job(spec)
    wait_for(lambda: registry.job(job)["state"] in ("done", "failed"), 240, "the DP job")
    tasks = {(t["device"], t["round"]): t for t in registry.tasks(job)}
    first = {device: tasks[(device, 1)]["metrics"]["privacy"]["epsilon"] for device in ("a", "b")}
    assert all(2.0 < epsilon <= 3.0 for epsilon in first.values()), first
    # Round 2 would bring each device to about 6 > its budget of 4: both refuse it, so the job fails there.
    assert {tasks[(d, 2)]["state"] for d in ("a", "b")} == {"skipped"}
    assert "lifetime budget is ε = 4" in tasks[("a", 2)]["detail"]["reason"]
    assert registry.job(job)["state"] == "failed"
    aggregate = read_metrics((Path(registry.rounds(job)[0]["aggregate"]) / "metrics.json").read_bytes(), "aggregate")
    assert aggregate.privacy.epsilon == max(first.values())
    table = format_results(registry, job)
    assert "ε" in table.splitlines()[0] and f"{first['a']:.2f}" in table
