"""Channel permutation before n:m pruning (Pool & Yu 2021): reorder input channels to keep more magnitude.

Which channels may move together is found by tracing the model with torch.fx: a *channel set* is
the channel axis shared by some producers (conv/Linear outputs), the ops between them and their
consumers (BatchNorm, LayerNorm, depthwise convs, per-channel scales, activations, pooling, residual
adds, permutes) and the consumers (conv/Linear inputs). One permutation per set, applied to the
producers' output channels, everything in between and the consumers' input channels, leaves the
network's function unchanged. A set reaching anything else (the model input or output, a concat,
a reshape, an op this module does not know) is left alone, and its layers are reported with the
reason. The search itself is in `permsearch.py`.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sparsify.rounds.permsearch import kept_magnitude, search_permutation

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                  nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd)
_POOL_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                 nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_UNARY_NAMES = {"relu", "relu_", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
                "dropout", "contiguous", "clone", "leaky_relu", "elu", "mish", "stochastic_depth"}
_POOL_NAMES = {"adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d"}
_BINARY_NAMES = {"add", "add_", "iadd", "sub", "mul", "mul_", "imul"}
_NO_ORDER = {"no time": "no time was left of sparsity.permute.time_limit",
             "time limit": "no better order found before the time limit",
             "nothing to gain": "n:m pruning already keeps all of its magnitude"}


@dataclass
class ChannelSet:
    """Channel axes that must share one permutation, and the tensors that move with it."""

    size: int
    moves: list[tuple[str, int]] = field(default_factory=list)  # (parameter or buffer name, dim)
    consumers: list[str] = field(default_factory=list)  # weight names whose input channels move
    producers: int = 0
    problem: str = ""


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
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and axis == 1:
            self.same(node, source)
            self.move_params(node, name, module, ("weight", "bias", "running_mean", "running_var"))
            return True
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (shape[-1],) and axis == ndim - 1:
            self.same(node, source)
            self.move_params(node, name, module, ("weight", "bias"))
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


def trace_channel_sets(model: nn.Module, example: torch.Tensor) -> list[ChannelSet]:
    """Channel sets of `model`, shapes propagated with `example` in eval mode (the model is unchanged)."""
    from torch.fx.passes.shape_prop import ShapeProp

    traced = fx.symbolic_trace(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    finally:
        model.train(was_training)
    return ChannelGraph(traced).channel_sets()


def permute_model_(model: nn.Module, eligible: list[str], *, n: int, m: int, time_limit: float,
                   example: torch.Tensor, seed: int = 0) -> dict:
    """Search and apply input-channel permutations in place; returns the record for the checkpoint."""
    started = time.perf_counter()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layers = {name: {"permuted": False, "reason": ""} for name in eligible}
    try:
        sets = trace_channel_sets(model, example)
    except Exception as exc:  # fx raises many error types for code it cannot trace
        reason = f"the model cannot be traced by torch.fx ({str(exc).splitlines()[0][:120]})"
        sets = []
        for entry in layers.values():
            entry["reason"] = reason
    searchable = [s for s in sets if not s.problem and any(c in layers for c in s.consumers)]
    for s in sets:
        for name in s.consumers:
            if name in layers and s.problem:
                layers[name]["reason"] = f"its input channels cannot move: {s.problem}"
    costs = [search_cost(s, tensors, m) for s in searchable]
    for index, s in enumerate(searchable):
        left = time_limit - (time.perf_counter() - started)
        share = left * costs[index] / max(sum(costs[index:]), 1e-12)
        permute_set_(s, tensors, layers, n=n, m=m, seconds=max(share, 0.0), seed=seed + index)
    permuted = sum(entry["permuted"] for entry in layers.values())
    return {"permuted": permuted, "eligible": len(eligible), "seconds": round(time.perf_counter() - started, 3),
            "time_limit": time_limit, "layers": layers}


def search_cost(s: ChannelSet, tensors: dict, m: int) -> float:
    rows = sum(tensors[c].numel() // s.size for c in s.consumers)
    stripes = s.size // m
    return float(rows * stripes * stripes)


def consumer_rows(weight: torch.Tensor) -> torch.Tensor:
    """(COUT * kh * kw, CIN) magnitudes: one row per output channel and kernel tap."""
    return weight.detach().abs().movedim(1, -1).reshape(-1, weight.shape[1]).float()


@torch.no_grad()
def permute_set_(s: ChannelSet, tensors: dict, layers: dict, *, n: int, m: int, seconds: float, seed: int) -> None:
    """Search one set's permutation on its eligible consumers' weights and apply it to every tensor."""
    names = [c for c in s.consumers if c in layers]
    rows = [consumer_rows(tensors[c]) for c in names]
    perm, status = search_permutation(torch.cat(rows), n=n, m=m, seconds=seconds, seed=seed)
    identity = torch.equal(perm, torch.arange(s.size))
    for name, r in zip(names, rows):
        before, after = kept_magnitude(r, n=n, m=m), kept_magnitude(r[:, perm], n=n, m=m)
        layers[name].update({"kept_before": round(before, 4), "kept_after": round(after, 4),
                             "gain": round(after / before - 1, 6) if before else 0.0,
                             "siblings": len(s.consumers) - 1, "search": status})
        layers[name]["permuted"] = not identity
        layers[name]["reason"] = "" if not identity else _NO_ORDER.get(status, "the search found no better order")
    if not identity:
        apply_permutation_(s, tensors, perm)


@torch.no_grad()
def apply_permutation_(s: ChannelSet, tensors: dict, perm: torch.Tensor) -> None:
    """New channel i is old channel perm[i]: producers, the ops between, and the consumers' inputs."""
    for name, dim in s.moves:
        tensors[name].copy_(tensors[name].index_select(dim, perm))
    for name in s.consumers:
        tensors[name].copy_(tensors[name].index_select(1, perm))


def permute_before_prune_(model: nn.Module, meta: dict, *, pattern, eligible: list[str], time_limit: float,
                          seed: int) -> dict:
    """The prune stage's permutation step; returns {"permutation": record} for the checkpoint metadata."""
    example = torch.randn(1, meta["in_channels"], meta["input_size"], meta["input_size"],
                          generator=torch.Generator().manual_seed(seed))
    record = permute_model_(model, eligible, n=pattern.n, m=pattern.m, time_limit=time_limit, example=example,
                            seed=seed)
    return {"permutation": record}


def describe_permutation(record: dict) -> str:
    """'12/20 layers permuted, kept magnitude +0.8%' for messages and reports."""
    layers = [v for v in record["layers"].values() if "kept_before" in v]
    before = sum(v["kept_before"] for v in layers)
    after = sum(v["kept_after"] for v in layers)
    gain = f", kept magnitude {100 * (after / before - 1):+.2f}%" if before else ""
    return f"{record['permuted']}/{record['eligible']} layers permuted{gain} ({record['seconds']:.1f} s)"
