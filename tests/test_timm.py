"""timm models (`model.arch: timm/<name>`) through the real commands, timm's preprocessing, pretrained
weights from a Hugging Face cache filled here (no network), and the one-line errors.

The `slow` sweep runs TIMM_SWEEP (or SPARSIFY_TIMM_SWEEP's globs over timm.list_models()) through
download -> prune -> train (a few masked steps) -> eval -> report -> check -> export, as the
torchvision sweep in tests/test_model_sweep.py does, and writes what it checked to `timm-sweep.json`.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import invoke
from sparsify.core.block import BlockPattern
from sparsify.core.prune import find_layers
from sparsify.models.build import build_model, default_in_channels, default_input_size, image_preset
from sparsify.models.timmmodels import hub_cache_dir

timm = pytest.importorskip("timm")

TINY_TIMM = """\
name: {name}
seed: 0
device: cpu
runs_dir: {runs}
model: {{arch: {arch}, weights: {weights}, num_classes: {classes}, input_size: {size}}}
data: {{dataset: fake, fake_samples: {samples}, batch_size: 2, limit_train_batches: {steps}, limit_val_batches: 1}}
sparsity: {{pattern: {{type: block, block: [8, 8]}}, target: 0.5, step: 0.5, include_linear: true}}
train: {{lr: 0.01, clip_grad_norm: 1.0}}
"""
# clip_grad_norm: with 2 images a batch, BatchNorm over a 1x1 or 2x2 map makes unclipped gradients explode
# within three steps (efficientnet_b0 at 32 or 64 px: weights near 1e4, then NaN outputs)
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a snapshot folder name of the hub cache


def write_config(path: Path, arch: str, *, weights: str = "null", classes: int = 4, size: int = 32, steps: int = 1,
                 name: str = "tm") -> Path:
    path.write_text(TINY_TIMM.format(name=name, runs=path.parent / "runs", arch=arch, weights=weights, classes=classes,
                                     size=size, samples=2 * steps, steps=steps))
    return path


def masks_of(path: Path) -> dict[str, torch.Tensor]:
    return {k[5:]: v for k, v in load_file(path).items() if k.startswith("mask.")}


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("*.safetensors"))


def fill_hub_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Put `state` where huggingface_hub keeps repo `repo`'s model.safetensors (refs/main -> snapshot)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home for this test; the hub unreachable unless a test says otherwise."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connections are refused at once
    return tmp_path / "hf-home"


# ---------------------------------------------------------------- the shell loop


def test_a_tiny_timm_model_runs_the_shell_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ["-c", str(write_config(tmp_path / "tm.yaml", "timm/test_resnet", steps=2))]
    code, out, err = invoke("download", *c)
    assert code == 0, err
    assert out.startswith("round 0: timm/test_resnet saved to")
    rounds = 0
    while (result := invoke("prune", *c))[0] == 0:
        rounds += 1
        assert invoke("train", *c)[0] == 0
    assert result[0] == 3 and rounds == 1  # step 0.5 of the remaining blocks reaches the target 0.5 at once
    run = tmp_path / "runs" / "tm"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["pretrained", "pruned", "trained"]
    assert math.isfinite(history[-1]["metrics"]["val_loss"])
    code, _, _ = invoke("eval", *c)
    evaluated = json.loads((run / "history.jsonl").read_text().splitlines()[-1])["metrics"]
    assert code == 0 and evaluated["val_acc1"] == history[-1]["metrics"]["val_acc1"]
    report = json.loads(invoke("report", *c, "--format", "json")[1])
    layers = {row["parameter"]: row for row in report["layers"]}
    assert report["arch"] == "timm/test_resnet"
    assert layers["conv1.0.weight"]["eligible"] == "no: fewer than 2 blocks on an axis (2x1 blocks of 8x8)"  # the stem
    masks = masks_of(checkpoints(run)[-1])
    assert "layer4.0.conv1.weight" in masks and "fc.weight" not in masks  # fc: 4 outputs, one block
    code, out, _ = invoke("check", checkpoints(run)[-1], "--format", "json")
    assert code == 0 and json.loads(out)["follows"] and json.loads(out)["checked"] == len(masks)
    exported = Path(invoke("export", *c)[1].strip())
    vanilla = timm.create_model("test_resnet", num_classes=4)
    vanilla.load_state_dict(load_file(exported), strict=True)  # loads into timm's own model
    params = dict(vanilla.named_parameters())
    for name, mask in masks.items():
        pruned = ~BlockPattern(8, 8).expand(mask, tuple(params[name].shape))
        assert bool(pruned.any()) and bool((params[name].detach()[pruned] == 0).all())


def test_in_channels_other_than_three_build_timm_with_that_stem():
    model = build_model("timm/test_resnet", num_classes=10, in_channels=1, log=lambda _: None)
    assert model.conv1[0].in_channels == 1 and model.fc.out_features == 10
    assert default_in_channels("timm/test_resnet") == 3  # null: gray datasets are repeated to 3 channels


# ---------------------------------------------------------------- preprocessing


def test_timm_preprocessing_sets_the_input_size_and_the_eval_transform():
    assert default_input_size("timm/test_resnet") == 160  # r160_in1k
    assert default_input_size("timm/resnet50d") == 224 and default_input_size("timm/resnet50d", weights="a1_in1k") == 224
    assert default_input_size("timm/resnet50d", weights="/some/file.safetensors") == 224  # a file: DEFAULT's config
    preset = image_preset("timm/resnet50d", weights="a1_in1k", input_size=224)  # crop_pct 0.95, bicubic
    assert (preset.crop_size, preset.resize_size, preset.interpolation) == (224, 235, "bicubic")
    assert preset.mean == pytest.approx((0.485, 0.456, 0.406)) and preset.std == pytest.approx((0.229, 0.224, 0.225))
    preset = image_preset("timm/resnet50d", weights="DEFAULT", input_size=224)  # ra2_in1k: crop_pct 0.875
    assert preset.resize_size == 256
    preset = image_preset("timm/test_resnet", weights=None, input_size=32)  # crop_pct 0.95, mean/std 0.5
    assert (preset.resize_size, preset.interpolation, preset.mean, preset.std) == (33, "bilinear", (0.5,) * 3, (0.5,) * 3)


def test_timm_preset_follows_timms_own_eval_transform():
    """timm's create_transform resizes to floor(size / crop_pct) and center-crops; the preset says the same."""
    from timm.data import create_transform, resolve_data_config

    from sparsify.data.presets import timm_preset

    config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("resnet50d.a1_in1k").to_dict())
    own = create_transform(**config, is_training=False)
    resize = next(t for t in own.transforms if type(t).__name__ == "Resize")
    preset = timm_preset(config, 224)
    assert resize.size == preset.resize_size and resize.interpolation.value == preset.interpolation


