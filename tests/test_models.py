"""Model building: built-in ResNets, torchvision by name, factories, weights from files and the hub cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from sparsify.errors import ModelError
from sparsify.models.build import MODELS, build_model, default_in_channels, default_input_size
from sparsify.models.tvmodels import build_for_shapes, cache_file, find_head, replace_head_

RESNET18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url


@pytest.fixture
def logs() -> list[str]:
    return []


@pytest.fixture
def factory_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- built-in models


@pytest.mark.parametrize("arch", ["tiny_resnet", "small_resnet"])
@pytest.mark.parametrize("size", [8, 28])
def test_builtin_forward_shape(arch, size):
    model = build_model(arch, num_classes=10, in_channels=1)
    assert eval_forward(model, torch.randn(2, 1, size, size)).shape == (2, 10)


def test_builtin_models_are_registered_and_take_rgb():
    assert {"tiny_resnet", "small_resnet"} <= set(MODELS.names())
    model = build_model("tiny_resnet", num_classes=4, in_channels=3)
    assert eval_forward(model, torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_tiny_resnet_layout():
    model = build_model("tiny_resnet", num_classes=10, in_channels=1)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs["conv1"].in_channels == 1 and convs["conv1"].out_channels == 16
    widths = sorted({m.out_channels for m in convs.values()})
    assert widths == [16, 32, 64]
    blockable = [n for n, m in convs.items() if m.in_channels >= 16 and m.out_channels >= 16]
    assert len(blockable) == len(convs) - 1  # every conv but the stem
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_small_resnet_is_wider_and_deeper():
    tiny = build_model("tiny_resnet", num_classes=10, in_channels=1)
    small = build_model("small_resnet", num_classes=10, in_channels=1)
    assert small.fc.in_features == 128
    assert len(small.layer1) == 2
    assert sum(p.numel() for p in small.parameters()) > 5 * sum(p.numel() for p in tiny.parameters())


# ----------------------------------------------------------------------------- torchvision and factories


def test_torchvision_model_by_name_random_weights(logs):
    model = build_model("resnet18", num_classes=7, log=logs.append)
    assert model.fc.out_features == 7
    assert eval_forward(model, torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert logs == []


def test_torchvision_model_refuses_other_channel_counts():
    with pytest.raises(ModelError, match="takes 3 input channels.*model.in_channels: 3"):
        build_model("resnet18", num_classes=10, in_channels=1)


def test_factory_model(factory_path):
    model = build_model("factory_model:build", num_classes=6, in_channels=1)
    assert eval_forward(model, torch.randn(2, 1, 8, 8)).shape == (2, 6)
    model = build_model("factory_model:build_classes_only", num_classes=3)
    assert eval_forward(model, torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_factory_errors(factory_path):
    with pytest.raises(ModelError, match="returned str, not a torch.nn.Module"):
        build_model("factory_model:not_a_model", num_classes=2)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        build_model("factory_model:missing", num_classes=2)
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg.models'"):
        build_model("no_such_pkg.models:build", num_classes=2)


def test_unknown_arch():
    with pytest.raises(ModelError) as info:
        build_model("resnet51", num_classes=10)
    message = str(info.value)
    assert "unknown model 'resnet51'" in message
    for word in ("torchvision classification model", "tiny_resnet", "small_resnet", "pkg.module:factory"):
        assert word in message


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ModelError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_model("resnet50", num_classes=10, weights="IMAGENET9K")


def test_named_weights_for_builtin_model_are_refused():
    with pytest.raises(ModelError, match="'tiny_resnet' has no named weights"):
        build_model("tiny_resnet", num_classes=10, in_channels=1, weights="DEFAULT")


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ModelError, match=f"weights file '{path}' does not exist"):
        build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(path))


# ----------------------------------------------------------------------------- local weight files


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor], *, skip: str = "") -> None:
    for key, value in model.state_dict().items():
        if skip and key.startswith(skip):
            continue
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("layout", ["safetensors", "pth", "pth-state_dict", "pth-model"])
def test_local_weights_load(tmp_path, logs, layout):
    source = build_model("tiny_resnet", num_classes=10, in_channels=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        wrapped = {"pth": state, "pth-state_dict": {"state_dict": state, "epoch": 3}}
        torch.save(wrapped.get(layout, {"model": state}), path)
    model = build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(path), log=logs.append)
    assert_same_state(model, state)
    assert logs == [f"loaded weights from {path}"]


def test_local_weights_head_reinitialised_when_classes_differ(tmp_path, logs):
    source = build_model("tiny_resnet", num_classes=10, in_channels=1)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("tiny_resnet", num_classes=3, in_channels=1, weights=str(path), log=logs.append)
    assert model.fc.out_features == 3
    assert_same_state(model, source.state_dict(), skip="fc.")
    assert "re-initialised head fc.bias, fc.weight" in logs[-1]


def test_local_weights_with_prefixed_keys(tmp_path):
    source = build_model("tiny_resnet", num_classes=10, in_channels=1)
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    model = build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(path))
    assert_same_state(model, source.state_dict())


def test_local_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(build_model("small_resnet", num_classes=10, in_channels=1).state_dict(), str(path))
    with pytest.raises(ModelError, match=r"does not fit the model \(.*unexpected: .*\(\+\d+ more\)"):
        build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(path))


def test_local_weights_corrupt_or_pickled_module(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(bad))
    whole = tmp_path / "whole.pth"
    torch.save(build_model("tiny_resnet", num_classes=10, in_channels=1), whole)
    with pytest.raises(ModelError, match=r"save model.state_dict\(\)"):
        build_model("tiny_resnet", num_classes=10, in_channels=1, weights=str(whole))


def test_local_weights_for_torchvision_model(tmp_path, logs):
    source = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=10, weights=str(path), log=logs.append)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 10


# ----------------------------------------------------------------------------- torchvision weights via the hub cache


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


@pytest.fixture
def resnet18_cache(torch_home) -> dict[str, torch.Tensor]:
    """Pre-fill the hub cache with a generated resnet18 state dict under torchvision's file name."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    target = torch_home / "hub" / "checkpoints" / Path(RESNET18_URL).name
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_pretrained_weights_come_from_the_hub_cache(resnet18_cache, logs, name):
    assert torchvision.models.ResNet18_Weights[name].url == RESNET18_URL
    model = build_model("resnet18", weights=name, num_classes=10, log=logs.append)
    assert torch.equal(model.conv1.weight, resnet18_cache["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, resnet18_cache["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    assert logs[0] == "loaded resnet18 weights IMAGENET1K_V1 (1000 classes)"
    assert "replaced head fc (1000 -> 10 outputs)" in logs[1]


def test_pretrained_weights_keep_head_when_classes_match(resnet18_cache, logs):
    model = build_model("resnet18", weights="IMAGENET1K_V1", num_classes=1000, log=logs.append)
    assert torch.equal(model.fc.weight, resnet18_cache["fc.weight"])
    assert len(logs) == 1


def test_failed_download_names_url_and_cache_file(torch_home, monkeypatch):
    # an unreachable proxy makes the download fail at once, network or not
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    target = torch_home / "hub" / "checkpoints" / Path(RESNET18_URL).name
    with pytest.raises(ModelError) as info:
        build_model("resnet18", weights="IMAGENET1K_V1", num_classes=10)
    assert RESNET18_URL in str(info.value)
    assert f"copy that file to {target}" in str(info.value)
    assert cache_file(RESNET18_URL) == target


def test_corrupt_cache_file_is_reported(torch_home):
    target = torch_home / "hub" / "checkpoints" / Path(RESNET18_URL).name
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    with pytest.raises(ModelError, match=f"cannot read cached weights {target}.*delete it"):
        build_model("resnet18", weights="IMAGENET1K_V1", num_classes=10)


def fill_cache(torch_home: Path, weights, model: nn.Module) -> dict[str, torch.Tensor]:
    """Write `model`'s state dict where torch hub caches `weights`; return the state."""
    target = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    torch.save(state, target)
    return state


def same_layout(a: nn.Module, b: nn.Module) -> bool:
    """True when both state dicts have the same keys with the same shapes."""
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].shape == sb[k].shape for k in sa)


