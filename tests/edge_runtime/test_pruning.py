"""Dataset pruning drops exactly the requested fraction of the easiest examples."""

from __future__ import annotations

import math
import random

import pytest

from edge_runtime.pruning import el2n, label_loss, prune


def test_el2n_and_loss_rank_a_confident_right_answer_easiest():
    assert el2n([0.0, 1.0], 1) == 0.0
    assert el2n([1.0, 0.0], 1) == pytest.approx(math.sqrt(2))
    assert el2n([0.5, 0.5], 0) == pytest.approx(math.sqrt(0.5))
    assert label_loss([0.1, 0.9], 1) < label_loss([0.5, 0.5], 1) < label_loss([0.9, 0.1], 1)
    assert math.isfinite(label_loss([1.0, 0.0], 1))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.3, 0.5, 0.99])
def test_pruning_drops_exactly_the_requested_fraction_of_the_easiest_examples(fraction):
    rng = random.Random(7)
    scores = [rng.random() for _ in range(103)]
    pruned = prune(scores, fraction)
    dropped = sorted(set(range(len(scores))) - set(pruned.kept))
    assert len(dropped) == pruned.dropped == math.floor(fraction * len(scores))
    assert pruned.kept == sorted(pruned.kept)  # the device's order is kept
    if dropped:
        assert max(scores[i] for i in dropped) <= min(scores[i] for i in pruned.kept)
    assert pruned.record()["kept"] == len(scores) - pruned.dropped


def test_ties_drop_the_earlier_examples_and_bad_settings_are_refused():
    assert prune([0.2, 0.1, 0.1, 0.3], 0.5).kept == [0, 3]
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        prune([0.1], 1.0)
    with pytest.raises(ValueError, match="is not one of el2n, loss"):
        prune([0.1], 0.5, score="forgetting")
    with pytest.raises(ValueError, match="finite"):
        prune([0.1, float("nan")], 0.5)
