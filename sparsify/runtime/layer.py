"""SparseLayer: a pruned Conv2d or Linear that runs through an executor, in one of five modes.

Modes (seed 002's, with calibration built): `vanilla` runs the dense layer, `sparse` the chosen
executor, `test` both (SparsifyError when they differ beyond the dtype's tolerance), `benchmark`
times both on the current input (`last_benchmark`), `calibrate` times every executor that applies on
the current input and keeps the fastest one that beats dense by the margin (`timing`). The wrapper
owns the layer's weight and bias (state_dict keys stay those of the layer it replaces); outputs
carry no gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsify.errors import SparsifyError, first_line
from sparsify.registry import EXECUTORS
from sparsify.runtime.base import Executor, Geometry, matrix_reason
from sparsify.runtime.graphs import graph_replays
from sparsify.runtime.timing import TimingSettings, Timings, pick, time_candidates

MODES = ("vanilla", "sparse", "test", "benchmark", "calibrate")
TOLERANCES = {  # dtype -> (rtol, atol as a share of the largest |dense output|)
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


@dataclass
class LayerTiming:
    """One row of a calibration table: what was timed on one layer and what was kept."""

    layer: str
    kind: str  # "conv 3x3/2", "linear", "depthwise conv", ...
    weight: list[int]
    input: list[int]
    density: float  # share of kept weights
    ms: dict[str, float] = field(default_factory=dict)  # executor -> median milliseconds
    skipped: dict[str, str] = field(default_factory=dict)  # executor -> why it was not timed (further)
    chosen: str = "dense"
    why: str = ""
    repeats: int = 0


def differs(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    """Why `out` is not `ref` within the dtype's tolerance (None: it is), naming the tolerance."""
    if out.shape != ref.shape:
        return f"output shape {tuple(out.shape)} instead of {tuple(ref.shape)}"
    rtol, share = TOLERANCES.get(ref.dtype, TOLERANCES[torch.float32])
    atol = share * max(float(ref.abs().max()), 1.0) if ref.numel() else share
    if torch.allclose(out, ref, rtol=rtol, atol=atol):
        return None
    worst = float((out.double() - ref.double()).abs().max())
    return f"max |difference| {worst:.3g} over torch.allclose(rtol={rtol:g}, atol={atol:.3g})"


