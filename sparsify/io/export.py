"""`sparsify export`: the latest (or a given) checkpoint as a plain model file for other tools.

Each format is an `Exporter` registered with `@EXPORTERS.register(name)`: `safetensors` and `pth`
hold the plain `state_dict` (pruned weights are exact zeros), which loads into the same
torchvision/built-in model with `load_state_dict`; `onnx` is the model graph with its weights
(needs the optional `onnx` and `onnxscript` packages), checked before it is written: onnxruntime's
outputs against PyTorch's, the pruned zeros in the graph, and a count of the layers TensorRT can run
2:4-sparse (`sparsify.io.onnx_check`; onnxruntime needed unless `verify` is off); `pt2` is a
`torch.export` program, checked by running it. With `compact`, the model is first made smaller
(`sparsify.graph.compact`: the channels whose output is provably unused are removed, what they still
contribute folded into the next layer's bias, outputs checked against the masked model); the
safetensors file then records the new tensor shapes in its metadata (`compact_shapes`), which
`sparsify.runtime.load_compact` reads. A new format is one Exporter subclass in a module named under
`plugins:` (or a `sparsify.exporters` entry point).
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
from sparsify.io.outputs import make_folder, refuse_run_files, refuse_unwritable, remove_stale_temporaries
from sparsify.io.restore import require_fit
from sparsify.io.rundir import RunDir
from sparsify.errors import SparsifyError, path_problem
from sparsify.core.patterns import describe_pattern
from sparsify.registry import EXPORTERS


class Exporter:
    """One export format: the bytes of a file that other tools read."""

    name: ClassVar[str]
    suffix: ClassVar[str]  # file name suffix, without the dot
    supports_compact: ClassVar[bool] = False  # can write the compact model (`export --compact`)

    def __init__(self, *, verify: bool = True, compact: bool = False) -> None:
        self.verify = verify  # a format that can check its file against the model does so unless False
        self.compact = compact  # write the compact model (only where supports_compact)

    def write(self, ckpt) -> bytes:
        """The file's bytes for a loaded, validated checkpoint."""
        raise NotImplementedError


def export_checkpoint(run: RunDir, *, fmt: str, checkpoint: Path | None = None, output: Path | None = None,
                      verify: bool = True, compact: bool = False) -> Path:
    """Write the checkpoint in `fmt` (checked first where the format can be, unless `verify` is off); the path."""
    exporter = EXPORTERS.get(fmt)(verify=verify, compact=compact)
    if compact and not exporter.supports_compact:
        can = ", ".join(n for n in EXPORTERS.names() if EXPORTERS.get(n).supports_compact)
        raise SparsifyError(f"export --compact cannot write format {fmt!r}; use --format {can}")
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
    stem = f"{source.stem}.compact" if compact else source.stem
    given = output
    output = Path(output) if output else run.root / "export" / f"{stem}.{exporter.suffix}"
    check_output(output, given=given, source=source, run=run)
    expected = run.recorded_sha256(source) if checkpoint is None or source.parent == run.checkpoints_dir else None
    ckpt = load_checkpoint(source, expected_sha256=expected)  # refuses drifted or altered files
    require_fit(ckpt)  # every format: the tensors are those of the model its metadata names
    data = exporter.write(ckpt)  # before any folder is made: a refused check leaves nothing behind
    make_folder(output.parent)
    remove_stale_temporaries(output.parent)  # what an export killed mid-write left
    atomic_write_bytes(output, data)
    return output


def check_output(output: Path, *, given: Path | None, source: Path, run: RunDir) -> None:
    """Refuse, before any work, an output that is the checkpoint read or a run's own file, or that
    cannot be written."""
    flag = "export -o" if given is not None else "export to"
    refuse_run_files(output, flag=flag, inputs=[source], runs=[run.root])
    refuse_unwritable(output.parent, flag=flag, given=output, fix="give a path in a folder you can write to"
                      if given is not None else "give -o PATH in a folder you can write to")


def export_metadata(meta: dict) -> dict[str, str]:
    keys = ("arch", "num_classes", "in_channels", "input_size", "round", "stage", "target", "metrics")
    info = {key: json.dumps(meta.get(key)) for key in keys}
    info["pattern"] = json.dumps(describe_pattern(meta["pattern"])) if meta.get("pattern") else "null"
    return info


def safetensors_bytes(ckpt, *, compact: bool = False) -> bytes:
    from safetensors.torch import save

    if not compact:
        return save({k: v.contiguous() for k, v in ckpt.state.items()}, metadata=export_metadata(ckpt.meta))
    _, result = compacted(ckpt)
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    metadata = {**export_metadata(ckpt.meta), "compact_shapes": json.dumps(result.shapes),
                "compaction": json.dumps([plan.record() for plan in result.sets])}
    return save(state, metadata=metadata)


