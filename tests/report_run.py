"""A small real run for the report's figure and HTML tests: download, a dense epoch, one prune round to
50% and an epoch (tiny_resnet on fake data, a metrics.csv row every step)."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import invoke, tiny_yaml


def make_run(folder: Path) -> Path:
    """The run folder of a four-stage tiny run under `folder` (its config is `folder`/tiny.yaml)."""
    config = folder / "tiny.yaml"
    config.write_text(tiny_yaml(runs_dir=str(folder / "runs"), train={"lr": 0.01, "log_every": 1}))
    for command in ("download", "train", "prune", "train"):
        code, _, err = invoke(command, "-c", config)
        assert code == 0, err
    return folder / "runs" / "tiny"


def colours(png: bytes) -> int:
    """Distinct colours of a PNG image."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24))


BENCH = {  # bench.json as `sparsify bench` writes it (the keys the figures read)
    "layers": [{"layer": "layer1.0.conv1", "batch": 1, "times_ms": {"dense": 0.2, "bsr": 0.1}, "chosen": "bsr",
                "speedup": 2.0},
               {"layer": "layer1.0.conv1", "batch": 8, "times_ms": {"dense": 0.9}, "chosen": "dense", "speedup": 1.0},
               {"layer": "layer3.0.conv2", "batch": 1, "times_ms": {"dense": 0.3, "bsr": 0.2}, "chosen": "bsr",
                "speedup": 1.5}],
    "end_to_end": [{"batch": b, "model": m, "median_ms": ms, "min_ms": ms * 0.9, "max_ms": ms * 1.2}
                   for b in (1, 8) for m, ms in (("dense", 3.0 * b), ("masked", 3.1 * b), ("calibrated", 2.5 * b))],
}