def test_pretrained_inception_v3_keeps_aux_head(torch_home, logs):
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    source = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    fill_cache(torch_home, weights, source)
    model = build_model("inception_v3", weights="DEFAULT", num_classes=10, log=logs.append)
    assert torch.equal(model.Conv2d_1a_3x3.conv.weight, source.Conv2d_1a_3x3.conv.weight)
    assert torch.equal(model.AuxLogits.conv0.conv.weight, source.AuxLogits.conv0.conv.weight)
    assert model.transform_input and model.aux_logits
    assert model.fc.out_features == 10 and model.AuxLogits.fc.out_features == 10
    assert "replaced head fc, AuxLogits.fc (1000 -> 10 outputs)" in logs[-1]
    rebuilt = build_model("inception_v3", num_classes=10)  # as a checkpoint load rebuilds it
    assert same_layout(rebuilt, model) and rebuilt.transform_input
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert eval_forward(rebuilt, torch.randn(1, 3, 75, 75)).shape == (1, 10)  # eval: main head only


def test_pretrained_googlenet_keeps_aux_heads_and_trains_with_them(torch_home, logs):
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    source = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    fill_cache(torch_home, weights, source)
    model = build_model("googlenet", weights="DEFAULT", num_classes=5, log=logs.append)
    assert torch.equal(model.aux1.conv.conv.weight, source.aux1.conv.conv.weight)
    assert [model.fc.out_features, model.aux1.fc2.out_features, model.aux2.fc2.out_features] == [5, 5, 5]
    assert same_layout(build_model("googlenet", num_classes=5), model)
    model.train()
    output = model(torch.randn(2, 3, 32, 32))
    assert [t.shape for t in output] == [(2, 5)] * 3  # logits, aux_logits2, aux_logits1
    from sparsify.training.trainer import classification_loss

    target = torch.tensor([0, 3])
    loss, logits = classification_loss(output, target, nn.CrossEntropyLoss())
    ce = nn.functional.cross_entropy
    expected = ce(output.logits, target) + 0.4 * (ce(output.aux_logits1, target) + ce(output.aux_logits2, target))
    assert torch.allclose(loss, expected) and logits is output.logits


