"""Multiply-adds per image of a model's conv/Linear layers, as compaction would leave them.

Each call of a conv or Linear layer costs `unit * outputs * inputs` multiply-adds, `unit` being its
output positions (pixels of a convolution, tokens of a Linear) times its kernel taps, `outputs` its
output channels and `inputs` its input channels per group (a depthwise conv: 1). Compaction
(graph/compact.py) removes a channel of a channel set when every producer of the set has it
pruned; with it go the producers' output channel, the consumers' input channel and the channel of
each depthwise conv inside the set. So the cost of a layer depends on the kept channels of the set
it writes and of the set it reads, and removing one channel saves the producers' multiply-adds for
that output channel plus the consumers' for that input channel, at their own spatial sizes.

Only sets compaction can shrink (followed, not mixed, read by some layer) have a kept count; every
other layer keeps its channels. The counts assume that a pruned channel carries a zero, as pattern
channel leaves it (bias and BatchNorm zeroed with the weights); a channel whose constant still
reaches a padded conv nonzero stays in `export --compact`, which this count does not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sparsify.graph.channels import ChannelGraph, is_producer, tensor_shape


@dataclass(frozen=True)
class LayerMacs:
    """One call of a conv or Linear layer."""

    name: str  # weight name
    unit: int  # output positions per image x kernel taps
    outputs: int
    inputs: int  # input channels per group
    out_set: int | None = None  # root of the set that carries its output channels (shrinkable sets only)
    in_set: int | None = None  # root of the set its input channels come from (shrinkable sets only)

    def macs(self, kept: dict[int, int]) -> int:
        outputs = kept.get(self.out_set, self.outputs) if self.out_set is not None else self.outputs
        inputs = kept.get(self.in_set, self.inputs) if self.in_set is not None else self.inputs
        return self.unit * outputs * inputs


@dataclass
class ChannelMacs:
    """The model's layers, the shrinkable channel sets and the producers of each."""

    layers: list[LayerMacs]
    sizes: dict[int, int] = field(default_factory=dict)  # set root -> channels
    producers: dict[int, list[str]] = field(default_factory=dict)  # set root -> producer weight names
    touching: dict[int, list[LayerMacs]] = field(default_factory=dict)  # set root -> the layers it writes or reads

    def set_of(self, name: str) -> int | None:
        """The shrinkable set whose channels producer `name` writes (None: it has none)."""
        return next((root for root, names in self.producers.items() if name in names), None)

    def dense(self) -> int:
        """Multiply-adds per image with every channel kept."""
        return self.total({})

    def total(self, kept: dict[int, int]) -> int:
        """Multiply-adds per image with `kept` channels in each set (absent sets: all kept)."""
        return sum(layer.macs(kept) for layer in self.layers)

    def kept_counts(self, masks: dict[str, torch.Tensor]) -> dict[int, int]:
        """Channels per shrinkable set that some producer keeps (a producer without a mask keeps all)."""
        kept = {}
        for root, names in self.producers.items():
            alive = torch.zeros(self.sizes[root], dtype=torch.bool)
            for name in names:
                alive |= masks[name].reshape(-1).cpu() if name in masks else True
            kept[root] = int(alive.sum())
        return kept

    def removal_cost(self, root: int, kept: dict[int, int]) -> int:
        """Multiply-adds saved by removing one more channel of set `root`."""
        fewer = {**kept, root: kept[root] - 1}
        return sum(layer.macs(kept) - layer.macs(fewer) for layer in self.touching.get(root, []))


def channel_macs(traced: fx.GraphModule, graph: ChannelGraph) -> ChannelMacs:
    """The cost model of a traced model whose shapes were propagated for one image (`traced_graph`)."""
    modules = dict(traced.named_modules())
    graph.channel_sets()  # marks the sets whose tensors are used in more than one place
    shrinkable = {i for i in range(len(graph.sets)) if graph.find(i) == i and can_shrink(graph.sets[i])}
    result = ChannelMacs(layers=[])
    for node in traced.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or tensor_shape(node) is None:
            continue
        layer = layer_macs(node, module, graph, shrinkable)
        result.layers.append(layer)
        if layer.out_set is not None and is_producer(module):
            result.sizes[layer.out_set] = layer.outputs
            names = result.producers.setdefault(layer.out_set, [])
            names.extend([layer.name] if layer.name not in names else [])
        for root in {layer.out_set, layer.in_set} - {None}:
            result.touching.setdefault(root, []).append(layer)
    return result


def can_shrink(s) -> bool:
    """Compaction may remove channels of set `s`: followed, not mixed, and read by some layer."""
    return not s.problem and not s.mixing and bool(s.consumers)


def layer_macs(node: fx.Node, module: nn.Module, graph: ChannelGraph, shrinkable: set[int]) -> LayerMacs:
    """One call of a conv/Linear layer, with the shrinkable sets it writes and reads."""
    name, weight, shape = f"{node.target}.weight", module.weight, tensor_shape(node)
    axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else len(shape) - 1
    positions = math.prod(shape) // (shape[0] * shape[axis])  # per image (shape[0] is the batch)
    outputs, inputs = weight.shape[0], weight.shape[1]
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        outputs, inputs = shape[axis], weight.shape[0] // module.groups
    unit = positions * (weight.numel() // (weight.shape[0] * weight.shape[1]))
    out_set = root_of(graph, node, shrinkable)
    source = node.args[0]
    in_set = root_of(graph, source, shrinkable) if isinstance(source, fx.Node) else None
    depthwise = getattr(module, "groups", 1) > 1 and module.groups == module.in_channels == module.out_channels
    if depthwise:  # one channel in, one out: it shrinks with the set it passes through
        return LayerMacs(name, unit, outputs, inputs, out_set=out_set)
    if in_set is not None and name not in graph.sets[in_set].consumers:
        in_set = None  # read along another axis (not a consumer of the set)
    if not is_producer(module):
        out_set = None
    return LayerMacs(name, unit, outputs, inputs, out_set=out_set, in_set=in_set)


def root_of(graph: ChannelGraph, node: fx.Node, shrinkable: set[int]) -> int | None:
    if node not in graph.where:
        return None
    root = graph.find(graph.where[node][0])
    return root if root in shrinkable else None
