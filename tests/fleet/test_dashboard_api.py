"""The dashboard's JSON API over a real registry and a real HTTP server: what it shows, who it lets in, what the
page may change, and that no request can stop it."""

from __future__ import annotations

import argparse
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.cli import main as coordinator
from coordinator.errors import ConfigError
from coordinator.fleet.cli import add_dispatch_options, spec_from_args
from coordinator.fleet.dashboard import Dashboard, DashboardOptions, dashboard_token
from coordinator.fleet.jobs import JobSpec
from coordinator.fleet.registry import Registry
from device_profiles import load_profile
from edge_runtime.manifest import PrivacyRecord
from tests.fleet.test_registry import device_run

REFUSED = (3, ["a sent a chunk of 0123456789ab…, which is not an expected result"])


class Client:
    """Requests to one dashboard, with its token unless told otherwise; answers (status, headers, JSON or bytes)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.base = f"http://127.0.0.1:{dashboard.port}"

    def __call__(
        self, path: str, body: Any = None, signed: bool = True, headers: dict[str, str] | None = None,
        method: str | None = None, raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:  # fmt: skip
        sent = dict(headers or {})
        if signed and self.dashboard.options.token:
            sent.setdefault("Authorization", f"Bearer {self.dashboard.options.token}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data, sent, method=method)
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(request, timeout=10) as response:
                status, answer, content = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            status, answer, content = error.code, dict(error.headers), error.read()
        is_json = answer.get("Content-Type", "").startswith("application/json")
        return status, answer, json.loads(content) if is_json else content


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state")


def _serve(registry: Registry, tmp_path: Path, **options: Any) -> Iterator[Client]:
    token = dashboard_token(tmp_path / "state")
    dashboard = Dashboard(registry, DashboardOptions(0, token=token) if not options else DashboardOptions(0, **options),
                          lambda: REFUSED).start()  # fmt: skip
    yield Client(dashboard)
    dashboard.stop()


@pytest.fixture
def client(registry: Registry, tmp_path: Path) -> Iterator[Client]:
    yield from _serve(registry, tmp_path)


@pytest.fixture
def control(registry: Registry, tmp_path: Path) -> Iterator[Client]:
    yield from _serve(registry, tmp_path, token=dashboard_token(tmp_path / "state"), control=True)


def _fleet_with_a_round(registry: Registry, test_file: Path) -> str:
    """Two devices (one laptop, one Jetson), a job whose round 1 is done (a received with ε 1.5, b skipped) and
    round 2 half way (a at step 4 of 10)."""
    laptop, jetson = load_profile("laptop-16gb"), load_profile("jetson-orin-nano-8gb")
    registry.device_profile("a", laptop.to_dict(), {"reviews": 40}, ["onnxruntime", "torch"])
    registry.device_profile("b", jetson.to_dict(), {"reviews": 24}, ["torch"])
    spec = JobSpec("reviews", rounds=2, test=str(test_file)).to_dict()
    job = registry.add_job(spec)
    assert registry.claim_job(job, "pending", "preparing", "w", detail={"zero_shot": {"metric": "accuracy",
                              "value": 0.795, "examples": 32}})  # fmt: skip
    registry.heartbeat("w", "host", 1)
    assert registry.start_round(job, 1, {"a": "a.tar", "b": "b.tar"}, "w", "preparing",
                                {"zero_shot": {"metric": "accuracy", "value": 0.795, "examples": 32}})  # fmt: skip
    private = replace(device_run(40), privacy=PrivacyRecord("dp-sgd", epsilon=1.5, delta=1e-5))
    assert registry.task_result(job, 1, "a", Path("result-a"), private)
    registry.set_task(job, 1, "b", "skipped", reason="the plan needs 9 GiB; the budget is 6 GiB")
    registry.add_traffic({"a": (5_000_000, 40_000)})
    assert registry.claim_job(job, "running", "aggregating", "w")
    evaluation = {"metric": "accuracy", "value": 0.84, "examples": 32}
    assert registry.start_round(job, 2, {"a": "a.tar"}, "w", "aggregating", finished=(Path("agg"), evaluation))
    registry.set_task(job, 2, "a", "training", step=4, steps=10, loss=0.61)
    return job


def test_the_api_shows_devices_jobs_rounds_and_scores(client: Client, registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text("")
    job = _fleet_with_a_round(registry, tmp_path / "test.jsonl")
    status, _, fleet = client("/api/fleet")
    assert status == 200
    devices = {d["id"]: d for d in fleet["devices"]}
    assert devices["a"]["profile"] == "laptop-16gb" and devices["a"]["memory_budget_bytes"] == 10 * 1024**3
    assert devices["a"]["epsilon_spent"] == 1.5 and devices["a"]["private_results"] == 1
    assert devices["b"]["epsilon_spent"] is None and devices["b"]["memory_budget_bytes"] > 0
    assert devices["a"]["task"] == {"job": job, "round": 2, "state": "training", "step": 4, "steps": 10}
    assert devices["a"]["peak_memory_bytes"] == 2**20
    assert fleet["service"] == {"refused": 3, "rejections": REFUSED[1]}
    [summary] = fleet["jobs"]
    assert (summary["state"], summary["round"], summary["training"]) == ("running", 2, 1)
    assert summary["latest"]["value"] == 0.84 and summary["zero_shot"]["value"] == 0.795

    status, _, view = client(f"/api/jobs/{job}")
    assert status == 200
    first, second = view["rounds_detail"]
    assert (first["round"], first["state"], first["evaluation"]["value"], first["done"]) == (1, "done", 0.84, 2)
    tasks = {t["device"]: t for t in first["tasks"]}
    assert tasks["a"]["ran"]["backend"] == "onnxruntime" and tasks["a"]["ran"]["epsilon"] == 1.5
    assert tasks["a"]["bytes_sent"] == 5_000_000 and first["bytes_sent"] == 5_000_000
    assert tasks["b"]["reason"] == "the plan needs 9 GiB; the budget is 6 GiB" and tasks["b"]["ran"] is None
    assert (second["state"], second["evaluation"], second["tasks"][0]["step"]) == ("running", None, 4)
    assert view["request"]["dataset"] == "reviews" and view["request"]["rounds"] == 2


def test_without_the_token_nothing_is_shown(client: Client) -> None:
    for path in ("/api/fleet", "/api/jobs/job-1", "/dashboard.js", "/"):
        status, _, answer = client(path, signed=False)
        assert status == 401, path
        assert "dashboard.token" in answer["error"]
    assert client("/api/fleet", headers={"Authorization": "Bearer " + "x" * 43})[0] == 401
    assert client("/", signed=False, raw=b"{}", method="POST")[0] == 401
    assert client("/?token=wrong", signed=False)[0] == 401


def test_the_token_url_signs_the_browser_in_with_a_cookie(client: Client) -> None:
    status, headers, _ = client(f"/?token={client.dashboard.options.token}", signed=False)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    status, headers, page = client("/", signed=False, headers={"Cookie": cookie})
    assert status == 200 and b"/dashboard.js" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert client("/api/fleet", signed=False, headers={"Cookie": cookie + "x"})[0] == 401


def test_a_loopback_dashboard_answers_only_to_loopback_names(client: Client) -> None:
    status, _, answer = client("/api/fleet", headers={"Host": f"rebound.example:{client.dashboard.port}"})
    assert status == 403 and "rebound.example" in answer["error"]
    assert client("/api/fleet", headers={"Host": f"localhost:{client.dashboard.port}"})[0] == 200


def test_a_read_only_dashboard_changes_nothing(client: Client, registry: Registry) -> None:
    job = registry.add_job(JobSpec("reviews").to_dict())
    status, _, answer = client("/api/jobs", {"args": ["--dataset", "reviews"]}, method="POST")
    assert status == 403 and "--dashboard-control" in answer["error"]
    assert client(f"/api/jobs/{job}/cancel", {}, method="POST")[0] == 403
    assert [j["state"] for j in registry.jobs()] == ["pending"]


def _cli_spec(arguments: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_dispatch_options(parser)
    return spec_from_args(parser.parse_args(arguments)).to_dict()


def test_the_page_dispatches_with_the_clis_checks(control: Client, registry: Registry, tmp_path: Path) -> None:
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("")
    arguments = ["--dataset", "reviews", "--rounds", "3", "--steps", "40", "--test", str(test_file)]
    status, _, answer = control("/api/jobs", {"args": arguments}, method="POST")
    assert status == 201
    assert registry.job(answer["job"])["spec"] == _cli_spec(arguments)
    for bad, named in [
        (["--rounds", "2"], "--dataset"),
        (["--dataset", "reviews", "--rounds", "0"], "rounds=0"),
        (["--dataset", "reviews", "--rounds", "two"], "two"),
        (["--dataset", "reviews", "--test", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--dataset", "reviews", "--quorum", "3", "--devices", "a,b"], "--quorum 3"),
        (["--dataset", "reviews", "--bogus"], "--bogus"),
    ]:
        status, _, answer = control("/api/jobs", {"args": bad}, method="POST")
        assert status == 400 and named in answer["error"], (bad, answer)
    assert len(registry.jobs()) == 1


def test_the_page_cancels_a_job_once(control: Client, registry: Registry) -> None:
    job = registry.add_job(JobSpec("reviews").to_dict())
    status, _, answer = control(f"/api/jobs/{job}/cancel", {}, method="POST")
    assert status == 200 and "cancelled" in answer["message"]
    record = registry.job(job)
    assert record["state"] == "failed" and record["detail"]["reason"] == "cancelled by the operator"
    status, _, answer = control(f"/api/jobs/{job}/cancel", {}, method="POST")
    assert status == 409 and "already failed" in answer["error"]
    assert control("/api/jobs/job-missing/cancel", {}, method="POST")[0] == 404


def test_hostile_requests_are_refused_and_it_keeps_serving(control: Client, registry: Registry) -> None:
    nested = b"[" * 50_000 + b"]" * 50_000
    cases = [
        (dict(raw=b"x" * (65 * 1024), method="POST"), 413),
        (dict(raw=b"not json", method="POST"), 400),
        (dict(raw=nested[:65_000], method="POST"), 400),
        (dict(raw=b'{"args": "--dataset reviews"}', method="POST"), 400),
        (dict(raw=json.dumps({"args": ["--dataset"] * 101}).encode(), method="POST"), 400),
        (dict(raw=b"{}", method="POST", headers={"Content-Type": "text/plain"}), 415),
        (dict(raw=b"{}", method="POST", headers={"Origin": "http://evil.example"}), 403),
        (dict(method="PUT", raw=b"{}"), 405),
        (dict(method="DELETE"), 405),
    ]
    for request, expected in cases:
        status, _, answer = control("/api/jobs", **request)
        assert status == expected, (request, answer)
    for path in ("/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/" + "j" * 200, "/api/nothing", "/../../etc/passwd"):
        assert control(path)[0] == 404, path
    assert control("/api/fleet")[0] == 200 and control.dashboard.errors == 0
    assert registry.jobs() == []


def test_no_auth_is_for_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not loopback"):
        DashboardOptions(8080, host="0.0.0.0")
    DashboardOptions(8080, host="::1")  # loopback: allowed
    (tmp_path / "dashboard.token").write_text("short")
    with pytest.raises(ConfigError, match="delete it"):
        dashboard_token(tmp_path)


def test_the_token_file_is_owner_only_and_kept(tmp_path: Path) -> None:
    token = dashboard_token(tmp_path)
    assert (tmp_path / "dashboard.token").stat().st_mode & 0o777 == 0o600
    assert dashboard_token(tmp_path) == token and len(token) >= 32


def test_fleet_cancel_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = Registry(tmp_path)
    job = registry.add_job(JobSpec("reviews").to_dict())
    assert coordinator(["fleet", "cancel", job, "--state", str(tmp_path)]) == 0
    assert "cancelled" in capsys.readouterr().out and registry.job(job)["state"] == "failed"
    assert coordinator(["fleet", "cancel", job, "--state", str(tmp_path)]) != 0
    assert "already failed" in capsys.readouterr().err


def test_a_cancelled_jobs_result_is_acknowledged_and_dropped(make_fleet, tmp_path: Path) -> None:
    from coordinator.fleet.cli import cancel_job
    from coordinator.fleet.service import wire_job_id
    from tests.fleet.conftest import Amqtt, tiny_spec, wait_for

    broker = Amqtt(tmp_path / "broker").start()
    try:
        fleet = make_fleet(broker)
        registry = fleet.service.registry
        fleet.start_service()
        daemon = fleet.start_daemon("a")
        job = registry.add_job(tiny_spec(fleet.files, rounds=1, steps=200, checkpoint_every=20))
        wait_for(lambda: (registry.task(job, 1, "a") or {}).get("state") == "training", 120, "a to train")
        assert "cancelled" in cancel_job(registry, job)
        # the device finishes and offers its result; the service acknowledges it without fetching or counting it
        wait_for(lambda: daemon._job_state(wire_job_id(job, 1))["state"] == "delivered", 120, "the result delivered")
        assert registry.task(job, 1, "a")["state"] == "trained"  # never received
        assert registry.job(job)["detail"]["reason"] == "cancelled by the operator"
        assert not (fleet.root / "coordinator" / "files" / "jobs" / job / "round-1" / "a").exists()
        assert fleet.service.refused == 0, fleet.service.refusals()
    finally:
        broker.kill()


def test_serve_prints_the_dashboard_url_that_opens_it(fleet_files: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from coordinator.fleet.broker import free_port

    state, port = tmp_path / "state", free_port()
    command = [sys.executable, "-m", "coordinator.cli", "serve", "--state", str(state), "--listen", str(free_port()),
               "--key", str(fleet_files["key"]), "--dashboard", str(port)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any(line.startswith("dashboard: ") for line in lines):
            line = process.stdout.readline()  # type: ignore[union-attr]
            assert line, f"serve stopped: {''.join(lines)}"
            lines.append(line)
        url = next(line for line in lines if line.startswith("dashboard: ")).split()[1]
        token = (state / "dashboard.token").read_text().strip()
        assert url == f"http://127.0.0.1:{port}/?token={token}"
        answer = urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/fleet",
                                        headers={"Authorization": f"Bearer {token}"}), timeout=10)  # fmt: skip
        assert json.loads(answer.read())["control"] is False
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=10)
        assert refused.value.code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert coordinator(["serve", "--state", str(tmp_path / "other"), "--dashboard-control"]) != 0
