"""Every torchvision classification model through the real commands, in-process on `sparsify.cli.app`.

For each model, random weights at the smallest input it takes, fake data (2 images, one batch):
download -> prune (8x8 blocks, step 0.5, Linear layers too) -> train (one masked SGD step, then one
val batch) -> eval (reloads the checkpoint; must repeat the train stage's val metrics) -> report
-> check (the checkpoint, then the exported file) -> export (safetensors, loaded into torchvision's
own model with every pruned weight 0.0; ONNX where it is run). The fast tests run a representative
handful; the `slow` one sweeps `torchvision.models.list_models(module=torchvision.models)`, writes a
table of what it checked per model to `sweep.json` in its tmp dir, prints it, and fails with the
list of models that failed and why. SPARSIFY_SWEEP="regnet_*,mnasnet*" limits it to some models,
SPARSIFY_SWEEP_ONNX=all|none|<max parameters> chooses where ONNX export runs (default: models of
at most ONNX_MAX_PARAMS parameters).
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsify.cli import app
from sparsify.models.build import build_model
from sparsify.models.tvmodels import build_for_shapes, torchvision_kwargs
from sparsify.core.block import BlockPattern
from sparsify.core.prune import find_layers

NUM_CLASSES = 10
SMALLEST_INPUT = {
    "alexnet": 64,  # its features shrink a 32 px image to nothing before the adaptive pool
    "inception_v3": 299,  # the aux head pools a 17x17 map with a 5x5 kernel in train mode
    "maxvit_t": 224,  # vit and maxvit fix their image size when built
}
ONNX_MAX_PARAMS = 100_000_000  # larger graphs take minutes to export on 2 cores
FAST_MODELS = [  # the representative handful (ONNX export: test_onnx_export_* here and tests/test_export.py)
    "resnet18",
    "mnasnet0_5",  # torchvision's MNASNet needs a state-dict version that safetensors does not carry
    "regnet_x_400mf",  # torchvision's RegNet builder cannot run on the meta device
    "mobilenet_v3_small",
    "googlenet",  # auxiliary heads
]
SWEEP_CONFIG = """\
name: {name}
seed: 0
device: cpu
runs_dir: {runs}
model: {{arch: {arch}, weights: null, num_classes: {classes}, input_size: {size}}}
data: {{dataset: fake, fake_samples: 2, batch_size: 2, limit_train_batches: 1, limit_val_batches: 1}}
sparsity: {{pattern: {{type: block, block: [8, 8]}}, target: 0.5, step: 0.5, include_linear: true}}
train: {{lr: 0.01, clip_grad_norm: 1.0}}
"""


def smallest_input(arch: str) -> int:
    return 224 if arch.startswith("vit_") else SMALLEST_INPUT.get(arch, 32)


class StepFailed(Exception):
    """A command of the sweep failed: which one and its last line."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


def invoke(step: str, *args: str) -> str:
    """Run one sparsify command in-process; its stdout, or StepFailed with the error's last line."""
    result = CliRunner().invoke(app, list(args))
    if result.exit_code != 0:
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            message = one_line(result.exception)
        else:
            message = (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
        raise StepFailed(step, f"exit {result.exit_code}: {message}")
    return result.stdout


def one_line(exc: BaseException) -> str:
    """An uncaught exception (a traceback a user would see) as its type, first line and summary line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    summary = [line for line in lines[1:] if line.startswith("<class '")]  # torch.export's exception summary
    return f"traceback {type(exc).__name__}: " + " / ".join((lines[:1] + summary[:1]) or ["(no message)"])[:300]


def latest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("*.safetensors"))[-1]


def masks_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k[5:]: f.get_tensor(k) for k in f.keys() if k.startswith("mask.")}


def vanilla_torchvision(arch: str) -> torch.nn.Module:
    """torchvision's own model of `arch`, laid out as sparsify builds it."""
    return torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES, **torchvision_kwargs(arch))


def meta_build(arch: str) -> str:
    """How `report` builds the model for its shapes: on the meta device, or on the CPU (and why)."""
    try:
        with torch.device("meta"):
            build_model(arch, num_classes=NUM_CLASSES, log=lambda _: None)
        return "meta"
    except (NotImplementedError, RuntimeError) as exc:
        return f"cpu ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"


