"""Choosing on held-out data: the validation split never touches the test file, the best checkpoint is kept."""

import pytest
import torch

from coordinator.adapters.files import load_adapter
from coordinator.adapters.layers import plug_in
from coordinator.emulator import Split
from coordinator.errors import ConfigError
from coordinator.evaluation.five_settings import Experiment, run_five_settings
from coordinator.evaluation.selection import BestCheckpoint, carve_validation
from coordinator.models import LoadedModel
from coordinator.tasks import ClassificationTask
from coordinator.train import TrainConfig
from edge_runtime.data import Example
from tests.conftest import make_model, sentiment_examples


def test_validation_is_carved_from_training_data_and_never_holds_a_test_sentence():
    train = [Example(f"review {i}", "positive") for i in range(100)]
    test = [Example(f"review {i}", "positive") for i in range(0, 100, 3)]  # a third of train is also in test
    rest, validation = carve_validation(train, test, 40)
    assert len(validation) == 40 and len(rest) == 60
    assert not {e.text for e in validation} & {e.text for e in test}
    assert not {e.text for e in validation} & {e.text for e in rest}
    assert carve_validation(train, test, 40) == (rest, validation)  # seeded
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        carve_validation(train, test, 66)


def test_best_checkpoint_keeps_the_best_state_and_ties_keep_the_earlier():
    weight = torch.nn.Parameter(torch.zeros(2))
    scores = iter([0.5, 0.7, 0.9, 0.6, 0.9])  # steps 0, 10, 20, 30, 40
    selection = BestCheckpoint([weight], lambda: next(scores), every=10)
    for step in range(1, 41):
        with torch.no_grad():
            weight.fill_(step)
        selection.on_step(step)
    selection.restore()
    assert selection.best_step == 20 and weight.tolist() == [20.0, 20.0]
    assert [step for step, _ in selection.curve] == [0, 10, 20, 30, 40]


def test_perplexity_checkpoints_keep_the_lowest_and_the_untrained_start_can_win():
    weight = torch.nn.Parameter(torch.ones(1))
    scores = iter([3.0, 4.0, 5.0])
    selection = BestCheckpoint([weight], lambda: next(scores), every=5, higher_is_better=False)
    for step in range(1, 8):
        with torch.no_grad():
            weight.add_(1)
        selection.on_step(step)
    selection.finish(7)
    selection.restore()
    assert selection.best_step == 0 and weight.item() == 1.0 and selection.curve[-1][0] == 7


def test_five_settings_with_validation_keep_the_checkpoints_that_score_best_on_it(tokenizer, tmp_path):
    model = make_model("llama", vocab_size=len(tokenizer))
    loaded = LoadedModel("tiny-llama", model, tokenizer, tmp_path)
    task = ClassificationTask(tokenizer, {"negative": " negative", "positive": " positive"})
    training = TrainConfig(steps=30, batch_size=8, lr=1e-2)
    experiment = Experiment(
        Split(2, 2, keep=2), training, TrainConfig(steps=30, batch_size=8, lr=3e-3), 8, check_every=10
    )
    train, test = sentiment_examples(80), sentiment_examples(32, seed=3)
    train, validation = carve_validation(train, test, 16)
    saved = tmp_path / "adapter.safetensors"
    results = run_five_settings(loaded, task, train, test, experiment, saved, validation=validation)
    for setting in ("offsite_emulator", "full_finetune"):
        selection = results[setting]["train"]["selection"]
        assert [step for step, _ in selection["validation_curve"]] == [0, 10, 20, 30]
        assert selection["best_value"] == max(value for _, value in selection["validation_curve"])
    assert results["config"]["validation_examples"] == 16
    kept = results["offsite_emulator"]["train"]["selection"]["best_value"]
    plug_in(model, load_adapter(saved)[0])  # the adapter returned is the one that scored best on validation
    assert task.score(model, validation, 8) == kept
