"""What the fleet dashboard shows, as JSON-ready dicts read from the registry: the fleet overview and one job."""

from __future__ import annotations

import time
from typing import Any

from coordinator.fleet.registry import TASK_DONE, Registry

GIB = 1024**3
SHOWN_REJECTIONS = 20  # the latest refusals the overview lists (the service keeps more; `refused` counts them all)
SHOWN_JOBS = 50  # the newest jobs the overview lists (`jobs_total` counts them all; /api/jobs/JOB reads any)


def _latest_tasks(registry: Registry, jobs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each device's task in the current round of each running or aggregating job of `jobs` (the last job's wins)."""
    current: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job["state"] in ("running", "aggregating"):
            for task in registry.tasks(job["id"], job["round"]):
                current[task["device"]] = task
    return current


def _privacy_spent(registry: Registry) -> dict[str, tuple[float, int]]:
    """Per device: the ε its received differentially private results add up to (sequential composition, an upper
    bound), and how many there were: DP-SGD's, what the device's own ledger charges (a split job's noise on the
    cut is another guarantee, shown per task as `cut_epsilon`)."""
    spent: dict[str, tuple[float, int]] = {}
    for row in registry.received_privacy():
        epsilon = row["epsilon"]
        if epsilon is not None:
            total, count = spent.get(row["device"], (0.0, 0))
            spent[row["device"]] = (total + epsilon, count + 1)
    return spent


def _task_view(task: dict[str, Any], configuration: dict[str, Any] | None) -> dict[str, Any]:
    """One device's task in one round: where it is, what crossed the wire, and what it ran."""
    detail, metrics = task["detail"] or {}, task["metrics"] or {}
    ran = None
    if metrics:
        emulator, split = metrics.get("emulator") or {}, metrics.get("split") or {}
        ran = {
            "backend": metrics.get("backend"),
            "emulator": emulator.get("recipe"),
            "emulator_layers": len(emulator.get("layer_map") or []),
            "adapter_kind": metrics.get("adapter_kind"),
            "steps": metrics.get("steps"),
            "micro_batch": metrics.get("micro_batch"),
            "threads": metrics.get("threads"),
            "budget_bytes": metrics.get("budget_bytes"),
            "peak_memory_bytes": metrics.get("peak_memory_bytes"),
            "wall_seconds": metrics.get("wall_seconds"),
            "final_loss": metrics.get("final_loss"),
            "epsilon": (metrics.get("privacy") or {}).get("epsilon"),
            "cut_epsilon": (split.get("cut_privacy") or {}).get("epsilon"),
            "split_bytes_up": split.get("bytes_up"),  # a split job's exchanges, beside the task's own transfers
            "split_bytes_down": split.get("bytes_down"),
        }
    return {
        "device": task["device"],
        "state": task["state"],
        "step": metrics.get("steps") if task["state"] == "received" else detail.get("step"),
        "steps": metrics.get("steps") if task["state"] == "received" else detail.get("steps"),
        "loss": detail.get("loss"),
        "reason": detail.get("reason") if task["state"] == "skipped" else None,
        "examples": task["examples"],
        "bytes_sent": task["bytes_sent"],
        "bytes_received": task["bytes_received"],
        "started": task["started"],
        "finished": task["finished"],
        "chosen": configuration.get("why") if configuration else None,
        "ran": ran,
    }


def _request_view(spec: dict[str, Any]) -> dict[str, Any]:
    """What a job asked every device to run (a per-device job chose per device; see each task's `chosen`)."""
    bundle = spec["bundle"]
    return {
        "dataset": spec["dataset"],
        "model": bundle["model"],
        "emulator": bundle["emulator"],
        "adapter_kind": bundle["adapter_kind"],
        "adapter_layers": bundle["adapter_layers"],
        "steps": bundle["training"]["steps"],
        "lr": bundle["training"]["lr"],
        "rounds": spec["rounds"],
        "aggregate": spec["aggregate"],
        "clip_norm": spec["clip_norm"],
        "deadline_s": spec["deadline_s"],
        "quorum": spec["quorum"],
        "per_device": spec["per_device"],
        "dp": bundle.get("dp"),
        "split_after": (spec.get("split") or {}).get("cut_after"),
        "test": spec["test"],
        "limit_test": spec["limit_test"],
    }