def sweep_model(arch: str, root: Path, *, onnx: Callable[[int], bool]) -> dict:
    """download -> prune -> train -> eval -> report -> check -> export for `arch`; what was checked.

    `onnx(parameter_count)` says whether to export ONNX too.
    """
    size = smallest_input(arch)
    record: dict = {"arch": arch, "input_size": size, "params": 0, "checked": [], "seconds": None, "error": None}
    started = time.perf_counter()
    run = root / "runs" / arch
    config = root / f"{arch}.yaml"
    config.write_text(SWEEP_CONFIG.format(name=arch, runs=root / "runs", arch=arch, classes=NUM_CLASSES, size=size))
    c = ["-c", str(config)]
    try:
        record["params"] = parameter_count(arch)
        invoke("download", "download", *c)
        record["checked"].append("download")
        invoke("prune", "prune", *c)
        masks = masks_of(latest_checkpoint(run))
        pruned = sorted(name for name, mask in masks.items() if not bool(mask.all()))
        if not pruned:
            raise StepFailed("prune", "no layer was pruned")
        record["pruned_layers"] = f"{len(pruned)}/{len(masks)}"
        record["checked"].append("prune")
        invoke("train", "train", *c, "--epochs", "1")
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        trained = history[-1]["metrics"]
        record["checked"].append("train(1 masked step)")
        invoke("eval", "eval", *c)
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        evaluated = history[-1]["metrics"]
        if evaluated["val_acc1"] != trained["val_acc1"] or abs(evaluated["val_loss"] - trained["val_loss"]) > 1e-3:
            raise StepFailed("eval", f"reloaded checkpoint gives {evaluated} where the train stage gave {trained}")
        record["checked"].append("reload(eval = train val)")
        record["shapes_build"] = meta_build(arch)
        report = json.loads(invoke("report", "report", *c, "--format", "json"))
        rows = {row["parameter"] for row in report["layers"]}
        if report["arch"] != arch or not set(masks) <= rows:
            raise StepFailed("report", f"report lists {len(rows)} layers, not the {len(masks)} masked ones")
        record["checked"].append("report")
        trained_path = latest_checkpoint(run)
        checked = json.loads(invoke("check", "check", str(trained_path), "--format", "json"))
        if not checked["follows"] or checked["checked"] != len(masks):
            raise StepFailed("check", f"{checked['checked']} layers checked of {len(masks)}: {checked['reason']}")
        record["checked"].append("check")
        exported = Path(invoke("export", "export", *c).strip())
        record["export"] = export_loads_into_torchvision(arch, exported, trained_path)
        invoke("check export", "check", str(exported), "--pattern", "8x8")
        record["checked"].append("export(safetensors)")
        if onnx(record["params"]) and onnx_available():
            onnx_path = Path(invoke("export onnx", "export", *c, "--format", "onnx").strip())
            record["onnx_mb"] = round(onnx_path.stat().st_size / 2**20, 1)
            record["checked"].append("export(onnx)")
    except StepFailed as exc:
        record["error"] = str(exc)
    except Exception as exc:  # the harness itself: report it as this model's failure
        record["error"] = f"harness: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
        shutil.rmtree(run, ignore_errors=True)
        gc.collect()
    return record


def export_loads_into_torchvision(arch: str, exported: Path, checkpoint: Path) -> str:
    """The exported state dict loads strictly into torchvision's model; pruned weights are 0.0 there."""
    state = load_file(exported)
    model = vanilla_torchvision(arch)
    note = "vanilla load_state_dict"
    if arch.startswith("mnasnet"):  # torchvision's MNASNet reads its layout version from `_metadata`
        state = OrderedDict(state)
        state._metadata = model.state_dict()._metadata
        note += " (with torchvision's _metadata)"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise StepFailed("export", f"does not load into torchvision's {arch}: {str(exc).splitlines()[0]}") from None
    params = dict(model.named_parameters())
    pattern = BlockPattern(8, 8)
    for name, mask in masks_of(checkpoint).items():
        pruned = ~pattern.expand(mask, tuple(params[name].shape))
        if not bool((params[name].detach()[pruned] == 0).all()):
            raise StepFailed("export", f"{name}: pruned weights are not 0.0 in the exported file")
    return note


def check_record(record: dict) -> None:
    assert record["error"] is None, f"{record['arch']}: {record['error']} (checked: {', '.join(record['checked'])})"


