"""Methods: how masks behave while training, picked by `sparsify.method`.

A method is one class registered with `@METHODS.register(name)`. `static` keeps the masks that
`prune` rounds wrote; the others change masks during training through train callbacks
(`sparsify.training.callbacks.TrainCallback`) that `callbacks(context)` builds for a train
stage. A method that stores tensors in checkpoints keeps them under its `tensor_prefix`
(`gumbel.logits.<fqn>`, ...) and validates them in `check_tensors` when a checkpoint loads.

To add a method: subclass `Method` in a module of your own, register it, and name the module
under `plugins:` in the config (or in the `sparsify.methods` entry points of a distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sparsify.errors import SparsifyError
from sparsify.registry import METHODS


@dataclass
class TrainContext:
    """What a method's callbacks get from the train stage."""

    sparsity: Any  # the config's `sparsity:` section
    eligible: list[str]  # eligible weight names, in model order
    parent_meta: dict  # metadata of the checkpoint the stage starts from
    seed: int
    extra: dict = field(default_factory=dict)  # anything else a method needs (trainable, parent tensors, ...)


class MethodOptions(BaseModel):
    """Base of a method's options: strict, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Method:
    """One value of `sparsity.method` (class attributes describe it; nothing is instantiated)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    prune_rounds: ClassVar[bool] = True  # True: masks come from `prune` rounds; False: training sets them
    patterns: ClassVar[tuple[str, ...]] = ("block", "unstructured", "nm")  # pattern types it accepts
    tensor_prefix: ClassVar[str | None] = None  # checkpoint tensors it saves: "<prefix>.<kind>.<fqn>"
    learns_masks: ClassVar[bool] = False  # has mask parameters of its own (train.trainable: mask trains only those)
    Options: ClassVar[type[BaseModel] | None] = None  # the keys of its config section `sparsity.<name>`

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse config keys that do not fit this method (SparsifyError naming the key and the fix)."""
        if config.train.trainable == "mask" and not cls.learns_masks:
            raise SparsifyError(f"train.trainable: mask trains only learned mask logits, which method {cls.name} "
                                "does not have; set sparsity.method: gumbel or train.trainable: all")

    @classmethod
    def callbacks(cls, context: TrainContext) -> list:
        """The train callbacks of one train stage (none: masks stay as they are)."""
        return []

    @classmethod
    def check_tensors(cls, state: dict, masks: dict, extra: dict, *, source) -> None:
        """Refuse a checkpoint whose `tensor_prefix` tensors do not fit its weights (CheckpointError)."""


def callbacks_for(config, model, *, parent_meta: dict, extra: dict | None = None) -> list:
    """The train callbacks of the config's method for `model` (eligible layers as `prune` sees them)."""
    from sparsify.core.patterns import build_pattern
    from sparsify.core.prune import find_layers

    s = config.sparsity
    pattern = build_pattern(s.pattern.model_dump())
    layers = find_layers(model, pattern, include_linear=s.include_linear, exclude=s.exclude)
    eligible = [layer.name for layer in layers if layer.reason is None]
    return METHODS.get(s.method).callbacks(TrainContext(s, eligible, parent_meta, config.seed, dict(extra or {})))


def stage_tensors(callbacks: list) -> dict:
    """Extra checkpoint tensors the callbacks ask for (full keys, e.g. `gumbel.logits.<fqn>`)."""
    tensors: dict = {}
    for callback in callbacks:
        tensors.update(callback.stage_tensors())
    return tensors


def stage_meta(callbacks: list) -> dict:
    """Checkpoint metadata the callbacks ask for, merged under `method_state`."""
    state: dict = {}
    for callback in callbacks:
        state.update(callback.stage_meta())
    return {"method_state": state} if state else {}