def test_local_weights_for_inception_with_and_without_aux_heads(tmp_path, logs):
    source = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.safetensors"
    save_file(source.state_dict(), str(path))
    model = build_model("inception_v3", num_classes=10, weights=str(path), log=logs.append)
    assert torch.equal(model.AuxLogits.conv1.conv.weight, source.AuxLogits.conv1.conv.weight)
    assert "AuxLogits.fc.weight" in logs[-1] and "fc.weight" in logs[-1]
    no_aux = {k: v for k, v in source.state_dict().items() if not k.startswith("AuxLogits.")}
    save_file(no_aux, str(path))
    model = build_model("inception_v3", num_classes=1000, weights=str(path), log=logs.append)
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert logs[-1] == "auxiliary heads AuxLogits are not in the file: they start freshly initialised"


def test_inception_refuses_inputs_too_small_for_its_aux_head():
    from sparsify.models.tvmodels import check_train_input_size

    check_train_input_size("inception_v3", 299)
    check_train_input_size("googlenet", 32)
    with pytest.raises(ModelError, match="at least 299 px, not model.input_size=128; set model.input_size: 299"):
        check_train_input_size("inception_v3", 128)


# ----------------------------------------------------------------------------- heads and defaults


def test_squeezenet_head_is_the_final_1x1_conv():
    model = torchvision.models.squeezenet1_1(num_classes=1000)
    name, head = replace_head_(model, 7)
    assert name == "classifier.1" and isinstance(head, nn.Conv2d) and head.out_channels == 7
    assert eval_forward(model, torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_find_head_of_builtin_model():
    name, head = find_head(build_model("small_resnet", num_classes=10, in_channels=1))
    assert name == "fc" and head.out_features == 10


def test_default_input_size_and_channels():
    assert default_input_size("inception_v3") == 299
    assert default_input_size("resnet50") == 224
    assert default_input_size("efficientnet_b3") == 300
    assert default_input_size("vit_h_14") == 224  # built without weights: the builder's size
    assert default_input_size("vit_h_14", weights="DEFAULT") == 518
    assert default_input_size("vit_h_14", weights="IMAGENET1K_SWAG_LINEAR_V1") == 224
    assert default_input_size("tiny_resnet") is None
    assert default_input_size("factory_model:build") is None
    assert default_in_channels("resnet50") == 3
    assert default_in_channels("tiny_resnet") is None


def test_image_preset_follows_the_weights():
    from sparsify.models.build import image_preset

    preset = image_preset("resnet50", weights="IMAGENET1K_V2", input_size=224)
    assert (preset.crop_size, preset.resize_size, preset.interpolation) == (224, 232, "bilinear")
    assert image_preset("resnet50", weights="IMAGENET1K_V1", input_size=224).resize_size == 256
    preset = image_preset("efficientnet_b0", weights=None, input_size=112)  # DEFAULT's, scaled
    assert (preset.crop_size, preset.resize_size, preset.interpolation) == (112, 128, "bicubic")
    assert preset.mean == (0.485, 0.456, 0.406)
    assert image_preset("tiny_resnet", weights=None, input_size=8) is None


def test_tiny_resnet_learns_digits():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and robust on a busy machine
    try:
        accuracy = train_tiny_resnet_on_digits()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.9


def train_tiny_resnet_on_digits() -> float:
    from sparsify.config import DataConfig
    from sparsify.data.datasets import build_loaders

    train, val = build_loaders(
        DataConfig(dataset="digits"), input_size=8, num_classes=10, in_channels=1, seed=0
    )
    model = build_model("tiny_resnet", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    correct = sum((eval_forward(model, x).argmax(1) == y).sum().item() for x, y in val)
    return correct / len(val.dataset)


def test_shapes_build_skips_initialisers_and_random_fills_and_runs_the_rest():
    def build():
        conv = nn.Conv2d(3, 4, 3)
        assert nn.init.kaiming_normal_(conv.weight, mode="fan_out") is conv.weight
        assert nn.init.constant_(conv.bias, 1.0) is conv.bias
        assert conv.weight.normal_(0, 1) is conv.weight and conv.bias.uniform_() is conv.bias
        conv.register_buffer("scale", torch.ones(4) * 2)  # other operations still run, on the meta device
        return conv

    conv = build_for_shapes(build)
    assert conv.weight.is_meta and conv.weight.shape == (4, 3, 3, 3) and conv.scale.is_meta
    assert not nn.init.normal_(torch.zeros(2)).eq(0).all()  # outside it, initialisers fill again


def test_shapes_build_of_a_builtin_model_imports_nothing_new():
    """Random fills on the meta device would import torch's compiler (seconds in every `report` and `check`)."""
    script = ("import sys, torch; from sparsify.models.build import build_model; "
              "from sparsify.models.tvmodels import build_for_shapes; before = set(sys.modules); "
              "build_for_shapes(lambda: build_model('small_resnet', num_classes=10, in_channels=1)); "
              "print(sorted(m for m in set(sys.modules) - before if not m.startswith('torch.utils')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

