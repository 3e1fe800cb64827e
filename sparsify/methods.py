"""Methods: how masks behave while training, picked by `sparsity.method`.

`static` keeps the masks that `prune` rounds wrote. The other methods change masks during
training through callbacks of `train_epochs` (`on_train_start`, `after_step`, `state_dict`,
`load_state_dict`, and here `stage_meta`: what the stage's checkpoint records so the next stage
continues). Each method is one `Method` entry; its callbacks factory is named as
"module:function" and imported only when a train stage starts, so this module (read by the
config) does not import torch.

To add a method: register a `Method` below and give its factory the signature
`factory(context: TrainContext) -> list[callback]`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.registry import Registry


@dataclass(frozen=True)
class Method:
    """One value of `sparsity.method`."""

    name: str
    summary: str
    prune_rounds: bool  # True: masks come from `prune` rounds; False: training sets them
    patterns: tuple[str, ...]  # pattern types the method accepts
    factory: str | None = None  # "module:function" building the train callbacks (None: no callbacks)


@dataclass
class TrainContext:
    """What a method's callbacks factory gets from the train stage."""

    sparsity: Any  # the config's `sparsity:` section
    eligible: list[str]  # eligible weight names, in model order
    parent_meta: dict  # metadata of the checkpoint the stage starts from
    seed: int
    extra: dict = field(default_factory=dict)  # anything else a method needs (device, loader length, ...)


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    """Record `method` under its name (a name registered twice is an error)."""
    return METHODS.register(method.name)(method)


register_method(Method(
    "static", "masks fixed during training; `prune` rounds shrink them", prune_rounds=True,
    patterns=("block", "unstructured"),
))
register_method(Method(
    "dsr", "dynamic sparse reparameterization (Mostafa & Wang 2019): prune below a global "
    "threshold and regrow at random positions every `period` steps", prune_rounds=False,
    patterns=("unstructured",), factory="sparsify.dsr:make_callbacks",
))
register_method(Method(
    "gumbel", "learned 2:4 masks (Danhofer 2024): six logits per group of four weights, hard "
    "Gumbel-softmax with a straight-through estimator; the argmax pattern is saved", prune_rounds=False,
    patterns=("nm", "unstructured"), factory="sparsify.gumbel:make_callbacks",
))
register_method(Method(
    "gradual", "gradual pruning inside training (Zhu & Gupta 2017): cubic schedule from "
    "`initial` to the target, pruning every `frequency` steps", prune_rounds=False,
    patterns=("block", "unstructured"), factory="sparsify.gradual:make_callbacks",
))


def check_method(name: str, *, pattern_type: str) -> None:
    """Refuse an unknown method or a pattern the method does not accept."""
    method = METHODS.get(name)
    if pattern_type not in method.patterns:
        allowed = " or ".join(method.patterns)
        raise SparsifyError(
            f"method {name} works with pattern {allowed}, not {pattern_type}; "
            f"set sparsity.pattern.type to {method.patterns[0]}"
        )


def build_callbacks(name: str, context: TrainContext) -> list:
    """The train callbacks of method `name` (empty for methods without a factory)."""
    method = METHODS.get(name)
    if method.factory is None:
        return []
    module_name, _, attr = method.factory.partition(":")
    return list(getattr(importlib.import_module(module_name), attr)(context))


def callbacks_for(config, model, *, parent_meta: dict, extra: dict | None = None) -> list:
    """The train callbacks of the config's method for `model` (eligible layers as `prune` sees them)."""
    from sparsify.patterns import build_pattern
    from sparsify.prune import find_layers

    s = config.sparsity
    pattern = build_pattern(s.pattern.model_dump())
    layers = find_layers(model, pattern, include_linear=s.include_linear, exclude=s.exclude)
    eligible = [layer.name for layer in layers if layer.reason is None]
    return build_callbacks(s.method, TrainContext(s, eligible, parent_meta, config.seed, dict(extra or {})))


def stage_tensors(callbacks: list) -> dict:
    """Extra checkpoint tensors the callbacks ask for (full keys, e.g. `gumbel.logits.<fqn>`)."""
    tensors: dict = {}
    for callback in callbacks:
        if hasattr(callback, "stage_tensors"):
            tensors.update(callback.stage_tensors())
    return tensors


def stage_meta(callbacks: list) -> dict:
    """Checkpoint metadata the callbacks ask for, merged under `method_state`."""
    state: dict = {}
    for callback in callbacks:
        if hasattr(callback, "stage_meta"):
            state.update(callback.stage_meta())
    return {"method_state": state} if state else {}