def compacted(ckpt):
    """(the masked model, its Compaction) of a checkpoint, outputs checked; one line on the log."""
    from sparsify.graph.compact import EXACT_FLOAT64, TOLERANCE, compact_model
    from sparsify.io.onnx_check import random_batch
    from sparsify.io.restore import rebuild

    model = rebuild(ckpt).model.eval()
    meta = ckpt.meta
    example = random_batch(meta["in_channels"], meta.get("input_size") or 224)
    try:
        result = compact_model(model, example)
    except ValueError as exc:  # outputs changed: a bug in compaction, never written
        raise SparsifyError(f"compaction of {meta['arch']} failed its check: {exc}; nothing written; this is "
                            "a bug in sparsify, export without --compact meanwhile") from None
    except Exception as exc:  # the model cannot be traced with torch.fx
        raise SparsifyError(f"{meta['arch']} cannot be compacted: torch.fx cannot trace it "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                            "export without --compact") from None
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in result.model.parameters())
    log(f"compact: {result.removed} channels removed, parameters {before:,} -> {after:,} "
        f"({after / before:.1%}); outputs match the masked model's (within {TOLERANCE:.0e} relative in float32, "
        f"or exact to {EXACT_FLOAT64:.0e} in float64)")
    return model, result


def pth_bytes(ckpt) -> bytes:
    buffer = io.BytesIO()
    # copies: a loaded checkpoint's tensors may be views into one buffer, which torch.save refuses
    torch.save({name: tensor.clone() for name, tensor in ckpt.state.items()}, buffer)
    return buffer.getvalue()


def onnx_bytes(ckpt, *, verify: bool = True, compact: bool = False) -> bytes:
    """The checkpoint's (or its compact) model as an ONNX graph, checked (`check_onnx`) before it is returned.

    The compact graph's zeros are not checked: its weights no longer have the masks' shapes."""
    require_onnx_packages(verify=verify)
    from sparsify.io.restore import rebuild

    meta = ckpt.meta
    size = meta.get("input_size") or 224
    if compact:
        model, masked = compacted(ckpt)[1].model, None
    else:
        loaded = rebuild(ckpt)
        model = loaded.model.eval()
        masked = {name: (~loaded.pattern.expand(mask, tuple(ckpt.state[name].shape))).numpy()
                  for name, mask in loaded.masks.items()}
    data = onnx_graph(model, arch=meta["arch"], in_channels=meta["in_channels"], size=size)
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


def pt2_bytes(ckpt, *, verify: bool = True, compact: bool = False) -> bytes:
    """A `torch.export` program of the checkpoint's (or its compact) model, dynamic batch; with `verify`,
    loaded back and run against the model on a random batch."""
    from sparsify.io.onnx_check import random_batch
    from sparsify.io.restore import rebuild

    meta = ckpt.meta
    model = compacted(ckpt)[1].model if compact else rebuild(ckpt).model.eval()
    example = random_batch(meta["in_channels"], meta.get("input_size") or 224)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch.export's errors span pages
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SparsifyError(f"torch.export cannot export {meta['arch']} ({first}); "
                            "export --format safetensors instead") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    if verify:
        loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
        with torch.no_grad():
            want, got = model(example), loaded(example)
        worst = float((want - got).abs().max())
        if not worst <= 1e-5 * (float(want.abs().max()) or 1.0):
            raise SparsifyError(f"the exported program's outputs differ from the model's by {worst:.3g}; "
                                "nothing written (export --no-verify writes it unchecked)")
        log(f"pt2: outputs match the model's on a random batch {'x'.join(map(str, example.shape))} "
            f"(max abs diff {worst:.2g})")
    return buffer.getvalue()


@EXPORTERS.register("safetensors")
class SafetensorsExporter(Exporter):
    name, suffix = "safetensors", "safetensors"
    supports_compact = True

    def write(self, ckpt) -> bytes:
        return safetensors_bytes(ckpt, compact=self.compact)


@EXPORTERS.register("pt2")
class Pt2Exporter(Exporter):
    name, suffix = "pt2", "pt2"
    supports_compact = True

    def write(self, ckpt) -> bytes:
        return pt2_bytes(ckpt, verify=self.verify, compact=self.compact)


@EXPORTERS.register("pth")
class PthExporter(Exporter):
    name, suffix = "pth", "pth"

    def write(self, ckpt) -> bytes:
        return pth_bytes(ckpt)


@EXPORTERS.register("onnx")
class OnnxExporter(Exporter):
    name, suffix = "onnx", "onnx"
    supports_compact = True

    def write(self, ckpt) -> bytes:
        return onnx_bytes(ckpt, verify=self.verify, compact=self.compact)
