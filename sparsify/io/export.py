"""`sparsify export`: the latest (or a given) checkpoint as a plain model file for other tools.

Each format is an `Exporter` registered with `@EXPORTERS.register(name)`: `safetensors` and `pth`
hold the plain `state_dict` (pruned weights are exact zeros), which loads into the same
torchvision/built-in model with `load_state_dict`; `onnx` is the model graph with its weights
(needs the optional `onnx` and `onnxscript` packages), checked before it is written: onnxruntime's
outputs against PyTorch's, the pruned zeros in the graph, and a count of the layers TensorRT can run
2:4-sparse (`sparsify.io.onnx_check`; onnxruntime needed unless `verify` is off). A new format is one Exporter subclass in a
module named under `plugins:` (or a `sparsify.exporters` entry point).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import torch

from sparsify.io.checkpoint import load_checkpoint
from sparsify.console import log
from sparsify.io.files import atomic_write_bytes
from sparsify.io.onnx_check import check_onnx, require_onnx_packages
from sparsify.io.rundir import RunDir
from sparsify.errors import SparsifyError, path_problem
from sparsify.core.patterns import describe_pattern
from sparsify.registry import EXPORTERS


class Exporter:
    """One export format: the bytes of a file that other tools read."""

    name: ClassVar[str]
    suffix: ClassVar[str]  # file name suffix, without the dot

    def __init__(self, *, verify: bool = True) -> None:
        self.verify = verify  # a format that can check its file against the model does so unless False

    def write(self, ckpt) -> bytes:
        """The file's bytes for a loaded, validated checkpoint."""
        raise NotImplementedError


def export_checkpoint(run: RunDir, *, fmt: str, checkpoint: Path | None = None, output: Path | None = None,
                      verify: bool = True) -> Path:
    """Write the checkpoint in `fmt` (checked first where the format can be, unless `verify` is off); the path."""
    exporter = EXPORTERS.get(fmt)(verify=verify)
    if output is not None and Path(output).is_dir():
        raise SparsifyError(f"export -o {output} is a directory; name the file to write, e.g. "
                            f"-o {Path(output) / ('model.' + exporter.suffix)}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        latest = run.latest()
        raise SparsifyError(f"export --checkpoint {checkpoint} {path_problem(checkpoint)}; name a checkpoint file"
                            f"{f', e.g. --checkpoint {latest}' if latest else ''}")
    source = checkpoint or run.latest()
    if source is None:
        raise SparsifyError(f"run folder {run.root} has no checkpoint to export; run `sparsify download` first")
    expected = run.recorded_sha256(source) if checkpoint is None or source.parent == run.checkpoints_dir else None
    ckpt = load_checkpoint(source, expected_sha256=expected)  # refuses drifted or altered files
    output = Path(output) if output else run.root / "export" / f"{source.stem}.{exporter.suffix}"
    data = exporter.write(ckpt)  # before any folder is made: a refused check leaves nothing behind
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, data)
    return output


def export_metadata(meta: dict) -> dict[str, str]:
    keys = ("arch", "num_classes", "in_channels", "input_size", "round", "stage", "target", "metrics")
    info = {key: json.dumps(meta.get(key)) for key in keys}
    info["pattern"] = json.dumps(describe_pattern(meta["pattern"])) if meta.get("pattern") else "null"
    return info


def safetensors_bytes(ckpt) -> bytes:
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in ckpt.state.items()}
    return save(state, metadata=export_metadata(ckpt.meta))


def pth_bytes(ckpt) -> bytes:
    buffer = io.BytesIO()
    # copies: a loaded checkpoint's tensors may be views into one buffer, which torch.save refuses
    torch.save({name: tensor.clone() for name, tensor in ckpt.state.items()}, buffer)
    return buffer.getvalue()


def onnx_bytes(ckpt, *, verify: bool = True) -> bytes:
    """The checkpoint's model as an ONNX graph, checked (`check_onnx`) before it is returned."""
    require_onnx_packages(verify=verify)
    from sparsify.io.restore import rebuild

    loaded = rebuild(ckpt)
    model, meta = loaded.model.eval(), ckpt.meta
    size = meta.get("input_size") or 224
    data = onnx_graph(model, arch=meta["arch"], in_channels=meta["in_channels"], size=size)
    masked = {name: (~loaded.pattern.expand(mask, tuple(ckpt.state[name].shape))).numpy()
              for name, mask in loaded.masks.items()}
    for line in check_onnx(data, model, masked, input_size=size, in_channels=meta["in_channels"], verify=verify):
        log(line)
    return data


def onnx_graph(model: torch.nn.Module, *, arch: str, in_channels: int, size: int) -> bytes:
    """torch.onnx's dynamo export of `model` with a dynamic batch dimension, as bytes."""
    # a batch of 2: torch.export specialises a dimension whose example size is 1; with a batch of 1,
    # a model that pools a permuted map (convnext: Linear layers over NHWC, then AdaptiveAvgPool2d)
    # failed the dynamic batch with "Invalid ranges [2:1]"
    example = torch.zeros(2, in_channels, size, size)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch.export's and the ONNX translator's errors span pages
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = next((line for line in lines if line.startswith("<class '")), lines[0] if lines else type(exc).__name__)
        raise SparsifyError(f"torch.onnx cannot export {arch} ({cause[:200]}); "
                            "export --format safetensors or pth instead") from None
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


@EXPORTERS.register("safetensors")
class SafetensorsExporter(Exporter):
    name, suffix = "safetensors", "safetensors"

    def write(self, ckpt) -> bytes:
        return safetensors_bytes(ckpt)


@EXPORTERS.register("pth")
class PthExporter(Exporter):
    name, suffix = "pth", "pth"

    def write(self, ckpt) -> bytes:
        return pth_bytes(ckpt)


@EXPORTERS.register("onnx")
class OnnxExporter(Exporter):
    name, suffix = "onnx", "onnx"

    def write(self, ckpt) -> bytes:
        return onnx_bytes(ckpt, verify=self.verify)
