"""The papers' models (parameter counts, forward shapes) and CIFAR folders read through torchvision."""

import pickle

import numpy as np
import pytest
import torch

from sparsify.config import DataConfig
from sparsify.data.datasets import build_loaders, dataset_info
from sparsify.errors import DataError
from sparsify.models.build import MODELS, build_model

PARAMETERS_10_CLASSES = {  # (in_channels, parameters)
    "resnet20": (3, 269_722), "resnet32": (3, 464_154), "resnet44": (3, 658_586), "resnet56": (3, 853_018),
    "resnet110": (3, 1_727_962), "wrn28_2": (3, 1_467_610), "wrn28_10": (3, 36_479_194),
    "wrn16_8": (3, 10_961_370), "lenet5": (1, 61_706), "mnist_mlp": (1, 266_610),
}


@pytest.mark.parametrize("arch", sorted(PARAMETERS_10_CLASSES))
def test_parameter_counts(arch):
    in_channels, expected = PARAMETERS_10_CLASSES[arch]
    with torch.device("meta"):
        model = build_model(arch, num_classes=10, in_channels=in_channels)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("arch", ["resnet20", "wrn28_2", "lenet5", "mnist_mlp"])
def test_forward_shapes(arch):
    in_channels = PARAMETERS_10_CLASSES[arch][0]
    size = 28 if in_channels == 1 else 32
    model = build_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(2, in_channels, size, size)).shape) == (2, 7)
        if arch in ("lenet5", "mnist_mlp"):  # other image sizes are pooled to fit (LeNet-5: 16 px or more)
            other = 32 if arch == "lenet5" else 8
            assert tuple(model(torch.randn(2, in_channels, other, other)).shape) == (2, 7)


def test_wrn_layers_are_named_for_exclude_globs():
    with torch.device("meta"):
        model = build_model("wrn28_2", num_classes=10, in_channels=3)
    names = [n for n, p in model.named_parameters() if p.dim() == 4]
    body = [n for n in names if n.endswith(("conv1.weight", "conv2.weight")) and n.startswith("block")]
    assert len(body) == 24 and "conv1.weight" in names
    assert sum(".shortcut." in n for n in names) == 3


def test_option_a_shortcut_pads_channels_without_parameters():
    model = build_model("resnet20", num_classes=10, in_channels=3)
    block = model.layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).reshape(2, 16, 4, 4)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()


def write_cifar(root, name: str, *, per_batch: int = 4) -> None:
    """A tiny folder in torchvision's CIFAR layout (python pickle batches), labels 0..per_batch-1."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, label_key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
        meta_file, meta = "batches.meta", {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, files, label_key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta_file, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(100)]}
    folder.mkdir(parents=True)
    for file in files:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), label_key: list(range(per_batch))}
        (folder / file).write_bytes(pickle.dumps(batch))
    (folder / meta_file).write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("name,classes,train_size", [("cifar10", 10, 20), ("cifar100", 100, 4)])
def test_cifar_folder_through_torchvision(tmp_path, name, classes, train_size):
    write_cifar(tmp_path, name)
    cfg = DataConfig(dataset=name, root=str(tmp_path), batch_size=4, verify_checksums=False)
    info = dataset_info(cfg)
    assert (info.num_classes, info.in_channels, info.input_size) == (classes, 3, 32)
    train, val = build_loaders(cfg, input_size=32, num_classes=classes, in_channels=3, seed=0)
    assert len(train.dataset) == train_size and len(val.dataset) == 4
    images, labels = next(iter(val))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    assert -3.0 < float(images.mean()) < 3.0  # normalised, not raw 0..255


def test_cifar_refuses_unofficial_files_unless_told(tmp_path):
    write_cifar(tmp_path, "cifar10")
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="md5"):
        build_loaders(cfg, input_size=32, num_classes=10, in_channels=3, seed=0)
    missing = DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere"), verify_checksums=False)
    with pytest.raises(DataError, match="data.download: true"):
        build_loaders(missing, input_size=32, num_classes=10, in_channels=3, seed=0)


def test_zoo_names_are_registered():
    assert set(PARAMETERS_10_CLASSES) <= set(MODELS.names())
