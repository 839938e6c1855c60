"""The examples a user copies still run (on a tiny model)."""

import csv
import runpy
import sys
from pathlib import Path

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
    argv += ["--template", "review : {text} sentiment :", "--steps", "3", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "custom_dataset.py"), run_name="__main__")
    assert "Offsite plug-in" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter.safetensors").is_file() and (tmp_path / "out" / "results.png").is_file()