def test_imagefolder_takes_the_timm_input_size_and_preset(tmp_path, monkeypatch):
    from test_model_sweep import write_jpegs

    from sparsify import stages
    from sparsify.config import load_config

    monkeypatch.chdir(tmp_path)
    write_jpegs(tmp_path / "images")
    config = load_config(None, ["name=tf", "device=cpu", "model.arch=timm/test_resnet", "data.dataset=imagefolder",
                                f"data.root={tmp_path / 'images'}", "data.batch_size=2"])
    stages.download(config)
    meta = stages.load_run(stages.RunDir(config.run_dir)).checkpoint.meta
    assert meta["input_size"] == 160 and meta["in_channels"] == 3 and meta["num_classes"] == 2
    preset = stages.image_preset_for(meta)
    assert (preset.crop_size, preset.resize_size, preset.mean) == (160, 168, (0.5, 0.5, 0.5))  # floor(160 / 0.95)


# ---------------------------------------------------------------- pretrained weights


def test_pretrained_weights_come_from_the_hugging_face_cache(tmp_path, hf_home, monkeypatch):
    torch.manual_seed(7)
    source = timm.create_model("test_resnet")  # 1000 classes, as the pretrained weights
    assert hub_cache_dir() == hf_home / "hub"
    fill_hub_cache(hf_home / "hub", "timm/test_resnet.r160_in1k", source.state_dict())
    said = []
    model = build_model("timm/test_resnet", num_classes=4, weights="DEFAULT", log=said.append)
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert model.fc.out_features == 4
    assert said[0].startswith("loaded timm/test_resnet weights r160_in1k from " + str(hf_home / "hub"))
    assert said[1] == "replaced head fc (1000 -> 4 outputs) with freshly initialised layers"
    for name in ("r160_in1k", "test_resnet.r160_in1k"):  # a tag, with or without the model name
        same = build_model("timm/test_resnet", num_classes=1000, weights=name, log=lambda _: None)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in same.state_dict().items())
    gray = build_model("timm/test_resnet", num_classes=1000, in_channels=1, weights="DEFAULT", log=said.append)
    assert torch.allclose(gray.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))  # timm's own adaptation
    assert said[-1] == "timm adapted the stem's pretrained weights from 3 to 1 input channels"