@pytest.mark.parametrize("arch", FAST_MODELS)
def test_representative_models_through_the_cli(arch, tmp_path):
    record = sweep_model(arch, tmp_path, onnx=lambda _: False)
    check_record(record)
    if arch.startswith("regnet"):
        assert record["shapes_build"].startswith("cpu (NotImplementedError")  # the fallback was needed


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def test_mnasnet_loads_a_state_without_metadata_in_either_layout():
    """A safetensors state has no `_metadata`: version 2 is read as such, a version-1 stem as version 1."""
    import warnings

    from torchvision.models import MNASNet

    current = build_model("mnasnet0_5", num_classes=NUM_CLASSES, log=lambda _: None)
    plain = {k: v.clone() for k, v in current.state_dict().items()}  # what a safetensors file gives back
    reloaded = build_model("mnasnet0_5", num_classes=NUM_CLASSES, log=lambda _: None)
    reloaded.load_state_dict(plain, strict=True)
    assert reloaded.layers[0].out_channels == 16 and all(torch.equal(v, plain[k]) for k, v in reloaded.state_dict().items())
    old = MNASNet(0.5, num_classes=NUM_CLASSES)  # torchvision turns it into the version-1 layout (32-channel stem)
    legacy = OrderedDict(old.state_dict())
    legacy._metadata = OrderedDict({"": {"version": 1}})
    with warnings.catch_warnings(), pytest.raises(RuntimeError):
        warnings.simplefilter("ignore", UserWarning)
        old.load_state_dict(legacy)  # converts the stem, then the version-2 tensors do not fit it
    v1_state = {k: v.clone() for k, v in old.state_dict().items()}
    assert v1_state["layers.0.weight"].shape[0] == 32
    model = build_model("mnasnet0_5", num_classes=NUM_CLASSES, log=lambda _: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.load_state_dict(v1_state, strict=True)
    assert model.layers[0].out_channels == 32


def test_shapes_build_falls_back_to_the_cpu_for_regnet():
    model = build_for_shapes(lambda: build_model("regnet_x_400mf", num_classes=NUM_CLASSES, log=lambda _: None))
    assert next(model.parameters()).device.type == "cpu"
    assert next(build_for_shapes(lambda: torch.nn.Linear(3, 4)).parameters()).is_meta


class NhwcMlp(torch.nn.Module):
    """LayerNorm and a Linear over the NHWC map, back to NCHW, then adaptive average pooling (as convnext)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm = torch.nn.LayerNorm(16)
        self.mlp = torch.nn.Linear(16, 16)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(self.norm(self.conv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.fc(torch.flatten(self.pool(x), 1))


def build_nhwc(num_classes: int, in_channels: int = 3) -> torch.nn.Module:
    return NhwcMlp(num_classes, in_channels)


def test_onnx_export_of_a_model_that_pools_a_permuted_map(tmp_path, monkeypatch):
    """torch.export specialises an example dimension of size 1: with a batch of 1 this model (and
    convnext) failed `export --format onnx` with a traceback ("Invalid ranges [2:1]")."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nhwc.yaml").write_text(SWEEP_CONFIG.format(name="nhwc", runs="runs", arch="test_model_sweep:build_nhwc",
                                                            classes=4, size=8))
    invoke("download", "download", "-c", "nhwc.yaml")
    graph = onnx.load(invoke("export", "export", "-c", "nhwc.yaml", "--format", "onnx").strip()).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a symbolic batch size


def test_vit_linear_layers_with_the_block_pattern():
    model = build_model("vit_b_16", num_classes=NUM_CLASSES, log=lambda _: None)
    pattern = BlockPattern(8, 8)
    layers = {layer.name: layer.reason for layer in find_layers(model, pattern, include_linear=True, exclude=[])}
    block = "encoder.layers.encoder_layer_0"
    assert layers[f"{block}.self_attention.out_proj.weight"] is None  # an nn.Linear subclass
    assert layers[f"{block}.mlp.0.weight"] is None and layers[f"{block}.mlp.3.weight"] is None
    assert layers["heads.head.weight"] is None  # 10 x 768: two output blocks of 8
    assert layers["conv_proj.weight"].startswith("fewer than 2 blocks")  # patch embedding: 3 input channels
    # the attention's input projection is a bare Parameter of MultiheadAttention, not a Linear module
    assert f"{block}.self_attention.in_proj_weight" not in layers
    without = {l.name: l.reason for l in find_layers(model, pattern, include_linear=False, exclude=[])}
    assert "include_linear" in without[f"{block}.mlp.0.weight"]


