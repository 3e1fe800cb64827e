"""Compaction: a smaller dense model without the channels whose output is provably unused.

A channel of a channel set (graph/channels.py) can go when every producer's weights for it are
zero: from there on the channel carries a constant (the producer's bias, then a BatchNorm's shift,
an activation of it, ...), which `channel_constants` follows through the ops of the set. Each
consumer must take that constant exactly: a zero needs nothing; a nonzero one folds into the
consumer's bias when the consumer is a Linear layer or a convolution without padding (a padded
convolution sees the constant inside the picture but zeros at its border, which no bias can
express). Such channels, and every set the channel graph cannot follow or whose channels are mixed
(LayerNorm), are kept, each with the reason. What is folded is folded before anything is sliced,
so the compact model computes what the masked model computes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sparsify.graph.channels import (_POOL_MODULES, _UNARY_MODULES, ChannelGraph, is_producer,
                                     target_name, tensor_shape, traced_graph)

TOLERANCE = 1e-4  # relative: max |compact - masked| / max |masked| on a random batch, float32
EXACT_FLOAT64 = 1e-9  # the same in float64, where a float32 miss is judged again


@dataclass
class SetPlan:
    """What compaction does with one channel set."""

    producers: list[str]  # weight names of the layers whose output channels the set carries
    channels: int
    removed: list[int] = field(default_factory=list)
    folded: int = 0  # removed channels whose nonzero constant went into a consumer's bias
    kept_zero: int = 0  # channels zero in every producer that stay anyway (see reason)
    reason: str = ""  # why zero channels are kept ('' when none is)

    def record(self) -> dict:
        return {"producers": self.producers, "channels": self.channels, "removed": len(self.removed),
                "folded": self.folded, "kept_zero": self.kept_zero, "reason": self.reason}


@dataclass
class Compaction:
    """The compact model (a copy; the masked one is unchanged) and what was done to each set."""

    model: nn.Module
    sets: list[SetPlan]
    shapes: dict[str, list[int]]  # every state tensor whose shape changed or that is new (a folded bias)

    @property
    def removed(self) -> int:
        return sum(len(p.removed) for p in self.sets)


def compact_model(model: nn.Module, example: torch.Tensor, *, check: bool = True) -> Compaction:
    """Remove the provably unused channels of a copy of `model` (eval mode); `example` gives the shapes.

    With `check`, the compact model's outputs are compared with the masked model's on `example`;
    a mismatch (a bug here, never the user's) raises ValueError.
    """
    source = model.eval()
    model = copy.deepcopy(model).eval()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    traced, graph = traced_graph(model, example)
    graph.channel_sets()  # marks shared tensors
    constants = channel_constants(traced, graph)
    readers = consumer_inputs(traced, graph)
    modules = dict(model.named_modules())
    depthwise = {name for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)
                 and m.groups > 1 and m.groups == m.in_channels == m.out_channels}
    plans, cuts, folds = [], [], []
    for root in sorted({graph.find(i) for i in range(len(graph.sets))}):
        plan, keep, fold = plan_set(graph, root, modules, constants, readers.get(root, []))
        if plan is not None:
            plans.append(plan)
            if plan.removed:
                cuts.append((graph.sets[root], keep))
                folds += fold
    with torch.no_grad():
        for consumer, channels, values in folds:
            fold_constant_(modules[consumer], channels, values)
        for s, keep in cuts:
            for name in moved_tensors(model, s.moves):
                set_tensor_(model, name, get_tensor(model, name).index_select(dict(s.moves).get(name, 0), keep))
            for name in s.consumers:
                set_tensor_(model, name, get_tensor(model, name).index_select(1, keep))
    fit_module_attributes_(model, depthwise)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if before.get(k) != tuple(v.shape)}
    if check:
        check_outputs(source, model, example)
    return Compaction(model, plans, shapes)


def plan_set(graph: ChannelGraph, root: int, modules: dict, constants: dict, readers: list):
    """(SetPlan or None, kept channel indices, folds) for one channel set."""
    s = graph.sets[root]
    producers = [n for n, dim in s.moves if dim == 0 and n.endswith(".weight")
                 and is_producer(modules.get(n[: -len(".weight")], nn.Identity()))]
    if not producers or not s.consumers:
        return None, None, []
    rows = [zero_rows(get_tensor(modules[""], name)) for name in producers]
    plan = SetPlan(producers, len(rows[0]))
    if s.problem or s.mixing:  # a set with a problem may join channel axes of different sizes
        plan.kept_zero = max(int(r.sum()) for r in rows)
        plan.reason = f"the channel graph cannot follow this set: {s.problem}" if s.problem else \
            f"its channels cannot be removed one by one: {s.mixing}"
        return plan, None, []
    zero = torch.stack(rows).all(0)
    removable, why = zero.clone(), ""
    for consumer, node in readers:
        value = constants.get(node)
        if value is None:
            removable[:] = False
            why = why or f"the input of {consumer} is not followed"
            continue
        steady = value.isfinite()
        takes = steady & (value.eq(0) | can_fold(modules[consumer]))
        if bool((removable & ~takes).any()) and not why:
            why = (f"their constant (a bias or BatchNorm shift) meets the padding of {consumer}, where it is "
                   "no bias" if bool((removable & steady & ~takes).any()) else
                   f"their value at {consumer} varies over the picture (a padded depthwise conv or pooling "
                   "of a nonzero constant)")
        removable &= takes
    if bool(removable.all()):  # a layer keeps at least one channel
        removable[0] = False
        why = why or "a layer keeps at least one channel"
    plan.removed = removable.nonzero().flatten().tolist()
    plan.kept_zero = int((zero & ~removable).sum())
    plan.reason = why if plan.kept_zero else ""
    folds, folded = [], torch.zeros(len(zero), dtype=torch.bool)
    for consumer, node in readers:
        nonzero = removable & constants[node].ne(0)
        folded |= nonzero
        if bool(nonzero.any()):
            folds.append((consumer, nonzero.nonzero().flatten(), constants[node][nonzero]))
    plan.folded = int(folded.sum())
    keep = (~removable).nonzero().flatten()
    return plan, keep, folds


def zero_rows(weight: torch.Tensor) -> torch.Tensor:
    """Output channels whose weights are all zero."""
    return weight.detach().reshape(weight.shape[0], -1).eq(0).all(1).cpu()


def moved_tensors(model: nn.Module, moves: list[tuple[str, int]]) -> list[str]:
    """The tensors a set moves, with the biases a fold created since the model was traced."""
    names = [name for name, _ in moves]
    for name, dim in moves:
        bias = name[: -len("weight")] + "bias"
        if dim == 0 and name.endswith(".weight") and bias not in names and get_tensor_or_none(model, bias) is not None:
            names.append(bias)
    return names


def can_fold(module: nn.Module) -> bool:
    """A Linear layer, or a convolution that never reads padding: a constant input channel is a bias."""
    if isinstance(module, nn.Linear):
        return True
    padding = module.padding
    if isinstance(padding, str):
        return padding == "valid"
    return all(p == 0 for p in padding)


def fold_constant_(module: nn.Module, channels: torch.Tensor, values: torch.Tensor) -> None:
    """Add what input `channels` holding constant `values` contribute to the module's output to its bias."""
    weight = module.weight.detach()
    per_channel = weight[:, channels].reshape(weight.shape[0], len(channels), -1).sum(2).double()
    shift = (per_channel @ values.to(per_channel)).to(weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.bias.add_(shift)


def consumer_inputs(traced: fx.GraphModule, graph: ChannelGraph) -> dict[int, list[tuple[str, fx.Node]]]:
    """Set root -> (consumer module name, the node it reads) for every conv/Linear reading the set."""
    modules = dict(traced.named_modules())
    found: dict[int, list] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and is_producer(modules[node.target]) and node.args[0] in graph.where:
            root = graph.find(graph.where[node.args[0]][0])
            found.setdefault(root, []).append((node.target, node.args[0]))
    return found


def channel_constants(traced: fx.GraphModule, graph: ChannelGraph) -> dict[fx.Node, torch.Tensor]:
    """Per node of a channel set: the constant value of each channel (float64), NaN where it varies."""
    modules = dict(traced.named_modules())
    constants: dict[fx.Node, torch.Tensor] = {}
    for node in traced.graph.nodes:
        if node not in graph.where:
            continue
        shape = tensor_shape(node)
        size = shape[graph.where[node][1]] if shape else 0
        try:
            value = node_constant(node, modules, constants, size)
        except Exception:  # an op this module cannot evaluate on constants: the channels vary
            value = None
        if value is None or tuple(value.shape) != (size,):
            value = torch.full((size,), math.nan, dtype=torch.float64)
        constants[node] = value
    return constants


def node_constant(node: fx.Node, modules: dict, constants: dict, size: int) -> torch.Tensor | None:
    """The node's per-channel constant from its inputs' (None: varies)."""
    if node.op == "placeholder":
        return None
    if node.op == "call_module":
        return module_constant(modules[node.target], constants.get(node.args[0]))
    name = target_name(node)
    if name in ("layer_norm",):
        return None
    if name == "avg_pool2d":
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        value = constants.get(node.args[0])
        return value if not any_positive(padding) or value is None else value.where(value.eq(0), math.nan)
    if name in ("adaptive_avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "flatten", "permute"):
        return constants.get(node.args[0])

    def substitute(arg):
        if arg in constants:
            return constants[arg].clone()
        if arg.op == "get_attr":
            tensor = get_tensor(node.graph.owning_module, arg.target).detach().double().cpu()
            return tensor.reshape(-1) if tensor.numel() == size else tensor.reshape(()) if tensor.numel() == 1 else None
        raise ValueError(f"{arg} is not a channel constant")

    args = fx.node.map_arg(node.args, substitute)
    kwargs = fx.node.map_arg(node.kwargs, substitute)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def module_constant(module: nn.Module, value: torch.Tensor | None) -> torch.Tensor | None:
    """A module's output constant per channel for a constant input (None: varies)."""
    if is_producer(module):
        zero = zero_rows(module.weight)
        bias = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(len(zero))
        return bias.where(zero, math.nan)
    if value is None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd):  # depthwise: each channel sees only itself
        weight = module.weight.detach().double().cpu().reshape(len(value), -1)
        bias = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(len(value))
        padded = any_positive(module.padding) if not isinstance(module.padding, str) else module.padding != "valid"
        out = value * weight.sum(1) + bias
        return out.where(value.eq(0) | torch.tensor(not padded), math.nan)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return batchnorm_constant(module, value)
    if isinstance(module, nn.modules.pooling._AvgPoolNd):
        return value if not any_positive(module.padding) or not module.count_include_pad else \
            value.where(value.eq(0), math.nan)
    if isinstance(module, (_POOL_MODULES, nn.Flatten)):
        return value
    if isinstance(module, _UNARY_MODULES) or type(module).__name__ == "StochasticDepth":
        was = module.training
        module.eval()
        try:
            return module(value.clone())
        finally:
            module.train(was)
    return None


def batchnorm_constant(bn: nn.modules.batchnorm._BatchNorm, value: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm of a constant (with batch statistics, a constant normalises to zero)."""
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(len(value))
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(len(value))
    if bn.running_mean is None:
        return beta.where(value.isfinite(), math.nan)
    mean, var = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
    return (value - mean) / torch.sqrt(var + bn.eps) * gamma + beta


def any_positive(padding) -> bool:
    return any(p > 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def get_tensor_or_none(model: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, attr = name.rpartition(".")
    try:
        return getattr(model.get_submodule(owner) if owner else model, attr, None)
    except AttributeError:
        return None


def set_tensor_(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by `value` (a new Parameter keeps requires_grad)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value.contiguous()


def fit_module_attributes_(model: nn.Module, depthwise: set[str]) -> None:
    """Channel counts of convs, Linear layers and BatchNorms from their (sliced) tensors."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            out = module.weight.shape[0]
            if name in depthwise:
                module.groups = module.in_channels = module.out_channels = out
            else:
                module.out_channels, module.in_channels = out, module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            tensor = module.running_mean if module.running_mean is not None else module.weight
            if tensor is not None:
                module.num_features = tensor.shape[0]


def shrink_to_(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give a freshly built model the tensor shapes of a compact state dict (then load_state_dict fits)."""
    modules = dict(model.named_modules())
    depthwise = {name for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)
                 and m.groups > 1 and m.groups == m.in_channels == m.out_channels}
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        old = getattr(module, attr, None)
        dtype = old.dtype if old is not None else module.weight.dtype
        empty = torch.zeros(shape, dtype=dtype)
        if old is None or attr in module._parameters:
            module._parameters[attr] = nn.Parameter(empty, requires_grad=old.requires_grad if old is not None else True)
        else:
            module._buffers[attr] = empty
    fit_module_attributes_(model, depthwise)


def check_outputs(masked: nn.Module, compact: nn.Module, example: torch.Tensor) -> None:
    """Refuse a compact model whose outputs differ from the masked model's beyond TOLERANCE.

    A float32 model can be ill-conditioned (e.g. BatchNorm statistics from a few images): there the two
    models' float32 outputs differ by float32 rounding alone, so a miss is judged again in float64,
    where compaction is exact up to 1e-9."""
    if relative_error(masked, compact, example) <= TOLERANCE:
        return
    error = relative_error(copy.deepcopy(masked).double(), copy.deepcopy(compact).double(), example.double())
    if not error <= EXACT_FLOAT64:
        raise ValueError(f"the compact model's outputs differ from the masked model's by {error:.2e} "
                         f"(relative, float64; the limit is {EXACT_FLOAT64:.0e})")


def relative_error(masked: nn.Module, compact: nn.Module, example: torch.Tensor) -> float:
    """max |compact - masked| / max |masked| on `example`."""
    with torch.no_grad():
        want, got = first_tensor(masked(example)), first_tensor(compact(example))
    return float((want - got).abs().max()) / (float(want.abs().max()) or 1.0)


def first_tensor(out) -> torch.Tensor:
    """The logits of a model's output (a tensor, or the first tensor of a tuple such as GoogLeNet's)."""
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out
