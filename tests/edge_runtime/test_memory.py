"""The memory model: every part grows as it should, and the planner picks the largest micro-batch that fits."""

import pytest

from edge_runtime.memory import CHECKPOINT_COPIES, MIB, BudgetError, ModelShape, choose_micro_batch, estimate
from tests.conftest import SMOLLM2_EMULATOR


def test_optimizer_state_is_twice_the_trainable_weights_and_gradients_equal_them():
    predicted = estimate(SMOLLM2_EMULATOR, 8, 128, "classification", "torch")
    assert predicted.gradients == predicted.trainable_weights == 4 * SMOLLM2_EMULATOR.trainable_parameters
    assert predicted.optimizer_state == 2 * predicted.trainable_weights
    transient = max(predicted.activations + predicted.logits, predicted.checkpoint)  # torch gives a step's back
    assert predicted.total == predicted.resident + transient


def test_an_ort_checkpoint_serializes_what_trains_and_adds_to_what_an_arena_kept():
    plain = estimate(SMOLLM2_EMULATOR, 1, 16, "classification", "ort")
    state = 3 * plain.trainable_weights  # weights and two moments; the frozen ones are fed from their own file
    assert plain.checkpoint == int(CHECKPOINT_COPIES["ort"] * state)
    assert plain.total == plain.resident + plain.checkpoint  # malloc gave the step's memory back
    recomputed = ModelShape(**SMOLLM2_EMULATOR.to_dict() | {"recompute_layers": True})
    arena = estimate(recomputed, 1, 16, "classification", "ort")  # run from ONNX Runtime's arena, which keeps it
    assert arena.total == arena.resident + arena.activations + arena.logits + arena.checkpoint
    assert "keeps_step_memory" not in arena.to_dict()  # the manifest's plan holds byte counts only


def test_activations_grow_with_rows_tokens_and_depth_and_lm_logits_with_tokens():
    base = estimate(SMOLLM2_EMULATOR, 2, 64, "classification", "ort")
    assert estimate(SMOLLM2_EMULATOR, 4, 64, "classification", "ort").activations == pytest.approx(2 * base.activations)
    assert estimate(SMOLLM2_EMULATOR, 2, 128, "classification", "ort").activations > 2 * base.activations
    shallow = ModelShape(**SMOLLM2_EMULATOR.to_dict() | {"backprop_layers": 6})
    assert estimate(shallow, 2, 64, "classification", "ort").activations * 2 == pytest.approx(base.activations)
    assert estimate(SMOLLM2_EMULATOR, 2, 64, "language-model", "ort").logits == 64 * base.logits


def test_the_largest_dividing_micro_batch_that_fits_is_chosen():
    need = {m: estimate(SMOLLM2_EMULATOR, m, 128, "classification", "torch").total for m in (1, 2, 4, 8)}
    budget = int(need[4] * 1.1) + 1
    micro, predicted = choose_micro_batch(SMOLLM2_EMULATOR, 8, 128, "classification", "torch", budget, 0.1)
    assert micro == 4 and predicted.total == need[4]
    micro, _ = choose_micro_batch(SMOLLM2_EMULATOR, 6, 128, "classification", "torch", 10**12, 0.1)
    assert micro == 6


def test_a_budget_below_one_row_is_refused_with_the_budget_it_needs():
    need = estimate(SMOLLM2_EMULATOR, 1, 128, "classification", "ort").total * 1.1 / MIB
    with pytest.raises(BudgetError, match=f"at least {need:,.0f} MiB.*budget is 256 MiB"):
        choose_micro_batch(SMOLLM2_EMULATOR, 8, 128, "classification", "ort", 256 * MIB, 0.1)


def test_dp_sgd_adds_each_rows_gradient_and_the_clipped_sum_to_a_steps_transient():
    private = ModelShape(**SMOLLM2_EMULATOR.to_dict() | {"per_example_gradients": True})
    plain, dp = (estimate(shape, 4, 128, "classification", "torch") for shape in (SMOLLM2_EMULATOR, private))
    assert plain.per_example_gradients == 0
    assert dp.per_example_gradients == (4 + 2) * 4 * SMOLLM2_EMULATOR.trainable_parameters
    assert dp.total - plain.total == dp.per_example_gradients  # a step's transient outweighs a torch checkpoint


def test_int8_frozen_weights_take_a_byte_each_and_leave_the_trainable_ones_alone():
    quantized = SMOLLM2_EMULATOR.frozen_parameters // 2
    stored = ModelShape(**SMOLLM2_EMULATOR.to_dict() | {"quantized_parameters": quantized})
    plain, small = (estimate(shape, 8, 128, "classification", "ort") for shape in (SMOLLM2_EMULATOR, stored))
    assert plain.frozen_weights - small.frozen_weights == 3 * quantized
    assert small.trainable_weights == plain.trainable_weights and small.optimizer_state == plain.optimizer_state
    assert small.checkpoint == plain.checkpoint  # a checkpoint holds no frozen weight, however stored


def test_recomputation_holds_each_layer_input_and_one_layer_not_every_layer():
    recomputed = ModelShape(**SMOLLM2_EMULATOR.to_dict() | {"recompute_layers": True})
    kept, again = (estimate(shape, 8, 256, "classification", "ort") for shape in (SMOLLM2_EMULATOR, recomputed))
    assert again.activations < kept.activations / 4
    deeper = ModelShape(**recomputed.to_dict() | {"backprop_layers": 2 * recomputed.backprop_layers})
    inputs = 8 * 256 * recomputed.hidden * 4 * recomputed.backprop_layers  # one hidden state per extra layer
    assert estimate(deeper, 8, 256, "classification", "ort").activations - again.activations == inputs
