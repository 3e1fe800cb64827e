"""Channel sets, found by tracing the model with torch.fx.

A *channel set* is the channel axis shared by some producers (conv/Linear outputs), the ops
between them and their consumers (BatchNorm, LayerNorm, depthwise convs, per-channel scales,
activations, pooling, residual adds, permutes) and the consumers (conv/Linear inputs): one
reordering of it, applied to all of them, leaves the network's function unchanged. A set reaching
anything else (the model input or output, a concat, a reshape, an op this module does not know)
is marked with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                  nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_UNARY_NAMES = {"relu", "relu_", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
                "dropout", "contiguous", "clone", "leaky_relu", "elu", "mish", "stochastic_depth"}
_POOL_NAMES = {"adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d"}
_BINARY_NAMES = {"add", "add_", "iadd", "sub", "mul", "mul_", "imul"}


@dataclass
class ChannelSet:
    """Channel axes that must share one permutation, and the tensors that move with it."""

    size: int
    moves: list[tuple[str, int]] = field(default_factory=list)  # (parameter or buffer name, dim)
    consumers: list[str] = field(default_factory=list)  # weight names whose input channels move
    producers: int = 0
    problem: str = ""
    mixing: str = ""  # why a channel cannot be removed alone (an op that mixes channels, e.g. LayerNorm)


class ChannelGraph:
    """Walks an fx graph in order and builds the channel sets (a union-find over set ids)."""

    def __init__(self, traced: fx.GraphModule) -> None:
        self.modules = dict(traced.named_modules())
        self.sets: list[ChannelSet] = []
        self.parent: list[int] = []
        self.where: dict[fx.Node, tuple[int, int]] = {}  # node -> (set id, channel axis)
        for node in traced.graph.nodes:
            self.visit(node)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def new_set(self, size: int, problem: str = "") -> int:
        self.sets.append(ChannelSet(size, problem=problem))
        self.parent.append(len(self.parent))
        return len(self.sets) - 1

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            sa, sb = self.sets[a], self.sets[b]
            if sa.size != sb.size:
                sa.problem = sa.problem or f"channel counts {sa.size} and {sb.size} meet"
            sa.moves += sb.moves
            sa.consumers += sb.consumers
            sa.producers += sb.producers
            sa.problem = sa.problem or sb.problem
            sa.mixing = sa.mixing or sb.mixing
            self.parent[b] = a
        return a

    def poison(self, node, reason: str) -> None:
        for arg in node_args(node):
            if arg in self.where:
                s = self.sets[self.find(self.where[arg][0])]
                s.problem = s.problem or reason

    def visit(self, node: fx.Node) -> None:
        shape = tensor_shape(node)
        if node.op == "output":
            self.poison(node, "it is (part of) the model output")
        if node.op in ("get_attr", "output"):
            return
        if shape is None and node.op != "placeholder":
            if target_name(node) not in ("getattr", "size", "dim"):  # a tensor goes somewhere untracked
                self.poison(node, f"{describe(node)} is not supported")
            return
        if node.op == "placeholder":
            self.where[node] = (self.new_set(0, "it comes from the model input"), 1)
            return
        handled = self.visit_module(node, shape) if node.op == "call_module" else self.visit_function(node, shape)
        if not handled:
            self.poison(node, f"{describe(node)} is not supported")
            self.where[node] = (self.new_set(0, f"{describe(node)} is not supported"), 1)

    def same(self, node: fx.Node, source: fx.Node, *, axis: int | None = None) -> bool:
        if source not in self.where:
            return False
        sid, src_axis = self.where[source]
        self.where[node] = (sid, src_axis if axis is None else axis)
        return True

    def mark_mixing(self, node: fx.Node, reason: str) -> None:
        s = self.sets[self.find(self.where[node][0])]
        s.mixing = s.mixing or reason

    def move(self, node: fx.Node, name: str, dim: int) -> None:
        self.sets[self.find(self.where[node][0])].moves.append((name, dim))

    def visit_module(self, node: fx.Node, shape) -> bool:
        module, name, source = self.modules[node.target], node.target, node.args[0]
        if source not in self.where:
            return False
        sid, axis = self.where[source]
        ndim = len(shape)
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and axis == 1:
            if module.groups == 1:
                self.sets[self.find(sid)].consumers.append(f"{name}.weight")
                return self.produce(node, name, module.out_channels, axis=1)
            if module.groups == module.in_channels == module.out_channels:  # depthwise: channels pass through
                self.same(node, source)
                self.move_params(node, name, module, ("weight", "bias"))
                return True
            return False
        if isinstance(module, nn.Linear) and axis == len(tensor_shape(source)) - 1:
            self.sets[self.find(sid)].consumers.append(f"{name}.weight")
            return self.produce(node, name, module.out_features, axis=ndim - 1)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
                                             and module.groups == 1):
            # the input's channel axis is unknown here (it came through an op the graph does not follow):
            # that set is blocked, but the layer's own output channels start a set of their own
            self.poison(node, f"its channels reach {name} on an axis the graph lost")
            out_axis = ndim - 1 if isinstance(module, nn.Linear) else 1
            return self.produce(node, name, shape[out_axis], axis=out_axis)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and axis == 1:
            self.same(node, source)
            self.move_params(node, name, module, ("weight", "bias", "running_mean", "running_var"))
            return True
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (shape[-1],) and axis == ndim - 1:
            self.same(node, source)
            self.move_params(node, name, module, ("weight", "bias"))
            self.mark_mixing(node, f"LayerNorm {name} normalises over these channels")
            return True
        if isinstance(module, _UNARY_MODULES) or type(module).__name__ == "StochasticDepth":
            return self.same(node, source)
        if isinstance(module, _POOL_MODULES) and axis == 1:
            return self.same(node, source)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, source, module.start_dim, module.end_dim)
        return False

    def produce(self, node: fx.Node, name: str, channels: int, *, axis: int) -> bool:
        sid = self.new_set(channels)
        self.sets[sid].producers = 1
        self.where[node] = (sid, axis)
        self.move_params(node, name, self.modules[name], ("weight", "bias"))
        return True

    def move_params(self, node: fx.Node, name: str, module: nn.Module, attrs: tuple[str, ...]) -> None:
        for attr in attrs:
            if getattr(module, attr, None) is not None:
                self.move(node, f"{name}.{attr}", 0)

    def visit_function(self, node: fx.Node, shape) -> bool:
        name = target_name(node)
        tensors = [a for a in node_args(node) if a in self.where]
        if not tensors:
            return False
        source, axis = tensors[0], self.where[tensors[0]][1]
        if name in _UNARY_NAMES and len(tensors) == 1:
            return self.same(node, source)
        if name in _POOL_NAMES and len(tensors) == 1 and axis == 1:
            return self.same(node, source)
        if name == "flatten" and len(tensors) == 1:
            args = list(node.args[1:]) + [None, None]
            start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
            end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
            return self.flatten(node, source, start, end)
        if name == "permute" and len(tensors) == 1:
            dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
            dims = [d % len(shape) for d in dims]
            return self.same(node, source, axis=dims.index(axis))
        if name in _BINARY_NAMES:
            return self.binary(node, shape, tensors)
        if name == "layer_norm" and len(tensors) == 1:
            return self.layer_norm(node, shape, source)
        return False

    def binary(self, node: fx.Node, shape, tensors: list[fx.Node]) -> bool:
        """Residual adds and per-channel scales: operands on the same channel axis share one set."""
        axis = self.where[tensors[0]][1]
        for t in tensors:
            if self.where[t][1] != axis or len(tensor_shape(t)) != len(shape):
                return False
            if tensor_shape(t)[axis] != shape[axis]:
                return False
        for other in node_args(node):
            if isinstance(other, fx.Node) and other not in self.where and other.op != "get_attr":
                return False
            if isinstance(other, fx.Node) and other.op == "get_attr":
                value = tensor_shape(other)
                offset = len(shape) - len(value)
                if value and (axis - offset < 0 or value[axis - offset] != shape[axis]
                              or any(v != 1 for i, v in enumerate(value) if i != axis - offset)):
                    return False
        sid = self.where[tensors[0]][0]
        for t in tensors[1:]:
            sid = self.union(sid, self.where[t][0])
        self.where[node] = (sid, axis)
        for other in node_args(node):
            if isinstance(other, fx.Node) and other.op == "get_attr" and tensor_shape(other):
                self.move(node, other.target, len(tensor_shape(other)) - len(shape) + axis)
        return True

    def layer_norm(self, node: fx.Node, shape, source: fx.Node) -> bool:
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        axis = self.where[source][1]
        if tuple(normalized) != (shape[-1],) or axis != len(shape) - 1:
            return False
        self.same(node, source)
        self.mark_mixing(node, f"layer_norm ({node.name}) normalises over these channels")
        for attr in list(node.args[2:4]) + [node.kwargs.get("weight"), node.kwargs.get("bias")]:
            if isinstance(attr, fx.Node) and attr.op == "get_attr":
                self.move(node, attr.target, 0)
        return True

    def flatten(self, node: fx.Node, source: fx.Node, start: int, end: int) -> bool:
        """Flattening keeps the channel order only when the channel axis merges with size-1 axes."""
        in_shape = tensor_shape(source)
        axis = self.where[source][1]
        start, end = start % len(in_shape), end % len(in_shape)
        if axis < start:
            return self.same(node, source)
        if axis > end:
            return self.same(node, source, axis=axis - (end - start))
        others = [d for i, d in enumerate(in_shape[start:end + 1], start) if i != axis]
        return all(d == 1 for d in others) and self.same(node, source, axis=start)

    def channel_sets(self) -> list[ChannelSet]:
        """The final sets; a tensor moved by two sets (shared or reused modules) blocks both."""
        roots = [self.sets[i] for i in range(len(self.sets)) if self.find(i) == i]
        owner: dict[tuple[str, int], ChannelSet] = {}
        for s in roots:
            for key in s.moves + [(c, 1) for c in s.consumers]:
                if key in owner:
                    for blocked in (s, owner[key]):
                        blocked.problem = blocked.problem or f"{key[0]} is used in more than one place"
                owner[key] = s
        return [s for s in roots if s.consumers]


def is_producer(module: nn.Module) -> bool:
    """A dense conv or Linear layer: its output channels start a channel set."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def batchnorm_after(traced: fx.GraphModule) -> dict[str, str]:
    """Weight name of each conv/Linear -> the BatchNorm module that is its only user."""
    modules = dict(traced.named_modules())
    found = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not is_producer(modules[node.target]) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules[user.target], nn.modules.batchnorm._BatchNorm):
            found[f"{node.target}.weight"] = user.target
    return found


def node_args(node: fx.Node) -> list:
    found: list = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def tensor_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.target in (operator.add, operator.iadd, operator.sub, operator.mul, operator.imul):
        return {operator.add: "add", operator.iadd: "iadd", operator.sub: "sub",
                operator.mul: "mul", operator.imul: "imul"}[node.target]
    return getattr(node.target, "__name__", str(node.target))


def describe(node: fx.Node) -> str:
    return f"module {node.target}" if node.op == "call_module" else f"{target_name(node)} ({node.name})"


def traced_graph(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, ChannelGraph]:
    """The fx graph of `model` with shapes from `example` (eval mode, model unchanged) and its channel graph.

    The graph shares the model's modules: what changes a module of one changes the other."""
    from torch.fx.passes.shape_prop import ShapeProp

    traced = fx.symbolic_trace(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    finally:
        model.train(was_training)
    return traced, ChannelGraph(traced)


def trace_channel_sets(model: nn.Module, example: torch.Tensor) -> list[ChannelSet]:
    """Channel sets of `model`, shapes propagated with `example` in eval mode (the model is unchanged)."""
    return traced_graph(model, example)[1].channel_sets()
