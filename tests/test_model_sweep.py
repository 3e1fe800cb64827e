"""Every torchvision classification model through build -> eligible layers -> prune -> masked step -> eval.

Random weights and the smallest input each model takes. The fast test runs a representative
handful; the `slow` one sweeps `torchvision.models.list_models(module=torchvision.models)`.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision
from torch import nn

from sparsify.core.masks import MaskEnforcer, full_masks
from sparsify.models.build import build_model
from sparsify.core.patterns import BlockPattern
from sparsify.core.prune import PruneSettings, find_layers, prune_round
from sparsify.training.loop import classification_loss

NUM_CLASSES = 10
SMALLEST_INPUT = {
    "alexnet": 64,  # its features shrink a 32 px image to nothing before the adaptive pool
    "inception_v3": 299,  # the aux head pools a 17x17 map with a 5x5 kernel in train mode
    "maxvit_t": 224,  # vit and maxvit fix their image size when built
}
REPRESENTATIVES = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "googlenet", "inception_v3"]


def smallest_input(arch: str) -> int:
    return 224 if arch.startswith("vit_") else SMALLEST_INPUT.get(arch, 32)


def prune_once(model: nn.Module):
    """Block 8x8 masks from one round at step 0.5 over every eligible conv and Linear weight."""
    pattern = BlockPattern(8, 8)
    layers = find_layers(model, pattern, include_linear=True, exclude=[])
    eligible = [layer.name for layer in layers if layer.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.5)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    return layers, masks, pattern


def check_arch(arch: str) -> None:
    """Build, prune, one masked SGD step on 2 images, eval forward; pruned weights stay 0.0."""
    torch.manual_seed(0)
    size = smallest_input(arch)
    model = build_model(arch, num_classes=NUM_CLASSES, log=lambda _: None)
    layers, masks, pattern = prune_once(model)
    assert masks, f"{arch}: no eligible layer"
    enforcer = MaskEnforcer(model, masks, pattern)
    enforcer.apply_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-4)
    images, target = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    model.train()
    loss, logits = classification_loss(model(images), target, nn.CrossEntropyLoss())
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    enforcer.mask_grads_()
    optimizer.step()
    enforcer.apply_()
    model.eval()
    with torch.no_grad():
        output = model(images)
    assert isinstance(output, torch.Tensor) and output.shape == (2, NUM_CLASSES)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        element = pattern.expand(mask, tuple(params[name].shape))
        assert bool((params[name].detach()[~element] == 0).all()), f"{arch}: {name} drifted"
        assert not bool(mask.all()), f"{arch}: {name} was not pruned"
    del model, optimizer, enforcer
    gc.collect()


@pytest.mark.parametrize("arch", REPRESENTATIVES)
def test_representative_models(arch):
    check_arch(arch)


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


@pytest.mark.slow
@pytest.mark.parametrize("arch", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_model(arch):
    check_arch(arch)


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

    from sparsify.stages import pipeline
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
    pipeline.download(config)
    pipeline.prune(config)
    trained = pipeline.train(config, epochs=1)
    assert 0.0 < trained.sparsity <= 0.5 and "val_acc1" in trained.metrics
    loaded = pipeline.load_run(pipeline.RunDir(config.run_dir))
    assert loaded.model.aux1 is not None and loaded.model.aux2.fc2.out_features == 2
    assert any(name.startswith("aux1.") for name in loaded.masks)  # aux Linear layers are pruned too
    assert pipeline.image_preset_for(loaded.checkpoint.meta).resize_size == 37  # 256 / 224 * 32
    report = build_report(config.run_dir)
    assert report["arch"] == "googlenet" and [h["stage"] for h in report["history"]] == ["pretrained", "pruned", "trained"]
    assert {row["parameter"] for row in report["layers"]} >= {"aux1.fc2.weight", "fc.weight", "aux2.conv.conv.weight"}
