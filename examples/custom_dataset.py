"""Offsite tuning on your own labelled CSV through the Python API: your labels, label words and prompt.

    python examples/custom_dataset.py --model smollm2-135m --train my_train.csv --test my_test.csv \
        --label-word spam=" spam" --label-word ham=" normal" --template "Message: {text}\nThis message is"

The CSV needs a header with `text` and `label`. Prints the five-setting table and saves the adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.emulator import Split
from coordinator.evaluation import Experiment, run_five_settings
from coordinator.models import load_model
from coordinator.report import format_table, write_results
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
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/custom"))
    args = parser.parse_args(argv)

    train, test = load_examples(args.train), load_examples(args.test)
    loaded = load_model(args.model)
    label_words = dict(pair.split("=", 1) for pair in args.label_word) or None
    task = make_task(loaded.tokenizer, train, test, label_words, args.template)

    # Adapter: bottom 2 and top 2 layers; the emulator keeps half of the middle layers.
    middle = loaded.model.config.num_hidden_layers - 4
    experiment = Experiment(
        split=Split(bottom=2, top=2, keep=max(2, middle // 2)),
        adapter_training=TrainConfig(steps=args.steps, lr=3e-5, batch_size=8),
        full_training=TrainConfig(steps=args.steps, lr=2e-5, batch_size=8),
    )
    results = run_five_settings(loaded, task, train, test, experiment, args.out / "adapter.safetensors")
    write_results(results, args.out / "results.json")
    print(format_table(results))
    print(f"adapter (full-model names, plugs into the full model): {args.out / 'adapter.safetensors'}")


if __name__ == "__main__":
    main()
