"""TrainCallback: the hooks a train stage calls, each a no-op here; a callback overrides what it needs.

Methods that change masks while training (dsr, gumbel, gradual), sparse activations and the
rewind saver are callbacks. Order of the calls in one train stage:

1. `prepare(model, enforcer, steps_per_epoch=N)`: once, before the optimizer exists (a method
   may add trainable parameters here, e.g. gumbel's logits);
2. `on_train_start(model, enforcer)`: once, before the first step (on a resume: before the
   saved state, theirs included, is restored through `load_state_dict`);
3. `after_step(step, epoch, model, enforcer)`: after every optimizer step, once
   `enforcer.apply_()` has run; `step` counts the stage's optimizer steps from 1. A callback
   that changes a mask calls `enforcer.set_mask(name, mask)` and must do the same on every rank
   (masks are compared by hash at every train-state save and at the end of the stage);
4. `on_train_end(model, enforcer)`: once, after the last step and before the checkpoint is
   written (e.g. to remove wrappers and install the final masks);
5. `stage_tensors()` / `stage_meta()`: what the stage's checkpoint stores for the next stage
   (tensors under the method's prefix; metadata merged under `method_state`).

`state_dict()` / `load_state_dict(state)` travel in the train-state (values: tensors, numbers,
strings, lists, dicts; None: nothing to keep).
"""

from __future__ import annotations

from typing import Any


class TrainCallback:
    """Base class of every train callback."""

    def prepare(self, model, enforcer, *, steps_per_epoch: int) -> None:
        """Before the optimizer is built."""

    def on_train_start(self, model, enforcer) -> None:
        """Before the first step."""

    def after_step(self, step: int, epoch: int, model, enforcer) -> None:
        """After every optimizer step (masks already applied)."""

    def on_train_end(self, model, enforcer) -> None:
        """After the last step, before the checkpoint is written."""

    def state_dict(self) -> Any:
        """What the train-state keeps of this callback (None: nothing)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Put back what `state_dict` returned."""

    def stage_tensors(self) -> dict:
        """Tensors for the stage's checkpoint (full keys, e.g. `gumbel.logits.<fqn>`)."""
        return {}

    def stage_meta(self) -> dict:
        """Metadata for the stage's checkpoint, merged under `method_state`."""
        return {}
