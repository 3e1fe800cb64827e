"""Datasets and loaders: digits split, fake data, Fashion-MNIST IDX parsing, ImageFolder trees."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsify.config import DataConfig
from sparsify.data.datasets import build_loaders, dataset_info
from sparsify.data.images import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, fake_datasets, read_idx
from sparsify.errors import DataError

HAS_FASHION_MNIST = all(
    (Path(FASHION_MNIST_ROOT) / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES.values()
)


def loaders(dataset: str, *, seed: int = 0, input_size: int = 8, num_classes: int = 10,
            in_channels: int = 1, **fields):
    cfg = DataConfig(dataset=dataset, **fields)
    return build_loaders(
        cfg, input_size=input_size, num_classes=num_classes, in_channels=in_channels, seed=seed
    )


def concat(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_fixed():
    train, val = loaders("digits", seed=0)
    train_other, val_other = loaders("digits", seed=7)
    assert len(train.dataset) + len(val.dataset) == 1797
    assert len(val.dataset) == 360  # ceil(0.2 * 1797)
    val_x, val_y = concat(val)
    other_x, other_y = concat(val_other)
    assert torch.equal(val_x, other_x) and torch.equal(val_y, other_y)
    assert torch.equal(train.dataset.labels, train_other.dataset.labels)
    counts = Counter(val_y.tolist())
    total = Counter(train.dataset.labels.tolist()) + counts
    for label, n in total.items():
        assert abs(counts[label] - 0.2 * n) <= 1, label


def test_digits_val_fraction_changes_split():
    train, val = loaders("digits", val_fraction=0.5)
    assert len(val.dataset) == 899 and len(train.dataset) == 898


def test_digits_shapes_and_normalisation():
    train, val = loaders("digits", batch_size=32)
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = train.dataset.images
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3
    assert set(torch.unique(train.dataset.labels).tolist()) == set(range(10))
    assert len(list(val)) == 12  # 360 / 32 without drop_last


def test_digits_resized_and_repeated_to_rgb():
    train, val = loaders("digits", input_size=16, in_channels=3, batch_size=4)
    x, _ = next(iter(val))
    assert x.shape == (4, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])


def test_train_order_follows_seed_and_val_is_in_order():
    first = next(iter(loaders("digits", seed=1)[0]))[1]
    again = next(iter(loaders("digits", seed=1)[0]))[1]
    other = next(iter(loaders("digits", seed=2)[0]))[1]
    assert torch.equal(first, again) and not torch.equal(first, other)
    train, val = loaders("digits")
    assert not val.drop_last and not train.drop_last


def test_model_with_too_few_outputs_is_refused():
    with pytest.raises(DataError, match="digits has 10 classes but the model has 3 outputs"):
        loaders("digits", num_classes=3)


def test_bad_channel_count_is_refused():
    with pytest.raises(DataError, match="1 or 3 image channels"):
        loaders("digits", in_channels=2)


def test_dataset_info():
    assert dataset_info(DataConfig(dataset="digits")).__dict__ == dict(num_classes=10, in_channels=1, input_size=8)
    assert dataset_info(DataConfig(dataset="fashion-mnist")).input_size == 28
    assert dataset_info(DataConfig(dataset="fake")).num_classes == 10
    assert dataset_info(DataConfig(dataset="fake"), num_classes=4).__dict__ == dict(
        num_classes=4, in_channels=3, input_size=32
    )


# ----------------------------------------------------------------------------- fake


def test_fake_loaders_are_deterministic():
    kwargs = dict(input_size=12, num_classes=5, in_channels=3, fake_samples=20, batch_size=8)
    train_a, val_a = loaders("fake", seed=3, **kwargs)
    train_b, val_b = loaders("fake", seed=3, **kwargs)
    for a, b in ((train_a, train_b), (val_a, val_b)):
        xa, ya = concat(a)
        xb, yb = concat(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x, y = concat(val_a)
    assert x.shape == (20, 3, 12, 12) and 0 <= y.min() and y.max() < 5


def test_fake_images_are_a_function_of_seed_split_and_index():
    kwargs = dict(input_size=12, num_classes=5, in_channels=3, fake_samples=20, batch_size=8)
    torch.manual_seed(1)
    train_a, val_a = loaders("fake", seed=3, **kwargs)
    torch.manual_seed(2)
    torch.rand(7)  # another global RNG state, another loader seed: the images stay
    train_b, val_b = loaders("fake", seed=11, **kwargs)
    assert torch.equal(concat(val_a)[0], concat(val_b)[0]) and torch.equal(concat(val_a)[1], concat(val_b)[1])
    for index in (19, 0, 7):  # any order of reads
        for a, b in ((train_a.dataset, train_b.dataset), (val_a.dataset, val_b.dataset)):
            assert torch.equal(a[index][0], b[index][0]) and a[index][1] == b[index][1]
    assert torch.equal(val_a.dataset.labels, torch.stack([val_a.dataset[i][1] for i in range(20)]))
    # the shuffled train loader gives the same images, in the order of its own seed
    assert sorted(map(tuple, concat(train_a)[0].flatten(1).tolist())) == sorted(
        map(tuple, concat(train_b)[0].flatten(1).tolist()))
    # train and val are different images; another data seed, other images
    assert not torch.equal(train_a.dataset[0][0], val_a.dataset[0][0])
    other_train, other_val = fake_datasets(samples=20, input_size=12, num_classes=5, in_channels=3, seed=1)
    assert not torch.equal(other_val[0][0], val_a.dataset[0][0])
    assert torch.equal(fake_datasets(samples=20, input_size=12, num_classes=5, in_channels=3)[1][4][0],
                       val_a.dataset[4][0])
    # a larger split starts with the same images
    longer = loaders("fake", seed=3, **{**kwargs, "fake_samples": 30})[1].dataset
    assert torch.equal(longer[19][0], val_a.dataset[19][0])


FAKE_RUN = """\
name: fake
seed: 0
device: cpu
model: {arch: tiny_resnet, num_classes: 4}
data: {dataset: fake, fake_samples: 32, batch_size: 16}
sparsity: {target: 0.5, step: 0.5}
train: {lr: 0.01}
"""


def test_eval_after_train_reports_the_train_stage_accuracy(tmp_path, monkeypatch):
    """Through the CLI: the train stage's val_acc1 is what `eval` measures on the same checkpoint."""
    import json

    from typer.testing import CliRunner

    from sparsify.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake.yaml").write_text(FAKE_RUN)
    for args in (["download"], ["prune"], ["train", "--epochs", "1"], ["eval"]):
        result = CliRunner().invoke(app, [*args, "-c", "fake.yaml"])
        assert result.exit_code == 0, result.stderr
    history = [json.loads(line) for line in (tmp_path / "runs/fake/history.jsonl").read_text().splitlines()]
    trained, evaluated = history[-2], history[-1]
    assert (trained["stage"], evaluated["stage"]) == ("trained", "eval")
    assert evaluated["checkpoint"] == Path(trained["checkpoint"]).name
    for key in ("val_acc1", "val_acc5", "val_loss"):
        assert evaluated["metrics"][key] == pytest.approx(trained["metrics"][key], abs=1e-4), key
    assert evaluated["metrics"]["val_acc1"] == trained["metrics"]["val_acc1"]


