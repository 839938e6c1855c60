"""Offsite tuning on your own labelled CSV through the Python API: your labels, label words and prompt.

    python examples/custom_dataset.py --model smollm2-135m --train my_train.csv --test my_test.csv \
        --label-word spam=" spam" --label-word ham=" normal" --template "Message: {text}\nThis message is"

The CSV needs a header with `text` and `label`. Prints the five-setting table and saves the adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.compression import EmulatorSpec
from coordinator.defaults import DEFAULT_EMULATOR, DEFAULT_LR
from coordinator.emulator import Split
from coordinator.evaluation.five_settings import Experiment, run_five_settings
from coordinator.evaluation.report import format_table, write_results
from coordinator.evaluation.selection import carve_validation
from coordinator.models import load_model
from coordinator.tasks import make_task
from coordinator.train import TrainConfig
from edge_runtime.data import load_examples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--label-word", action="append", default=[], metavar="LABEL=WORD")
    parser.add_argument("--template", default="Text: {text}\nLabel:")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--validation", type=int, default=200, help="examples carved from --train to choose on")
    parser.add_argument("--out", type=Path, default=Path("runs/custom"))
    args = parser.parse_args(argv)

    train, test = load_examples(args.train), load_examples(args.test)
    # Checkpoints are chosen on examples carved from the training file, never on the test file.
    train, validation = carve_validation(train, test, args.validation)
    loaded = load_model(args.model)
    label_words = dict(pair.split("=", 1) for pair in args.label_word) or None
    task = make_task(loaded.tokenizer, train, test, label_words, args.template)

    # Adapter: bottom 2 and top 2 layers; the emulator removes the ~15 % of the middle layers whose removal moves
    # the model's predictions least (the defaults keep 22 of SmolLM2's 26) and fits a small harmonizer in place of
    # each removed run.
    keep = max(2, round(0.85 * (loaded.model.config.num_hidden_layers - 4)))
    experiment = Experiment(
        split=Split(bottom=2, top=2, keep=keep),
        adapter_training=TrainConfig(steps=args.steps, lr=DEFAULT_LR, batch_size=8),
        full_training=TrainConfig(steps=args.steps, lr=2e-5, batch_size=8),
        emulator=EmulatorSpec.parse(DEFAULT_EMULATOR, keep=keep),
    )
    adapter = args.out / "adapter.safetensors"
    results = run_five_settings(loaded, task, train, test, experiment, adapter, validation=validation)
    write_results(results, args.out / "results.json")
    print(format_table(results))
    print(f"adapter (full-model names, plugs into the full model): {adapter}")


if __name__ == "__main__":
    main()
