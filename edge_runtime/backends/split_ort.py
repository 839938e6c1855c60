"""A split job's device side on ONNX Runtime training: the cut for a batch, then the prompt's step for the
server's gradient at it. No torch.

The graphs (`exporters/split_onnx.py`) share one set of weights: the eval graph gives the cut to send; the training
graph, given the same batch and the gradient at the cut, computes the soft prompt's gradient (its loss is
sum(cut × gradient), whose gradient on the prompt is the backward pass from the cut) and AdamW steps. The training
graph runs the forward again, since the server's answer comes between the two calls: 4/3 of a step that kept its
activations, and no activations held while the device waits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.backends.ort_api import CheckpointState, Module, Optimizer, SessionOptions
from edge_runtime.frozen_inputs import FrozenInputs
from edge_runtime.heap import give_back_free_heap

CUT, CUT_GRADIENT = "cut", "cut_gradient"
CHECKPOINT = "checkpoint"  # the state file `save` writes
PROMPT = "side.soft_prompt"  # the soft prompt's name in the graphs (exporters/split_onnx.CutGraph)


def _options(threads: int | None) -> SessionOptions:
    """As the ORT backend runs a graph that keeps its activations (`ort.py` says why): no buffer reuse, glibc's
    heap rather than the arena, its free pages given back after each call."""
    options = SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    options.enable_mem_reuse = False
    options.enable_cpu_mem_arena = False
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


class OrtCutSide:
    """The embeddings, a trainable soft prompt and the first k layers, as exported for ONNX Runtime training,
    from the export's initial state (`resume` continues from a saved one)."""

    name = "ort-split"  # what a checkpoint's progress names as its backend

    def __init__(self, graphs: Path, threads: int | None = None) -> None:
        self.graphs, self.options = graphs, _options(threads)
        self.frozen = FrozenInputs(graphs)
        self._load(graphs / CHECKPOINT)

    def resume(self, directory: Path) -> None:
        """Continue from the state `save` wrote into `directory`."""
        self._load(directory / CHECKPOINT)

    def _load(self, checkpoint: Path) -> None:
        self.module = self.optimizer = self.state = None  # the old session goes before the new one loads
        self.state = CheckpointState.load_checkpoint(str(checkpoint))
        self.module = Module(str(self.graphs / "training_model.onnx"), self.state,
                             str(self.graphs / "eval_model.onnx"), session_options=self.options)  # fmt: skip
        self.optimizer = Optimizer(str(self.graphs / "optimizer_model.onnx"), self.module)

    def save(self, directory: Path) -> None:
        """Write the prompt and AdamW's state into `directory` (which exists and is empty)."""
        CheckpointState.save_checkpoint(self.state, str(directory / CHECKPOINT), include_optimizer_state=True)

    def _run(self, training: bool, input_ids: np.ndarray, attention_mask: np.ndarray, gradient: np.ndarray
             ) -> np.ndarray:  # fmt: skip
        self.module.train(training)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, CUT_GRADIENT: gradient}
        outputs = self.module(*self.frozen.feeds(self.module.input_names(), batch))  # OrtValues in, OrtValues out
        cut = outputs[self.module.output_names().index(CUT)].numpy()
        give_back_free_heap()
        return cut

    def cut(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Hidden states [B, P + T, H] after the device's last layer, the prompt's positions in front."""
        prompt_tokens, hidden = self.prompt().shape
        shape = (input_ids.shape[0], prompt_tokens + input_ids.shape[1], hidden)
        return self._run(False, input_ids, attention_mask, np.zeros(shape, np.float32))

    def accumulate(self, input_ids: np.ndarray, attention_mask: np.ndarray, gradient: np.ndarray) -> None:
        """Add the prompt's gradient for the server's `gradient` at this batch's cut (`prompt_gradient` reads it)."""
        self._run(True, input_ids, attention_mask, np.ascontiguousarray(gradient, np.float32))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, gradient: np.ndarray, lr: float) -> None:
        """The prompt's AdamW step (its gradient clipped by norm, as exported) for the gradient at the cut."""
        self.accumulate(input_ids, attention_mask, gradient)
        self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def load_prompt(self, prompt: np.ndarray) -> None:
        """Start from `prompt` [P, H] (a round's aggregate) instead of the export's."""
        self.state.parameters[PROMPT] = np.ascontiguousarray(prompt, np.float32)

    def prompt(self) -> np.ndarray:
        """The soft prompt [P, H] as trained so far (a copy)."""
        return np.array(self.state.parameters[PROMPT].data)

    def prompt_gradient(self) -> np.ndarray:
        """The gradient accumulated on the prompt since the last step (a copy)."""
        return np.array(self.state.parameters[PROMPT].grad)