def test_workers_keep_the_order():
    train, _ = loaders("fake", seed=0, input_size=4, in_channels=3, fake_samples=16, batch_size=4, workers=1)
    assert train.persistent_workers and train.num_workers == 1
    inline, _ = loaders("fake", seed=0, input_size=4, in_channels=3, fake_samples=16, batch_size=4)
    assert torch.equal(concat(train)[1], concat(inline)[1])


# ----------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray, *, magic: int, compress: bool = True) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fashion_folder(root: Path, *, n_train: int = 6, n_val: int = 4, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        write_idx(root / (FASHION_MNIST_FILES[f"{split}_images"] + suffix), images, magic=2051, compress=compress)
        write_idx(root / (FASHION_MNIST_FILES[f"{split}_labels"] + suffix), labels, magic=2049, compress=compress)
    return root


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason=f"{FASHION_MNIST_ROOT} is absent")
def test_fashion_mnist_real_files():
    train, val = loaders("fashion-mnist", input_size=28, batch_size=256)
    assert len(train.dataset) == 60000 and len(val.dataset) == 10000
    x, y = next(iter(val))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    images = train.dataset.images
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01
    assert torch.bincount(val.dataset.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_small_folder(tmp_path, compress):
    root = write_fashion_folder(tmp_path / "fm", compress=compress)
    train, val = loaders("fashion-mnist", root=str(root), input_size=28, batch_size=4)
    assert len(train.dataset) == 6 and len(val.dataset) == 4
    assert next(iter(train))[0].shape == (4, 1, 28, 28)


def test_fashion_mnist_resized_to_rgb(tmp_path):
    root = write_fashion_folder(tmp_path / "fm")
    _, val = loaders("fashion-mnist", root=str(root), input_size=32, in_channels=3, batch_size=4)
    assert next(iter(val))[0].shape == (4, 3, 32, 32)


def test_fashion_mnist_missing_folder(tmp_path):
    with pytest.raises(DataError) as info:
        loaders("fashion-mnist", root=str(tmp_path / "absent"), input_size=28)
    message = str(info.value)
    assert str(tmp_path / "absent") in message and "apt-get install dataset-fashion-mnist" in message
    for name in FASHION_MNIST_FILES.values():
        assert name in message


def test_fashion_mnist_missing_file(tmp_path):
    root = write_fashion_folder(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is missing.*apt-get install"):
        loaders("fashion-mnist", root=str(root), input_size=28)


def test_fashion_mnist_corrupt_files(tmp_path):
    root = write_fashion_folder(tmp_path / "fm")
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate data")
    with pytest.raises(DataError, match=f"cannot read {bad}"):
        loaders("fashion-mnist", root=str(root), input_size=28)
    write_idx(bad, np.zeros((2, 28, 28)), magic=2049)
    with pytest.raises(DataError, match=f"{bad} has IDX magic number 2049, expected 2051"):
        loaders("fashion-mnist", root=str(root), input_size=28)
    good = np.array([2051, 2, 28, 28], dtype=">u4").tobytes() + bytes(28 * 28)
    bad.write_bytes(gzip.compress(good))
    with pytest.raises(DataError, match="truncated or corrupt"):
        loaders("fashion-mnist", root=str(root), input_size=28)


def test_read_idx_parses_labels(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.array([3, 1, 4]), magic=2049, compress=False)
    assert read_idx(path, magic=2049).tolist() == [3, 1, 4]


# ----------------------------------------------------------------------------- imagefolder


def write_image_tree(root: Path, classes: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if i == 0:
                    image = image.convert("L")  # gray files become RGB through ImageFolder's loader
                image.save(folder / f"{i}.png")
    return root


def test_imagefolder_shapes_and_classes(tmp_path):
    root = write_image_tree(tmp_path / "img", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    cfg = DataConfig(dataset="imagefolder", root=str(root), batch_size=4)
    assert dataset_info(cfg).num_classes == 2
    train, val = build_loaders(cfg, input_size=32, num_classes=2, in_channels=3, seed=0)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.tolist() != []
    x, y = concat(val)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_missing_train(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    expected = (
        f"data.root '{tmp_path}' has no train/ folder; imagefolder expects "
        "root/train/<class>/<image> and root/val/<class>/<image>"
    )
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path))
    with pytest.raises(DataError) as info:
        build_loaders(cfg, input_size=32, num_classes=2, in_channels=3, seed=0)
    assert str(info.value) == expected
    with pytest.raises(DataError, match="has no train/ folder"):
        dataset_info(cfg)


def test_imagefolder_class_mismatch(tmp_path):
    root = write_image_tree(tmp_path / "img", {"train": ["cat", "dog"], "val": ["cat", "owl"]})
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    with pytest.raises(DataError, match=r"different classes \(only in train: \['dog'\], only in val: \['owl'\]\)"):
        build_loaders(cfg, input_size=32, num_classes=2, in_channels=3, seed=0)


def test_imagefolder_empty_class_folder(tmp_path):
    root = write_image_tree(tmp_path / "img", {"train": ["cat"], "val": ["cat"]})
    (root / "train" / "empty").mkdir()
    shutil.rmtree(root / "val" / "cat")
    (root / "val" / "cat").mkdir()
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    with pytest.raises(DataError, match="cannot read image folder"):
        build_loaders(cfg, input_size=32, num_classes=2, in_channels=3, seed=0)


# ----------------------------------------------------------------------------- imagefolder: decoders, presets, augmentation


def write_jpeg_tree(root: Path, *, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """Smooth colour JPEGs (and one gray one) under root/train and root/val."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                phase = rng.uniform(0, 6)
                planes = [np.sin(0.1 * x + phase), np.cos(0.08 * y + phase), np.sin(0.05 * (x + y))]
                pixels = (127 + 100 * np.stack(planes, -1)).astype(np.uint8)
                image = Image.fromarray(pixels)
                image = image.convert("L") if i == 0 else image
                image.save(folder / f"{i}.jpg", quality=95)
    return root


def imagefolder_loaders(root: Path, *, num_classes: int = 2, preset=None, **fields):
    cfg = DataConfig(dataset="imagefolder", root=str(root), batch_size=4, **fields)
    return build_loaders(cfg, input_size=32, num_classes=num_classes, in_channels=3, seed=0, preset=preset)


@pytest.fixture
def jpeg_root(tmp_path) -> Path:
    return write_jpeg_tree(tmp_path / "jpeg")


def test_decoders_give_the_same_images(jpeg_root):
    from sparsify.data.imagefolder import AUTO_DECODER, image_reader, read_image_tensor

    outputs = {}
    for decoder in ("pil", "torchvision", "auto"):
        _, val = imagefolder_loaders(jpeg_root, decoder=decoder)
        outputs[decoder] = concat(val)
    pil_x, torchvision_x = outputs["pil"][0], outputs["torchvision"][0]
    assert pil_x.shape == torchvision_x.shape == (6, 3, 32, 32)
    # same JPEG decoder library underneath; the resize differs by a few grey levels at most
    assert (pil_x - torchvision_x).abs().mean() < 0.02
    assert torch.equal(outputs["auto"][0], outputs[AUTO_DECODER][0])
    assert image_reader("torchvision") is read_image_tensor
    gray = read_image_tensor(str(jpeg_root / "val" / "cat" / "0.jpg"))
    assert gray.shape == (3, 48, 64) and gray.dtype == torch.uint8


def test_torchvision_decoder_falls_back_to_pil_for_other_formats(tmp_path):
    from sparsify.data.imagefolder import read_image_tensor

    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    Image.fromarray(pixels).save(tmp_path / "a.bmp")
    assert torch.equal(read_image_tensor(str(tmp_path / "a.bmp")), torch.from_numpy(pixels).permute(2, 0, 1))


def test_preset_sets_the_eval_resize_and_normalisation(jpeg_root):
    from sparsify.data.presets import ImagePreset

    plain = concat(imagefolder_loaders(jpeg_root)[1])[0]
    preset = ImagePreset(crop_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                         interpolation="bicubic")
    wide = concat(imagefolder_loaders(jpeg_root, preset=preset)[1])[0]
    assert wide.shape == plain.shape and not torch.allclose(wide, plain)
    assert wide.min() >= -1.0 - 1e-6 and wide.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5 of [0, 1]


@pytest.mark.parametrize("policy", ["imagenet", "rand", "trivial", "augmix"])
def test_auto_augment_policies(jpeg_root, policy):
    train, _ = imagefolder_loaders(jpeg_root, auto_augment=policy, random_erase=1.0)
    steps = [type(t).__name__ for t in train.dataset.transform.transforms]
    expected = {"imagenet": "AutoAugment", "rand": "RandAugment", "trivial": "TrivialAugmentWide",
                "augmix": "AugMix"}[policy]
    assert expected in steps and steps[-1] == "RandomErasing"
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (4,)


def test_random_erase_erases_a_patch(jpeg_root):
    torch.manual_seed(0)
    train, _ = imagefolder_loaders(jpeg_root, random_erase=1.0)
    x, _ = next(iter(train))
    assert all(bool((image == 0).all(0).any()) for image in x)  # each image has an erased (zero) area
    plain, _ = imagefolder_loaders(jpeg_root)
    assert "RandomErasing" not in [type(t).__name__ for t in plain.dataset.transform.transforms]


def test_image_augmentations_are_refused_outside_imagefolder():
    with pytest.raises(DataError, match="data.auto_augment='rand' applies to imagefolder only.*set data.auto_augment: null"):
        loaders("digits", auto_augment="rand")
    with pytest.raises(DataError, match="data.random_erase=0.25 applies to imagefolder only.*set data.random_erase: 0.0"):
        loaders("digits", random_erase=0.25)


@pytest.mark.parametrize("fields", [{"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}])
def test_mixup_cutmix_give_soft_targets(fields):
    torch.manual_seed(0)
    train, val = loaders("digits", batch_size=16, **fields)
    x, y = next(iter(train))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16, 10) and y.dtype == torch.float32
    assert torch.allclose(y.sum(1), torch.ones(16))
    assert bool(((y > 0).sum(1) >= 1).all()) and bool((y.max(1).values < 1).any())  # some rows are mixed
    vx, vy = next(iter(val))
    assert vy.shape == (16,) and vy.dtype == torch.int64  # validation keeps hard labels


def test_mixup_works_with_workers_and_imagefolder(jpeg_root):
    train, _ = imagefolder_loaders(jpeg_root, num_classes=3, mixup_alpha=1.0, workers=1, prefetch=3)
    assert train.prefetch_factor == 3 and train.num_workers == 1
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
    assert bool((y[:, 2] == 0).all())  # no image of the third (empty) class


def test_prefetch_only_with_workers():
    train, _ = loaders("digits", prefetch=4)
    assert train.num_workers == 0 and train.prefetch_factor is None