class SparseLayer(nn.Module):
    """A pruned Conv2d/Linear run by an executor (`mode` picks vanilla, sparse, test, benchmark, calibrate)."""

    def __init__(self, module: nn.Module, mask: torch.Tensor, *, name: str = "") -> None:
        super().__init__()
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise SparsifyError(f"layer {name}: mask of shape {tuple(mask.shape)} for a weight of shape "
                                f"{tuple(module.weight.shape)}; give element masks (pattern.expand of the group masks)")
        self.weight = module.weight
        self.register_parameter("bias", module.bias)
        self.__dict__["module"] = module  # not a submodule: its parameters are this layer's own
        self.name, self.mode = name, "sparse"
        self.mask = mask.detach().to("cpu", torch.bool)
        with torch.no_grad():
            module.weight.mul_(self.mask.to(module.weight.device, module.weight.dtype))
        self.settings = TimingSettings()
        self.candidates: tuple[str, ...] | None = None  # executors calibrate tries (None: every registered one)
        self.timing: LayerTiming | None = None
        self.last_benchmark: Timings | None = None
        self.dense = self.build("dense")
        self.executor: Executor = self.dense

    @property
    def kind(self) -> str:
        reason = matrix_reason(self.module)
        return reason.split(":")[0] if reason else Geometry.of(self.module).describe()

    def reason(self, executor: Executor) -> str | None:
        return executor.applies(self.module, self.mask, self.weight.device, self.weight.dtype)

    def build(self, name: str) -> Executor:
        """A prepared executor `name` for this layer; SparsifyError saying why when it does not apply."""
        executor = EXECUTORS.get(name)()
        reason = self.reason(executor)
        if reason:
            raise SparsifyError(f"executor {name!r} cannot run layer {self.name}: {reason}")
        executor.prepare(self.module, self.mask)
        return executor

    def use(self, name: str) -> None:
        """Run this layer with executor `name` from now on."""
        self.executor = self.dense if name == "dense" else self.build(name)

    def _apply(self, fn, recurse=True):  # .to() / .half(): packed weights are rebuilt for the new device/dtype
        before = (self.weight.device, self.weight.dtype)
        super()._apply(fn, recurse)
        if "dense" in self.__dict__ and (self.weight.device, self.weight.dtype) != before:
            chosen = self.executor.name
            self.dense = self.build("dense")
            self.executor = self.dense
            if chosen != "dense" and self.reason(EXECUTORS.get(chosen)()) is None:
                self.use(chosen)
        return self

    def extra_repr(self) -> str:
        return f"{self.name or type(self.module).__name__}: {self.executor.describe()}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.mode == "sparse":
                return self.executor.forward(x)
            if self.mode == "vanilla":
                return self.dense.forward(x)
            if self.mode == "test":
                return self.check(x)
            if self.mode == "benchmark":
                return self.benchmark(x)
            if self.mode == "calibrate":
                return self.calibrate(x)
        raise SparsifyError(f"layer {self.name}: unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """The executor's output, after comparing it with dense (SparsifyError when it differs)."""
        ref, out = self.dense.forward(x), self.executor.forward(x)
        problem = differs(out, ref)
        if problem:
            raise SparsifyError(f"layer {self.name}: executor {self.executor.name} differs from dense: {problem}")
        return out

    def benchmark(self, x: torch.Tensor) -> torch.Tensor:
        """Time dense and the executor on `x` (into `last_benchmark`); returns the executor's output."""
        calls = {"dense": lambda: self.dense.forward(x)}
        if self.executor is not self.dense:
            calls[self.executor.name] = lambda: self.executor.forward(x)
        self.last_benchmark = time_candidates(calls, self.settings, sync=device_sync(x.device), baseline="dense",
                                              drop=False)
        return self.executor.forward(x)

    def calibrate(self, x: torch.Tensor) -> torch.Tensor:
        """Time every executor that applies on `x`, keep the fastest (dense unless one beats it by the margin)."""
        timing = LayerTiming(self.name, self.kind, list(self.weight.shape), list(x.shape),
                             round(float(self.mask.float().mean()), 6))
        sync = device_sync(x.device)
        ref, first = timed(lambda: self.dense.forward(x), sync)
        runners, warm = {"dense": self.dense}, {"dense": first}
        for name in self.candidates or EXECUTORS.names():
            if name == "dense":
                continue
            runner, skipped, seconds = self.candidate(name, x, ref, sync)
            if runner is None:
                timing.skipped[name] = skipped
            else:
                runners[name], warm[name] = runner, seconds
        calls = {name: (lambda r=r: r.forward(x)) for name, r in runners.items()}
        if self.settings.graphs and x.is_cuda:  # the model runs in a CUDA graph: time what a replay costs
            replays, failed = graph_replays(calls, x.device)
            if "dense" in replays:
                calls, warm = replays, None
                timing.skipped.update(failed)
        timings = time_candidates(calls, self.settings, warm=warm, sync=sync, baseline="dense")
        timing.ms, timing.repeats = timings.ms, timings.repeats
        timing.skipped.update(timings.dropped)
        timing.chosen, timing.why = pick(timings.ms, self.settings.margin)
        self.executor, self.timing = runners[timing.chosen], timing
        return ref

    def candidate(self, name: str, x: torch.Tensor, ref: torch.Tensor, sync) -> tuple[Executor | None, str, float]:
        """A prepared executor that gives dense's output on `x` (and the seconds of that first call), or None and
        why not."""
        executor = EXECUTORS.get(name)()
        reason = self.reason(executor)
        if reason:
            return None, reason, 0.0
        try:
            executor.prepare(self.module, self.mask)
            out, seconds = timed(lambda: executor.forward(x), sync)
        except (RuntimeError, NotImplementedError) as exc:  # a backend that cannot run this shape or device
            return None, f"failed on this layer: {type(exc).__name__}: {first_line(exc)[:200]}", 0.0
        problem = differs(out, ref)
        return (None, f"output differs from dense: {problem}", seconds) if problem else (executor, "", seconds)


def timed(call, sync) -> tuple[torch.Tensor, float]:
    """The result of `call()` and the seconds it took (device work included)."""
    start = time.perf_counter()
    out = call()
    sync()
    return out, time.perf_counter() - start


def device_sync(device: torch.device):
    """A call that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def wrap_layers(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, SparseLayer]:
    """Replace each masked layer (parameter `<layer>.weight` in `masks`) by a SparseLayer; returns them by name."""
    modules = dict(model.named_modules())
    layers = {}
    for parameter, mask in masks.items():
        name = parameter.removesuffix(".weight")
        module = modules.get(name) if parameter.endswith(".weight") else None
        if module is None or not isinstance(module, (nn.Conv2d, nn.Linear, SparseLayer)):
            raise SparsifyError(f"mask {parameter!r} does not belong to a Conv2d or Linear weight of this model")
        if not isinstance(module, SparseLayer):
            module = SparseLayer(module, mask, name=name)
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, module)
        layers[name] = module
    return layers


def sparse_layers(model: nn.Module) -> dict[str, SparseLayer]:
    """The SparseLayers of a model, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLayer)}


def unwrap_dense(model: nn.Module) -> None:
    """Put back the plain (masked) layer of every SparseLayer running dense, so that a layer calibration keeps
    dense costs nothing over the dense model (on a GPU at small batches the wrapper's call shows)."""
    modules = dict(model.named_modules())
    for name, layer in sparse_layers(model).items():
        if layer.executor.name == "dense":
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, layer.module)


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every SparseLayer of `model` in `mode` (one of MODES)."""
    if mode not in MODES:
        raise SparsifyError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    for layer in sparse_layers(model).values():
        layer.mode = mode
