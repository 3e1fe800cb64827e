"""CUDA graphs: a whole model, or one call of one layer, captured once per input shape and replayed.

A replay pays the host's cost per call once, at capture: Python, the kernel launches, and the set-up
torch does for each 2:4 matmul (cuSPARSELt's plan, about 0.6 ms per call with torch 2.11 on an
H100, more than the sparse kernel saves; inside a graph only the kernel is left). The input is copied
into the graph's own buffer before each replay and the output copied out after it, so a caller may
keep what it gets back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sparsify.errors import SparsifyError, first_line

WARMUP = 3  # eager calls on a side stream before capture (lazy initialisation must not land in the graph)


@dataclass
class Captured:
    graph: "torch.cuda.CUDAGraph"
    input: torch.Tensor
    output: torch.Tensor


def capture(call: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, warmup: int = WARMUP) -> Captured:
    """`call(example)` recorded as a CUDA graph over a buffer of `example`'s shape (no autograd)."""
    if not example.is_cuda:
        raise SparsifyError(f"CUDA graphs need an input on a CUDA device, got one on {example.device}")
    static = example.detach().clone()
    side = torch.cuda.Stream(device=static.device)
    side.wait_stream(torch.cuda.current_stream(static.device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(warmup):
            call(static)
    torch.cuda.current_stream(static.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        output = call(static)
    return Captured(graph, static, output)


class GraphedModel(nn.Module):
    """`model` run through one CUDA graph per input shape and dtype (captured at the first call with it).

    For inference only; the wrapped model is `.model` (its state dict keys gain the prefix `model.`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.graphs: dict[tuple, Captured] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = capture(self.model, x)
        entry.input.copy_(x)
        entry.graph.replay()
        return entry.output.clone()

    def _apply(self, fn, recurse=True):  # a move or cast leaves the captured buffers behind: capture again
        self.graphs.clear()
        return super()._apply(fn, recurse)


def graph_replays(calls: dict[str, Callable[[], torch.Tensor]], device: torch.device
                  ) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """Each zero-argument call captured in its own graph on `device`: name -> replay, and name -> why it
    could not be captured (those are left out). Release the graphs by dropping the replays."""
    replays, failed = {}, {}
    for name, call in calls.items():
        try:
            entry = capture(lambda _unused, call=call: call(), torch.empty(0, device=device), warmup=1)
        except (RuntimeError, NotImplementedError) as exc:
            failed[name] = f"cannot be captured in a CUDA graph: {type(exc).__name__}: {first_line(exc)[:160]}"
            continue
        replays[name] = entry.graph.replay
    return replays, failed
