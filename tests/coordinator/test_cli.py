"""`coordinator` end to end on a tiny model folder, and its one-line errors for bad input."""

import json

import pytest

from coordinator.cli import main
from coordinator.datasets import write_jsonl
from tests.conftest import make_model, make_tokenizer, sentiment_examples


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tokenizer = make_tokenizer()
    make_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_jsonl(tmp_path / "train.jsonl", sentiment_examples(32))
    write_jsonl(tmp_path / "test.jsonl", sentiment_examples(16, seed=5))
    return folder


def _evaluate(tmp_path, folder, *extra):
    data = ["--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl")]
    options = ["--adapter-layers", "1,1", "--keep", "2", "--steps", "4", "--batch-size", "4"]
    return main(["evaluate", "--model", str(folder), *data, *options, "--out", str(tmp_path / "r.json"), *extra])


def test_evaluate_prints_the_table_and_writes_results(tiny_folder, tmp_path, capsys):
    assert _evaluate(tmp_path, tiny_folder, "--save-adapter", str(tmp_path / "a.safetensors")) == 0
    printed = capsys.readouterr().out
    assert "Offsite plug-in" in printed and "Emulator zero-shot" in printed
    results = json.loads((tmp_path / "r.json").read_text())
    # The default recipe (greedy with rank-64 harmonizers), at this command's --keep.
    assert results["emulator"]["spec"] == "greedy:keep=2,harmonize=64"
    layers = results["config"]["emulator_layers"]
    assert len(layers) == 4 and layers[0] == 0 and layers[-1] == 5
    assert (tmp_path / "r.png").is_file() and (tmp_path / "a.safetensors").is_file()


def test_emulator_command_saves_a_loadable_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "emulator"
    options = ["--adapter-layers", "1,1", "--keep", "2", "--emulator", "uniform", "--out", str(out)]
    assert main(["emulator", "--model", str(tiny_folder), *options]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["offsite_emulator"]["layer_map"] == [0, 1, 4, 5]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--keep", "9"], "choose keep in 2..4"),
        (["--steps", "0"], "steps=0 must be at least 1"),
        (["--limit-test", "0"], "--limit-test 0"),
        (["--eval-batch-size", "0"], "eval_batch_size=0 must be at least 1"),
        (["--label-word", "positive= good"], "labels ['negative'] have no label word"),
    ],
)
def test_bad_options_exit_2_with_the_reason(tiny_folder, tmp_path, capsys, extra, message):
    assert _evaluate(tmp_path, tiny_folder, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bad_data_line_is_named(tiny_folder, tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"text": "fine", "label": "positive"}\n{"text": oops}\n')
    assert _evaluate(tmp_path, tiny_folder) == 2
    assert f"{tmp_path / 'train.jsonl'}:2: not valid JSON" in capsys.readouterr().err


def test_unknown_model_lists_what_is_accepted(tiny_folder, tmp_path, capsys):
    assert _evaluate(tmp_path, tmp_path / "nowhere") == 2
    assert "smollm2-135m" in capsys.readouterr().err
