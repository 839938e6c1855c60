"""Write `coordinator/fleet/utility_table.json`: the validation curves per-device configuration chooses by.

    python -m bench.utility_table

Reads the saved results of `bench.steps_curve` (complete runs of N steps: the "runs" curves; with `--devices K`,
their FedAvg aggregate over K devices: the "aggregates" curves), `bench.recipe_choice`
(whole layers, one file per recipe), `bench.adapter_kinds` (LoRA, bias, prompt: the learning rate whose curve peaks
highest on validation) and `bench.utility` (smaller emulators): the "checkpoints" curves. Only validation numbers
(reviews carved from the training file) go in; no test score does.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.fleet.utility import AGGREGATES, CHECKPOINTS, RUNS, TABLE, recipe_key
from edge_runtime.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, TASK = "smollm2-135m", "classification"


def _row(emulator: str, adapter: str, curve: list, source: str, kind: str = CHECKPOINTS) -> dict:
    return {
        "kind": kind,
        "model": MODEL,
        "task": TASK,
        "emulator": recipe_key(emulator, 0),
        "adapter": adapter.partition(":")[0],
        "curve": [[int(step), round(float(value), 4)] for step, value in curve],
        "source": source,
    }


def curves() -> list[dict]:
    """Every saved validation curve, one per (emulator, adapter kind), the best learning rate's where several."""
    rows: dict[tuple[str, str], dict] = {}

    def keep_best(row: dict) -> None:
        key = (row["emulator"], row["adapter"], row["kind"])
        if key not in rows or max(v for _, v in row["curve"]) > max(v for _, v in rows[key]["curve"]):
            rows[key] = row

    utility = json.loads((RESULTS / "utility_sentiment.json").read_text())
    for recipe in utility["recipes"]:
        selection = recipe["offsite_emulator"]["train"]["selection"]
        keep_best(_row(recipe["emulator"]["spec"], "layers", selection["validation_curve"], "python -m bench.utility"))
    for path in sorted((RESULTS / "recipe_choice").glob("*.json")):
        run = json.loads(path.read_text())
        keep_best(_row(run["spec"], "layers", run["plugin_curve"], run["command"]))
    for path in sorted((RESULTS / "adapter_kinds").glob("*.json")):
        run = json.loads(path.read_text())
        selection = run["offsite_emulator"]["train"]["selection"]
        keep_best(_row(run["emulator"]["spec"], run["kind"], selection["validation_curve"], run["command"]))
    for path in sorted((RESULTS / "steps_curve").glob("*.json")):
        run = json.loads(path.read_text())
        kind = AGGREGATES if run.get("devices", 1) > 1 else RUNS
        keep_best(_row(run["spec"], run["adapter"], run["curve"], run["command"], kind))
    return [rows[key] for key in sorted(rows)]


def main() -> None:
    rows = curves()
    write_json_atomic(TABLE, {"schema": 1, "curves": rows})
    for row in rows:
        best = max(row["curve"], key=lambda point: point[1])
        best_text = f"best {100 * best[1]:.1f} % at step {best[0]}"
        print(f"{row['emulator']:<40} {row['adapter']:<7} {row['kind']:<11} {best_text}")
    print(f"wrote {TABLE.relative_to(Path.cwd()) if TABLE.is_relative_to(Path.cwd()) else TABLE}")


if __name__ == "__main__":
    main()
