"""Checks of an exported ONNX graph against the model it came from, before the file is written.

- outputs: onnxruntime and PyTorch (eval mode) run the same random batch (seed 0, 2 images at the
  model's input size); every output must agree within `FP32` (|onnx - torch| <= atol + rtol x |torch|);
- zeros: every weight a mask zeros is exactly 0.0 in the graph's constants (found by the
  parameter's name, else by shape and value);
- TensorRT 2:4: how many Conv/Gemm/MatMul weights of the graph follow TensorRT's rule
  (`sparsify.core.tensorrt`), in the orientation TensorRT reads them (COUT, CIN, taps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sparsify.core.tensorrt import tensorrt_2to4
from sparsify.errors import SparsifyError

SEED, BATCH = 0, 2


@dataclass(frozen=True)
class Tolerance:
    """Element-wise bound on |onnx - torch|: atol + rtol x |torch|."""

    atol: float
    rtol: float

    def describe(self) -> str:
        return f"atol {short(self.atol)} + rtol {short(self.rtol)} x |PyTorch output|"


def short(value: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    return f"{value:.0e}".replace("e-0", "e-").replace("e+00", "") if value else "0"


# fp32 kernels of onnxruntime and PyTorch sum in different orders (and the exporter folds BatchNorm
# into the conv weights), so outputs differ by rounding: measured up to ~1e-5 on torchvision models;
# a wrong graph differs by far more
FP32 = Tolerance(atol=1e-4, rtol=1e-3)


def require_onnx_packages(*, verify: bool) -> None:
    """Refuse early, in one line, when a package the export (or its check) needs is missing."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise SparsifyError("ONNX export needs the onnx and onnxscript packages: "
                                "pip install 'sparsify-cnn[onnx]' (or pip install onnx onnxscript)") from None
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SparsifyError("ONNX export checks the file with onnxruntime, which is not installed: "
                                "pip install onnxruntime (or 'sparsify-cnn[onnx]'), or pass --no-verify "
                                "to write the file unchecked") from None


def random_batch(in_channels: int, size: int) -> torch.Tensor:
    """The verification input: BATCH images of standard normal values, the same on every run."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(BATCH, in_channels, size, size, generator=generator)


def flat_outputs(out) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them) in order."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = out
    else:
        raise SparsifyError(f"cannot compare a model output of type {type(out).__name__} with ONNX; "
                            "pass --no-verify to write the file unchecked")
    return [tensor for value in values for tensor in flat_outputs(value)]


def torch_outputs(model: nn.Module, batch: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().float().numpy() for t in flat_outputs(model.eval()(batch))]


def onnxruntime_outputs(data: bytes, batch: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: no notes about unused initializers
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch.numpy()})


def largest_difference(expected: list[np.ndarray], got: list[np.ndarray], tolerance: Tolerance) -> tuple[float, bool]:
    """(max |got - expected| over all outputs, whether every element is within `tolerance`)."""
    if len(expected) != len(got) or any(e.shape != g.shape for e, g in zip(expected, got)):
        raise SparsifyError(f"the ONNX graph returns outputs of shapes [{shape_list(got)}] where PyTorch returns "
                            f"[{shape_list(expected)}]; nothing written")
    largest, within = [0.0], True
    for e, g in zip(expected, got):
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        largest.append(diff.max(initial=0.0))
        within &= bool((diff <= tolerance.atol + tolerance.rtol * np.abs(e)).all())
    return float(np.max(largest)), within  # NaN anywhere shows as nan


def shape_list(arrays: list[np.ndarray]) -> str:
    return ", ".join("x".join(map(str, a.shape)) for a in arrays)


def verify_outputs(data: bytes, model: nn.Module, batch: torch.Tensor, *, tolerance: Tolerance = FP32) -> str:
    """One line saying the graph computes what the model does; raises when it does not."""
    import onnxruntime

    worst, within = largest_difference(torch_outputs(model, batch), onnxruntime_outputs(data, batch), tolerance)
    where = (f"onnxruntime {onnxruntime.__version__} vs PyTorch on a random batch "
             f"{'x'.join(map(str, batch.shape))} (seed {SEED})")
    if not within:
        raise SparsifyError(f"ONNX outputs differ from the model's: max abs diff {worst:.3g}, over the tolerance "
                            f"{tolerance.describe()} ({where}); nothing written (export --no-verify writes it unchecked)")
    return f"onnx: outputs match, {where}: max abs diff {worst:.2g}, tolerance {tolerance.describe()}"


def graph_constants(proto) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by name: initializers and Constant nodes' values."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attribute.t)
    return found


def graph_weight(name: str, zeros: np.ndarray, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The graph's copy of parameter `name` (zeros: where its mask zeros it): by name, else by shape and zeros."""
    if name in constants and constants[name].shape == zeros.shape:
        return constants[name]
    same = [c for c in constants.values() if c.shape == zeros.shape]
    if zeros.ndim == 2:  # a Linear may sit in a MatMul as its transpose
        same += [c.T for c in constants.values() if c.shape == zeros.shape[::-1]]
    return next((c for c in same if not c[zeros].any()), same[0] if same else None)


