"""The examples a user copies still run (on a tiny model)."""

import csv
import runpy
import sys
from pathlib import Path

from coordinator.datasets import write_jsonl
from tests.conftest import make_model, make_tokenizer, sentiment_examples

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_dataset_example_runs_on_a_csv(tmp_path, monkeypatch, capsys):
    tokenizer = make_tokenizer()
    make_model("opt", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    for name, examples in (("train", sentiment_examples(24)), ("test", sentiment_examples(8, seed=2))):
        with (tmp_path / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([e.text, "good" if e.label == "positive" else "bad"] for e in examples)
    argv = ["custom_dataset.py", "--model", str(tmp_path / "tiny"), "--train", str(tmp_path / "train.csv")]
    argv += ["--test", str(tmp_path / "test.csv"), "--label-word", "good= positive", "--label-word", "bad= negative"]
    argv += ["--template", "review : {text} sentiment :", "--steps", "3", "--validation", "6"]
    argv += ["--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "custom_dataset.py"), run_name="__main__")
    assert "Offsite plug-in" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter.safetensors").is_file() and (tmp_path / "out" / "results.png").is_file()


def test_local_fleet_example_runs_a_federated_job_end_to_end(tmp_path):
    """The demo script: `coordinator serve`, two `edge-runtime run` processes, `fleet dispatch`, `evaluate`."""
    import subprocess

    tokenizer = make_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    write_jsonl(tmp_path / "train.jsonl", sentiment_examples(40))
    write_jsonl(tmp_path / "test.jsonl", sentiment_examples(8, seed=2))
    command = [sys.executable, str(EXAMPLES / "fleet" / "local_fleet.py"), "--model", str(tmp_path / "tiny")]
    command += ["--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"), "--keep", "2"]
    command += ["--adapter-layers", "1,1", "--steps", "3", "--full-steps", "2", "--limit-test", "8"]
    command += ["--out", str(tmp_path / "demo"), "--no-gguf"]  # a folder model has no GGUF: test_gguf_smollm2 plugs
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "round 2: done" in run.stdout and "Offsite plug-in" in run.stdout
    fleet_rows = [line for line in run.stdout.splitlines() if line.startswith("device-")]
    assert [row.split()[:3] for row in fleet_rows] == [
        ["device-1", "1", "received"],
        ["device-2", "1", "received"],
        ["device-1", "2", "received"],
        ["device-2", "2", "received"],
    ]
    assert (tmp_path / "demo" / "results.json").is_file()
