"""Learned 2:4 masks (method `gumbel`): six logits per group of four weights, one per 2-of-4 pattern.

Training samples a hard Gumbel-softmax choice per group with a straight-through estimator, so
the forward pass sees an exact 0/1 mask while the logits get the softmax gradient. Evaluation,
checkpoints and export use the deterministic argmax pattern, so the saved mask is exactly 2:4.

The logits live in a `gumbel_mask` submodule of each masked layer and the layer's forward is
replaced while training; `detach_gumbel_` removes both, so the model's `state_dict` keeps the
keys of the vanilla model. Checkpoints carry the logits as `gumbel.logits.<fqn>` and the weights
under the zeroed half of each group as `gumbel.pruned.<fqn>`, so training resumes from the
dense weights and the same logits.

Grouping `channels` (hardware 2:4): a group is 4 consecutive input channels at a fixed
(cout, kh, kw). Grouping `flat` (the paper's layout): 4 consecutive entries of the row-major
(COUT, CIN*kh*kw) matrix.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from sparsify.errors import CheckpointError, SparsifyError
from sparsify.methods.base import Method, MethodOptions
from sparsify.registry import METHODS
from sparsify.training.callbacks import TrainCallback

GROUPINGS = ("channels", "flat")
LOGITS_PREFIX = "gumbel.logits."
PRUNED_PREFIX = "gumbel.pruned."


def two_of_four_patterns() -> torch.Tensor:
    """The six 2-of-4 patterns as a (6, 4) float tensor: 0011, 0101, 0110, 1001, 1010, 1100."""
    rows = [[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0]]
    return torch.tensor(rows, dtype=torch.float32)


def to_gumbel_groups(tensor: torch.Tensor, grouping: str) -> torch.Tensor:
    """Weight-shaped tensor -> (groups, 4) in the grouping's order."""
    if grouping == "flat":
        return tensor.reshape(-1, 4)
    moved = tensor.movedim(1, -1) if tensor.dim() > 2 else tensor
    return moved.reshape(-1, 4)


def from_gumbel_groups(groups: torch.Tensor, shape: tuple[int, ...], *, grouping: str) -> torch.Tensor:
    """(groups, 4) -> a tensor of the weight's shape (inverse of `to_gumbel_groups`)."""
    if grouping == "flat" or len(shape) == 2:
        return groups.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1)


def ineligible_reason(module: nn.Module, shape: tuple[int, ...], *, grouping: str) -> str | None:
    """Why a conv/Linear weight cannot carry a learned 2:4 mask (None: it can)."""
    if isinstance(module, nn.modules.conv._ConvNd) and (module.transposed or module.groups > 1):
        return "grouped or transposed conv"
    if grouping == "flat":
        total = math.prod(shape)
        return None if total % 4 == 0 else f"{total} weights, not a multiple of 4"
    return None if shape[1] % 4 == 0 else f"{shape[1]} input channels, not a multiple of 4"