def check_zeros(constants: dict[str, np.ndarray], masked: dict[str, np.ndarray]) -> str:
    """One line counting the pruned zeros the graph keeps; raises when one is lost or a weight is missing."""
    if not masked:
        return "onnx: no pruned layer yet: no zeros to check"
    kept = 0
    for name, zeros in masked.items():
        weight = graph_weight(name, zeros, constants)
        if weight is None:
            raise SparsifyError(f"the ONNX graph holds no constant of {name}'s shape {'x'.join(map(str, zeros.shape))}, "
                                "so its pruned zeros cannot be checked; nothing written (export --no-verify "
                                "writes it unchecked)")
        lost = int(np.count_nonzero(weight[zeros]))
        if lost:
            raise SparsifyError(f"the ONNX graph lost pruned zeros: {lost} weights of {name} that its mask zeros are "
                                "not 0.0 in the graph; nothing written")
        kept += int(zeros.sum())
    return f"onnx: pruned zeros kept: {kept:,} masked weights of {len(masked)} layers are exactly 0.0 in the graph"


def matmul_weights(proto, constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Constant weights of Conv, Gemm and MatMul nodes as (COUT, CIN, *taps), the way TensorRT reads them."""
    found = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in constants:
            continue
        weight = constants[node.input[1]]
        if node.op_type == "Conv":
            found[node.input[1]] = weight
        elif weight.ndim == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            found[node.input[1]] = weight if node.op_type == "Gemm" and trans_b else weight.T
    return found


def tensorrt_line(weights: dict[str, np.ndarray]) -> str:
    """How many of the graph's Conv/Gemm/MatMul weights TensorRT can run 2:4-sparse, naming some that it cannot."""
    verdicts = {name: tensorrt_2to4(torch.from_numpy(w.copy())) for name, w in weights.items()}
    refused = [f"{name} ({verdict.removeprefix('no: ')})" for name, verdict in verdicts.items() if verdict != "yes"]
    shown = "; ".join(refused[:3]) + (f"; {len(refused) - 3} more" if len(refused) > 3 else "")
    return (f"onnx: TensorRT 2:4: {len(verdicts) - len(refused)} of {len(verdicts)} conv/linear layers follow its rule "
            f"(4 input channels hold >= 2 zeros at every output channel and tap, CIN % 4 == 0)"
            + (f"; not: {shown}" if refused else ""))


def check_onnx(data: bytes, model: nn.Module, masked: dict[str, np.ndarray] | None, *, input_size: int,
               in_channels: int, verify: bool = True, tolerance: Tolerance | None = None) -> list[str]:
    """The checks' lines for an exported graph (tolerance: `FP32`); raises SparsifyError when it fails one.

    `masked` None: a compact model, whose weights no longer have the masks' shapes (zeros unchecked)."""
    import onnx

    proto = onnx.load_model_from_string(data)
    constants = graph_constants(proto)
    lines = []
    if verify:
        lines.append(verify_outputs(data, model, random_batch(in_channels, input_size),
                                    tolerance=tolerance or FP32))
        lines.append(check_zeros(constants, masked) if masked is not None else
                     "onnx: compact model: outputs checked; its remaining zeros are not (compaction changed the shapes)")
    else:
        lines.append("onnx: not verified (--no-verify): outputs and pruned zeros unchecked")
    lines.append(tensorrt_line(matmul_weights(proto, constants)))
    return lines