def _job_summary(registry: Registry, job: dict[str, Any]) -> dict[str, Any]:
    tasks = registry.tasks(job["id"], job["round"]) if job["round"] else []
    states = [task["state"] for task in tasks]
    scored = [r["evaluation"] for r in registry.rounds(job["id"]) if r["evaluation"]]
    return {
        "id": job["id"],
        "state": job["state"],
        "round": job["round"],
        "rounds": job["spec"]["rounds"],
        "dataset": job["spec"]["dataset"],
        "model": job["spec"]["bundle"]["model"],
        "adapter_kind": job["spec"]["bundle"]["adapter_kind"],
        "created": job["created"],
        "updated": job["updated"],
        "reason": job["detail"].get("reason"),
        "devices": len(tasks),
        "received": states.count("received"),
        "skipped": states.count("skipped"),
        "training": states.count("training"),
        "latest": scored[-1] if scored else None,
        "zero_shot": job["detail"].get("zero_shot"),
    }


def fleet_overview(registry: Registry, refused: int, rejections: list[str], control: bool) -> dict[str, Any]:
    """The page's top half: every device, the newest jobs in brief, and what the service refused."""
    now, jobs, spent = time.time(), registry.jobs(), _privacy_spent(registry)
    current = _latest_tasks(registry, jobs)
    devices = []
    for row in registry.devices():
        profile, task = row["profile"] or {}, current.get(row["id"])
        latest = next(iter(registry.device_results(row["id"], limit=1)), None)
        metrics = (latest or {}).get("metrics") or {}
        epsilon, private_results = spent.get(row["id"], (None, 0))
        budget = profile.get("training_budget_gb")
        devices.append(
            {
                "id": row["id"],
                "state": row["state"],
                "profile": profile.get("name"),
                "backends": row["backends"] or [],
                "datasets": row["datasets"] or {},
                "last_seen": row["last_seen"],
                "seen_seconds_ago": max(0.0, now - row["last_seen"]),
                "memory_budget_bytes": int(budget * GIB) if budget else None,
                "measured_budget_bytes": metrics.get("budget_bytes"),
                "peak_memory_bytes": metrics.get("peak_memory_bytes"),
                "epsilon_spent": epsilon,
                "private_results": private_results,
                "task": None
                if task is None
                else {
                    "job": task["job"],
                    "round": task["round"],
                    "state": task["state"],
                    "step": (task["detail"] or {}).get("step"),
                    "steps": (task["detail"] or {}).get("steps"),
                },
            }
        )
    return {
        "now": now,
        "control": control,
        "service": {"refused": refused, "rejections": rejections[-SHOWN_REJECTIONS:]},
        "workers": [{"id": w["id"], "host": w["host"], "heartbeat": w["heartbeat"]} for w in registry.workers()],
        "devices": devices,
        "jobs": [_job_summary(registry, job) for job in reversed(jobs[-SHOWN_JOBS:])],
        "jobs_total": len(jobs),
    }


def job_view(registry: Registry, job_id: str) -> dict[str, Any]:
    """One job: what it asked, its full model's zero-shot score, and per round its devices, bytes and score.
    ConfigError (from the registry) for an unknown job."""
    job = registry.job(job_id)
    detail = job["detail"]
    configurations = detail.get("configurations") or {}
    evaluations = {r["round"]: r for r in registry.rounds(job_id)}
    rounds: dict[int, list[dict[str, Any]]] = {}
    for task in registry.tasks(job_id):
        rounds.setdefault(task["round"], []).append(_task_view(task, configurations.get(task["device"])))
    shown = []
    for number, tasks in sorted(rounds.items()):
        finished = evaluations.get(number) or {}
        shown.append(
            {
                "round": number,
                "state": finished.get("state", "running"),
                "evaluation": finished.get("evaluation"),
                "finished": finished.get("finished"),
                "bytes_sent": sum(t["bytes_sent"] for t in tasks),
                "bytes_received": sum(t["bytes_received"] for t in tasks),
                "done": sum(t["state"] in TASK_DONE for t in tasks),
                "tasks": tasks,
            }
        )
    return _job_summary(registry, job) | {
        "request": _request_view(job["spec"]),
        "left_out": detail.get("left_out") or {},
        "rounds_detail": shown,
    }
