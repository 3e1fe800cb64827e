"""Benchmark: ImageFolder per-image cost with PIL vs torchvision.io decoding (what `data.decoder` picks).

Setup: a generated folder of `--images` JPEGs (500x375, quality 90, smooth gradients plus noise,
about ImageNet's average size) under bench/results/. Each image goes through what a DataLoader
worker does for it (one torch thread, as in workers):

  decode: `pil_loader` (PIL open + convert RGB) vs `read_image_tensor` (torchvision.io
          read_file + decode_image to RGB uint8);
  train:  decode + the imagefolder train transforms (RandomResizedCrop 224, flip, to float,
          normalise) with each decoder's output type (PIL image vs uint8 tensor);
  val:    decode + resize 256 + center crop 224 + to float + normalise.

PIL and torchvision passes alternate over the whole folder (`--repeats` times each); figures
are median milliseconds per image. Target: the decoder `auto` picks is not slower than the
other on the train pipeline (ratio auto / other <= 1.0).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import RESULTS_DIR, emit, median, parser, progress, ratio, summary  # noqa: E402


def write_jpegs(folder: str, count: int) -> list[str]:
    """`count` 500x375 JPEGs of smooth colour gradients with mild noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(count):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        base = np.stack([np.sin(fx * x + phase), np.cos(fy * y - phase), np.sin(fx * x + fy * y)], -1)
        pixels = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def per_image_seconds(paths: list[str], step) -> float:
    start = time.perf_counter()
    for path in paths:
        step(path)
    return (time.perf_counter() - start) / len(paths)


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=5)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()

    import torch
    from torchvision.datasets.folder import pil_loader

    from sparsify.data.imagefolder import AUTO_DECODER, imagefolder_transforms, read_image_tensor
    from sparsify.data.presets import default_preset

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    folder = os.path.join(RESULTS_DIR, f"imagefolder_decode-{os.getpid()}")
    paths = write_jpegs(folder, args.images)
    size = sum(os.path.getsize(path) for path in paths) / len(paths)
    progress(f"{len(paths)} JPEGs of 500x375, {size / 1024:.0f} KiB each, in {folder}")
    preset = default_preset(224)
    train_tf = imagefolder_transforms(preset, in_channels=3, train=True)
    val_tf = imagefolder_transforms(preset, in_channels=3, train=False)
    readers = {"pil": lambda path: pil_loader(path).load(), "torchvision": read_image_tensor}
    loaders = {"pil": pil_loader, "torchvision": read_image_tensor}
    tasks = {
        "decode": {k: readers[k] for k in readers},
        "train": {k: (lambda path, f=loaders[k]: train_tf(f(path))) for k in loaders},
        "val": {k: (lambda path, f=loaders[k]: val_tf(f(path))) for k in loaders},
    }
    try:
        outputs = {k: val_tf(loaders[k](paths[0])) for k in loaders}
        times = {task: {"pil": [], "torchvision": []} for task in tasks}
        for rep in range(args.repeats):
            order = ("pil", "torchvision") if rep % 2 == 0 else ("torchvision", "pil")
            for task, steps in tasks.items():
                for kind in order:
                    times[task][kind].append(per_image_seconds(paths, steps[kind]))
            progress(f"repeat {rep + 1}/{args.repeats}: train pil {times['train']['pil'][-1] * 1e3:.2f} ms, "
                     f"torchvision {times['train']['torchvision'][-1] * 1e3:.2f} ms per image")
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    med = {task: {k: median(v) for k, v in by.items()} for task, by in times.items()}
    other = "pil" if AUTO_DECODER == "torchvision" else "torchvision"
    train_ratio = med["train"][AUTO_DECODER] / med["train"][other]
    max_diff = float((outputs["pil"] - outputs["torchvision"]).abs().max())
    result = {
        "benchmark": "imagefolder_decode",
        "images": len(paths),
        "image": "500x375 JPEG quality 90",
        "mean_file_kib": round(size / 1024, 1),
        "torch_threads": 1,
        "ms_per_image": {task: {k: summary(v, 1e3, 3) for k, v in by.items()} for task, by in times.items()},
        "ratio_torchvision_over_pil": {task: ratio(m["torchvision"], m["pil"]) for task, m in med.items()},
        "auto_decoder": AUTO_DECODER,
        "checks": {"val_outputs_max_abs_diff": round(max_diff, 4)},
        "target": {"ratio_auto_over_other_train_max": 1.0},
        "pass": bool(train_ratio <= 1.0),
    }
    emit(result)


if __name__ == "__main__":
    main()