def test_download_with_pretrained_weights_offline_from_the_cache(tmp_path, hf_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    source = timm.create_model("test_resnet")
    fill_hub_cache(hf_home / "hub", "timm/test_resnet.r160_in1k", source.state_dict())
    c = ["-c", str(write_config(tmp_path / "tm.yaml", "timm/test_resnet", weights="DEFAULT", classes=1000))]
    code, _, err = invoke("download", *c)
    assert code == 0, err
    state = load_file(checkpoints(tmp_path / "runs" / "tm")[0])
    assert all(torch.equal(state[f"model.{k}"], v) for k, v in source.state_dict().items())


def test_no_cache_and_no_network_is_one_line_naming_the_cache(tmp_path, hf_home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = ["-c", str(write_config(tmp_path / "tm.yaml", "timm/test_resnet", weights="DEFAULT"))]
    for offline in (None, "1"):  # the hub refuses the connection; HF_HUB_OFFLINE=1 tries none
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        started = time.perf_counter()
        code, out, err = invoke("download", *c)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and time.perf_counter() - started < 30
        assert err.startswith("error: timm weights timm/test_resnet.r160_in1k are not in the Hugging Face cache and the "
                              "hub cannot be reached (")
        assert "(HF_HUB_OFFLINE is set)" in err if offline else "(127.0.0.1:9: Connection refused)" in err
        assert f"timm looks in {hf_home / 'hub'} (HF_HOME/hub, default ~/.cache/huggingface/hub)" in err
        assert "run this once with network to download them there, or set model.weights to a local" in err
        assert not (tmp_path / "runs" / "tm" / "checkpoints").exists()


def test_a_local_weights_file(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("test_resnet", num_classes=4)
    path = tmp_path / "mine.safetensors"
    save_file(source.state_dict(), path)
    model = build_model("timm/test_resnet", num_classes=4, weights=str(path), log=lambda _: None)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- one-line errors


def test_unknown_names_and_tags_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        ("timm/resnet50x", "null"): "error: unknown timm model 'timm/resnet50x'; close matches: timm/resnet50, ",
        ("timm/resnet50d", "zz_in1k"): "error: unknown weights 'zz_in1k' for timm/resnet50d; choose one of: DEFAULT, "
                                       "a1_in1k, a2_in1k",
        ("timm/resnet50d.a1_in1k", "null"): "error: model.arch 'timm/resnet50d.a1_in1k': give the pretrained tag in "
                                            "model.weights, not in the name (model.arch: timm/resnet50d, "
                                            "model.weights: a1_in1k)",
    }
    for (arch, weights), start in cases.items():
        code, out, err = invoke("download", "-c", write_config(tmp_path / "bad.yaml", arch, weights=weights))
        assert code == 1 and out == "" and err.startswith(start) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_missing_timm_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    code, out, err = invoke("download", "-c", write_config(tmp_path / "tm.yaml", "timm/resnet50d"))
    assert code == 1 and out == ""
    assert err == ("error: model.arch 'timm/resnet50d' needs the timm package, which is not installed: "
                   "pip install 'sparsify-cnn[timm]'\n")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- eligibility


def test_timm_eligibility_follows_the_layer_kinds():
    model = build_model("timm/efficientnet_b0", num_classes=10, log=lambda _: None)
    layers = {layer.name: layer.reason for layer in find_layers(model, BlockPattern(8, 8), include_linear=True,
                                                                   exclude=[])}
    assert layers["blocks.1.0.conv_dw.weight"] == "depthwise conv"
    assert layers["blocks.1.0.conv_pwl.weight"] is None and layers["blocks.5.0.se.conv_expand.weight"] is None
    assert layers["blocks.1.0.se.conv_expand.weight"] == "fewer than 2 blocks on an axis (12x1 blocks of 8x8)"  # 96x4
    assert layers["conv_stem.weight"].startswith("fewer than 2 blocks")
    assert layers["classifier.weight"] is None


# ---------------------------------------------------------------- the slow sweep

TIMM_SWEEP = ["resnet50d", "efficientnet_b0", "regnety_016", "convnext_tiny", "mobilenetv3_large_100", "repvgg_a0"]
SWEEP_STEPS = 3  # masked SGD steps in the train stage


def sweep_selection() -> list[str]:
    globs = [g.strip() for g in os.environ.get("SPARSIFY_TIMM_SWEEP", "").split(",") if g.strip()]
    return [n for n in timm.list_models() if any(fnmatch.fnmatch(n, g) for g in globs)] if globs else TIMM_SWEEP


def sweep_timm_model(name: str, root: Path) -> dict:
    """download -> prune -> train -> eval -> report -> check -> export (safetensors, ONNX) for timm/<name>."""
    from test_model_sweep import StepFailed, invoke as step, onnx_available

    arch = f"timm/{name}"
    record: dict = {"arch": arch, "checked": [], "error": None}
    started = time.perf_counter()
    run = root / "runs" / name
    c = ["-c", str(write_config(root / f"{name}.yaml", arch, classes=10, steps=SWEEP_STEPS, name=name))]
    try:
        step("download", "download", *c)
        record["params"] = sum(v.numel() for k, v in load_file(checkpoints(run)[0]).items() if k.startswith("model."))
        record["checked"].append("download")
        step("prune", "prune", *c)
        masks = masks_of(checkpoints(run)[-1])
        pruned = [n for n, m in masks.items() if not bool(m.all())]
        if not pruned:
            raise StepFailed("prune", "no layer was pruned")
        record["pruned_layers"] = f"{len(pruned)}/{len(masks)}"
        record["checked"].append("prune")
        step("train", "train", *c)
        trained = json.loads((run / "history.jsonl").read_text().splitlines()[-1])["metrics"]
        if not math.isfinite(trained["val_loss"]):
            raise StepFailed("train", f"the validation loss after training is {trained['val_loss']}")
        record["checked"].append(f"train({SWEEP_STEPS} masked steps)")
        step("eval", "eval", *c)
        evaluated = json.loads((run / "history.jsonl").read_text().splitlines()[-1])["metrics"]
        if evaluated["val_acc1"] != trained["val_acc1"] or abs(evaluated["val_loss"] - trained["val_loss"]) > 1e-3:
            raise StepFailed("eval", f"reloaded checkpoint gives {evaluated} where the train stage gave {trained}")
        record["checked"].append("eval(= train val)")
        report = json.loads(step("report", "report", *c, "--format", "json"))
        if not set(masks) <= {row["parameter"] for row in report["layers"]}:
            raise StepFailed("report", "the report misses masked layers")
        record["checked"].append("report")
        checked = json.loads(step("check", "check", str(checkpoints(run)[-1]), "--format", "json"))
        if not checked["follows"] or checked["checked"] != len(masks):
            raise StepFailed("check", f"{checked['checked']} layers checked of {len(masks)}")
        record["checked"].append("check")
        exported = Path(step("export", "export", *c).strip())
        vanilla = timm.create_model(name, num_classes=10)
        vanilla.load_state_dict(load_file(exported), strict=True)
        params = dict(vanilla.named_parameters())
        for layer, mask in masks.items():
            if not bool((params[layer].detach()[~BlockPattern(8, 8).expand(mask, tuple(params[layer].shape))] == 0).all()):
                raise StepFailed("export", f"{layer}: pruned weights are not 0.0 in timm's own model")
        record["checked"].append("export(safetensors into timm)")
        if onnx_available():
            step("export onnx", "export", *c, "--format", "onnx")
            record["checked"].append("export(onnx)")
    except StepFailed as exc:
        record["error"] = str(exc)
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
        shutil.rmtree(run, ignore_errors=True)
        gc.collect()
    return record


@pytest.mark.slow
def test_timm_models_through_the_cli(tmp_path):
    records = []
    for name in sweep_selection():
        record = sweep_timm_model(name, tmp_path)
        records.append(record)
        status = f"FAILED {record['error']}" if record["error"] else " -> ".join(record["checked"])
        print(f"{record['arch']:<28} {record.get('params', 0) / 1e6:6.1f}M {record.get('pruned_layers', '-'):>8} "
              f"{record['seconds']:6.1f}s  {status}", flush=True)
        (tmp_path / "timm-sweep.json").write_text(json.dumps(records, indent=1))
    failed = [r for r in records if r["error"]]
    assert not failed, "timm models that failed:\n" + "\n".join(f"  {r['arch']}: {r['error']}" for r in failed)