def sample_choice(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard one-hot Gumbel-softmax sample with the straight-through gradient of the soft sample.

    `hard + (soft - soft.detach())` has the exact value of `hard` (x - x is 0.0 in floating
    point), so the forward mask is exactly 0/1 while gradients flow through `soft`.
    """
    gumbels = -torch.empty_like(logits).exponential_().log()
    soft = torch.softmax((logits + gumbels) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


class GumbelMask(nn.Module):
    """Logits over the six 2:4 patterns for each group of one weight; the patterns are a frozen buffer."""

    def __init__(self, shape: tuple[int, ...], *, grouping: str, tau: float = 1.0,
                 logits: torch.Tensor | None = None) -> None:
        super().__init__()
        if grouping not in GROUPINGS:
            raise SparsifyError(f"unknown gumbel grouping {grouping!r}; choose channels or flat")
        self.shape, self.grouping, self.tau = tuple(shape), grouping, tau
        groups = math.prod(shape) // 4
        start = torch.ones(groups, 6) if logits is None else logits.detach().float().reshape(groups, 6)
        self.logits = nn.Parameter(start.clone())
        self.register_buffer("patterns", two_of_four_patterns(), persistent=False)

    def forward(self) -> torch.Tensor:
        """Element mask (weight-shaped, float): a fresh sample in training, the argmax in eval."""
        if self.training:
            choice = sample_choice(self.logits, self.tau)
        else:
            choice = F.one_hot(self.logits.argmax(-1), 6).to(self.logits.dtype)
        return from_gumbel_groups(choice @ self.patterns, self.shape, grouping=self.grouping)

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """The deterministic (argmax) element mask as bool."""
        choice = self.patterns[self.logits.argmax(-1)]
        return from_gumbel_groups(choice, self.shape, grouping=self.grouping).to("cpu", torch.bool)


def magnitude_logits(weight: torch.Tensor, *, grouping: str) -> torch.Tensor:
    """Logits that favour the magnitude 2:4 pattern: kept |w| of each pattern over the group's mean |w|."""
    magnitude = to_gumbel_groups(weight.detach().abs().float().cpu(), grouping)
    scale = magnitude.mean(-1, keepdim=True).clamp_min(1e-12)
    return (magnitude / scale) @ two_of_four_patterns().T


def masked_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward with its weight multiplied by the gumbel mask."""
    weight = module.weight * module.gumbel_mask().to(module.weight.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def attach_gumbel_(model: nn.Module, names: list[str], *, grouping: str, tau: float, init: str = "uniform",
                   logits: dict[str, torch.Tensor] | None = None) -> dict[str, GumbelMask]:
    """Give each named weight a GumbelMask and a masked forward; returns the masks by weight name."""
    modules = dict(model.named_modules())
    attached = {}
    for name in names:
        module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
        start = (logits or {}).get(name)
        if start is None and init == "magnitude":
            start = magnitude_logits(module.weight, grouping=grouping)
        mask = GumbelMask(tuple(module.weight.shape), grouping=grouping, tau=tau, logits=start)
        module.gumbel_mask = mask.to(module.weight.device)
        module.forward = masked_forward.__get__(module)
        attached[name] = module.gumbel_mask
    return attached


def detach_gumbel_(model: nn.Module) -> None:
    """Remove every GumbelMask submodule and masked forward (the model is vanilla again)."""
    for module in model.modules():
        if isinstance(getattr(module, "gumbel_mask", None), GumbelMask):
            del module.gumbel_mask
            module.__dict__.pop("forward", None)


def set_trainable_(model: nn.Module, trainable: str) -> None:
    """`mask`: only the logits train (the paper); `all`: weights and logits train."""
    if trainable not in ("mask", "all"):
        raise SparsifyError(f"unknown train.trainable {trainable!r}; choose mask or all")
    for name, param in model.named_parameters():
        param.requires_grad_(trainable == "all" or name.endswith("gumbel_mask.logits"))


def anneal_tau(tau: float, *, rate: float, tau_min: float, step: int) -> float:
    """Temperature after `step` training steps: max(tau_min, tau * exp(-rate * step))."""
    return max(tau_min, tau * math.exp(-rate * step)) if rate > 0 else tau


@torch.no_grad()
def restore_dense_(weight: torch.Tensor, mask: torch.Tensor, pruned: torch.Tensor) -> None:
    """Put the values saved under the zeroed half of each group back into `weight`."""
    hidden = ~mask.to(weight.device).reshape(weight.shape)
    if int(hidden.sum()) != pruned.numel():
        raise CheckpointError(f"gumbel.pruned tensor has {pruned.numel()} values but the mask zeros "
                              f"{int(hidden.sum())}; the checkpoint is inconsistent, restore it")
    weight[hidden] = pruned.to(weight.device, weight.dtype)


@torch.no_grad()
def export_layer(weight: torch.Tensor, mask: GumbelMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax mask (bool, weight-shaped), the logits, and the weights that mask zeros (in element order)."""
    hard = mask.hard_mask()
    hidden = ~hard.to(weight.device)
    return hard, mask.logits.detach().cpu().clone(), weight.detach()[hidden].cpu().clone()


def check_gumbel_tensors(state: dict, masks: dict, extra: dict, *, source) -> None:
    """Refuse `gumbel.*` tensors that do not fit their weight and mask."""
    for key, tensor in extra.items():
        prefix = LOGITS_PREFIX if key.startswith(LOGITS_PREFIX) else PRUNED_PREFIX
        name = key[len(prefix):]
        if not key.startswith((LOGITS_PREFIX, PRUNED_PREFIX)) or name not in state or name not in masks:
            raise CheckpointError(f"{source} has tensor {key!r} without a masked weight of that name; "
                                  "gumbel tensors are gumbel.logits.<weight> and gumbel.pruned.<weight>")
        numel = state[name].numel()
        expected = (numel // 4, 6) if prefix == LOGITS_PREFIX else (numel // 2,)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, a weight of "
                                  f"{numel} values needs {expected}; the file is inconsistent, restore it")


class GumbelCallbacks(TrainCallback):
    """Train callbacks of method gumbel: attach the logits, anneal tau, export argmax masks at the end.

    Reads `context.extra["trainable"]` (mask | all) and `context.extra["parent_tensors"]` (the
    `gumbel.*` tensors of the checkpoint the stage starts from). `prepare` must run before the
    optimizer is built (the logits are model parameters while training); the pipeline calls it.
    """

    def __init__(self, context) -> None:
        self.settings = context.sparsity.gumbel
        self.trainable = context.extra.get("trainable", "mask")
        self.parent = context.extra.get("parent_tensors", {})
        self.eligible = list(context.eligible)
        self.steps = int((context.parent_meta.get("method_state") or {}).get("gumbel_steps", 0))
        self.attached: dict[str, GumbelMask] = {}
        self.start_choice: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def on_train_start(self, model: nn.Module, enforcer) -> None:
        if not self.attached:
            self.prepare(model, enforcer)

    def prepare(self, model: nn.Module, enforcer, **_) -> None:
        """Restore dense weights and logits, hand the layers from the enforcer to the gumbel masks."""
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        names = [n for n in self.eligible if ineligible_reason(
            modules[n.rsplit(".", 1)[0]], tuple(params[n].shape), grouping=self.settings.grouping) is None]
        if not names:
            raise SparsifyError("method gumbel found no layer whose input channels are a multiple of 4; "
                                "use grouping: flat or another model")
        logits = {}
        for name in names:
            if PRUNED_PREFIX + name in self.parent and name in enforcer.masks:
                restore_dense_(params[name], enforcer.masks[name], self.parent[PRUNED_PREFIX + name])
            if LOGITS_PREFIX + name in self.parent:
                logits[name] = self.parent[LOGITS_PREFIX + name]
            enforcer.set_mask(name, torch.ones(enforcer.pattern.mask_shape(tuple(params[name].shape)), dtype=torch.bool))
        s = self.settings
        self.attached = attach_gumbel_(model, names, grouping=s.grouping, tau=self.current_tau(), init=s.init,
                                       logits=logits)
        self.start_choice = {n: m.logits.detach().argmax(-1).cpu() for n, m in self.attached.items()}
        set_trainable_(model, self.trainable)

    def current_tau(self) -> float:
        s = self.settings
        return anneal_tau(s.tau, rate=s.anneal, tau_min=s.tau_min, step=self.steps)

    def after_step(self, step: int, epoch: int, model: nn.Module, enforcer) -> None:
        self.steps += 1
        tau = self.current_tau()
        for mask in self.attached.values():
            mask.tau = tau

    def on_train_end(self, model: nn.Module, enforcer) -> None:
        """Install the argmax masks in the enforcer (weights zeroed), keep logits and hidden weights."""
        params = dict(model.named_parameters())
        for name, mask in self.attached.items():
            hard, logits, pruned = export_layer(params[name], mask)
            self.tensors[LOGITS_PREFIX + name] = logits
            self.tensors[PRUNED_PREFIX + name] = pruned
            enforcer.set_mask(name, hard.reshape(enforcer.pattern.mask_shape(tuple(hard.shape))))
        detach_gumbel_(model)
        for param in model.parameters():
            param.requires_grad_(True)
        enforcer.apply_()

    def stage_tensors(self) -> dict[str, torch.Tensor]:
        """Extra checkpoint tensors: `gumbel.logits.<fqn>` and `gumbel.pruned.<fqn>`."""
        return dict(self.tensors)

    def stage_meta(self) -> dict:
        changed = groups = 0
        for name, logits in ((n, self.tensors.get(LOGITS_PREFIX + n)) for n in self.start_choice):
            if logits is not None:
                changed += int((logits.argmax(-1) != self.start_choice[name]).sum())
                groups += logits.shape[0]
        return {"gumbel_steps": self.steps, "gumbel_tau": round(self.current_tau(), 6),
                "gumbel_groups_changed": round(changed / groups, 6) if groups else 0.0}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "logits": {n: m.logits.detach().cpu().clone() for n, m in self.attached.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        with torch.no_grad():
            for name, logits in state.get("logits", {}).items():
                if name in self.attached:
                    self.attached[name].logits.copy_(logits)
        for mask in self.attached.values():
            mask.tau = self.current_tau()


def make_callbacks(context) -> list:
    """Callbacks factory of `method: gumbel` (see sparsify.methods.base)."""
    return [GumbelCallbacks(context)]


class GumbelOptions(MethodOptions):
    """Learned 2:4 masks (`method: gumbel`); defaults are the paper's (tau 1, no annealing, uniform logits)."""

    grouping: Literal["channels", "flat"] = "channels"  # channels: hardware 2:4 | flat: row-major groups (the paper)
    tau: float = Field(default=1.0, gt=0.0)  # Gumbel-softmax temperature at the first step
    anneal: float = Field(default=0.0, ge=0.0)  # tau_t = max(tau_min, tau * exp(-anneal * t)); 0: tau fixed
    tau_min: float = Field(default=0.5, gt=0.0)  # lower bound of the annealed temperature
    init: Literal["uniform", "magnitude"] = "uniform"  # uniform: equal logits (the paper) | magnitude


@METHODS.register("gumbel")
class Gumbel(Method):
    name = "gumbel"
    Options = GumbelOptions
    summary = ("learned 2:4 masks (Danhofer 2024): six logits per group of four weights, hard Gumbel-softmax "
               "with a straight-through estimator; the argmax pattern is saved")
    prune_rounds = False
    patterns = ("nm", "unstructured")
    tensor_prefix = "gumbel"
    learns_masks = True
    callbacks = staticmethod(make_callbacks)

    @classmethod
    def check_config(cls, config) -> None:
        """2:4 only, and grouping flat needs element masks (unstructured)."""
        s = config.sparsity
        n, m = getattr(s.pattern, "n", 2), getattr(s.pattern, "m", 4)
        if (n, m) != (2, 4):
            raise SparsifyError(f"method gumbel learns 2:4 masks, not {n}:{m}; "
                                "set sparsity.pattern: {type: nm, n: 2, m: 4}")
        if s.gumbel.grouping == "flat" and s.pattern.type != "unstructured":
            raise SparsifyError("gumbel grouping flat (the paper's row-major groups) is not 2:4 along input channels; "
                                "set sparsity.pattern: {type: unstructured} or gumbel.grouping: channels")

    @classmethod
    def check_tensors(cls, state: dict, masks: dict, extra: dict, *, source) -> None:
        check_gumbel_tensors(state, masks, extra, source=source)