def sweep_selection() -> list[str]:
    """Every torchvision classification model, or those SPARSIFY_SWEEP's globs name."""
    names = torchvision.models.list_models(module=torchvision.models)
    globs = [g.strip() for g in os.environ.get("SPARSIFY_SWEEP", "").split(",") if g.strip()]
    return [n for n in names if not globs or any(fnmatch.fnmatch(n, g) for g in globs)]


def onnx_wanted(params: int) -> bool:
    setting = os.environ.get("SPARSIFY_SWEEP_ONNX", str(ONNX_MAX_PARAMS))
    if setting in ("all", "none"):
        return setting == "all"
    return params <= int(setting)


def parameter_count(arch: str) -> int:
    model = build_for_shapes(lambda: build_model(arch, num_classes=NUM_CLASSES, log=lambda _: None))
    return sum(p.numel() for p in model.parameters())


def sweep_table(records: list[dict]) -> str:
    lines = []
    for r in records:
        status = "FAILED " + r["error"] if r["error"] else " -> ".join(r["checked"])
        lines.append(f"{r['arch']:<22} {r['input_size']:>3} px {r.get('params', 0) / 1e6:>7.1f}M "
                     f"{r.get('pruned_layers', '-'):>8} {r.get('shapes_build', '-')[:4]:<4} {r['seconds']:>6.1f}s  {status}")
    return "\n".join(lines)


@pytest.mark.slow
def test_every_torchvision_model_through_the_cli(tmp_path):
    names = sweep_selection()
    assert names, "SPARSIFY_SWEEP matches no torchvision model"
    records, started = [], time.perf_counter()
    out = tmp_path / "sweep.json"
    for arch in names:
        record = sweep_model(arch, tmp_path, onnx=onnx_wanted)
        records.append(record)
        print(sweep_table([record]), flush=True)
        out.write_text(json.dumps({"seconds": round(time.perf_counter() - started), "models": records}, indent=1))
    failed = [r for r in records if r["error"]]
    print(f"\n{len(records) - len(failed)}/{len(records)} models passed in {time.perf_counter() - started:.0f} s; "
          f"table: {out}\n{sweep_table(records)}")
    assert not failed, "models that failed:\n" + "\n".join(f"  {r['arch']}: {r['error']}" for r in failed)


def write_jpegs(root, *, classes=("a", "b"), per_class: int = 2) -> None:
    """A tiny ImageFolder tree of 40x48 JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_googlenet_with_aux_heads_through_the_pipeline(tmp_path, monkeypatch):
    """download (hub cache) -> prune -> train -> eval -> report on an ImageFolder of JPEGs."""
    from pathlib import Path

    from sparsify import stages
    from sparsify.config import load_config
    from sparsify.report.build import build_report

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    target = tmp_path / "torch-home" / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True)
    torch.save(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict(), target)
    write_jpegs(tmp_path / "images")
    config = load_config(None, [
        "name=gnet", f"runs_dir={tmp_path / 'runs'}", "model.arch=googlenet", "model.weights=DEFAULT",
        "model.input_size=32", "data.dataset=imagefolder", f"data.root={tmp_path / 'images'}",
        "data.batch_size=2", "data.mixup_alpha=0.2", "sparsity.include_linear=true", "sparsity.step=0.5",
        "device=cpu"])
    stages.download(config)
    stages.prune(config)
    trained = stages.train(config, epochs=1)
    assert 0.0 < trained.sparsity <= 0.5 and "val_acc1" in trained.metrics
    loaded = stages.load_run(stages.RunDir(config.run_dir))
    assert loaded.model.aux1 is not None and loaded.model.aux2.fc2.out_features == 2
    assert any(name.startswith("aux1.") for name in loaded.masks)  # aux Linear layers are pruned too
    assert stages.image_preset_for(loaded.checkpoint.meta).resize_size == 37  # 256 / 224 * 32
    report = build_report(config.run_dir)
    assert report["arch"] == "googlenet" and [h["stage"] for h in report["history"]] == ["pretrained", "pruned", "trained"]
    assert {row["parameter"] for row in report["layers"]} >= {"aux1.fc2.weight", "fc.weight", "aux2.conv.conv.weight"}
