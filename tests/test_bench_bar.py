"""The bar every benchmark reports: margins in points or percent, and which conditions hold at their edges."""

import pytest

from bench.bar import accuracy_bar, bar_table, perplexity_bar


def test_accuracy_bar_margins_are_points_and_hold_at_their_edges():
    # plug-in 0.88: exactly 2 under the fine-tune, exactly 3 over the tuned emulator, the emulator 3 under full.
    bar = accuracy_bar(full_zero_shot=0.80, emulator_zero_shot=0.77, full_finetune=0.90, offsite_emulator=0.85,
                       offsite_plugin=0.88)  # fmt: skip
    assert [c.margin for c in bar] == pytest.approx([-2.0, 3.0, 8.0, 3.0])
    assert [c.needed for c in bar] == [-2, 3, 0, 3]
    assert all(condition.holds for condition in bar)


def test_accuracy_bar_fails_the_line_that_is_missed():
    bar = accuracy_bar(0.80, 0.70, 0.90, 0.875, 0.89)  # the emulator with its adapter is 1.5 under the plug-in
    assert [condition.holds for condition in bar] == [True, False, True, True]
    assert bar[1].margin == pytest.approx(1.5)


def test_perplexity_bar_is_relative():
    bar = perplexity_bar(full_zero_shot=31.75, full_finetune=22.32, plugin=23.63)
    assert bar[0].margin == pytest.approx(100 * (1 - 23.63 / 31.75)) and bar[0].holds
    assert bar[1].margin == pytest.approx(-5.87, abs=0.01) and not bar[1].holds


def test_bar_table_shows_margin_need_and_verdict():
    rows = bar_table(perplexity_bar(30.0, 20.0, 20.5))
    assert rows[2] == "| plug-in perplexity below full zero-shot's | +31.7 % (needs +0) | yes |"
    assert rows[3] == "| plug-in perplexity within 5 % of the full fine-tune's | -2.5 % (needs -5) | yes |"
