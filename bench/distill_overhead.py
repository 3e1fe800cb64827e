"""Benchmark: images/s of the training loop with knowledge distillation (train.distill) vs without it.

Two setups, each a dense model pruned by one round (block 8x8, variance, target 0.5, step 0.5)
as the student and a copy of the dense model as the teacher (alpha 0.5, temperature 4):

  quickstart: configs/quickstart.yaml's model and data: tiny_resnet on the real digits
              (1 x 8 x 8, batch 32, the config's train loader), `--quickstart-batches` per epoch;
  resnet18:   torchvision resnet18 (10 classes) on random 3 x 32 x 32 images held in memory,
              batch 32, `--resnet-batches` per epoch.

Both sides run `sparsify.training.loop.train_epochs(..., epochs=1, limit=batches)` (what
`sparsify train` runs: masks after every step, metrics, progress) on the same student, with
`distiller=Distiller(teacher, ...)` or without it. After one warm-up epoch each, epochs alternate
distill / plain (ABBA order) `--repeats` times; images/s of an epoch = images / wall time of the
call. Also timed: the teacher's forward alone on one batch (median of 10, ms).

The teacher adds one forward (no backward) per step, about a third of a step's work, so the goal
is loose: median distill images/s / median plain images/s >= 0.6.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, median, parser, progress, summary  # noqa: E402

TARGET_RATIO = 0.6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prune_once(model):
    """Masks from one block 8x8 round (applied to the model) and the enforcer that keeps them."""
    from sparsify.core.block import BlockPattern
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    pattern = BlockPattern(8, 8)
    eligible = [l.name for l in find_layers(model, pattern, include_linear=False, exclude=[]) if l.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="variance", target=0.5, step=0.5)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    enforcer = MaskEnforcer(model, masks, pattern)
    enforcer.apply_()
    return enforcer


def quickstart_setup(batches: int):
    """tiny_resnet and the real digits train loader of configs/quickstart.yaml."""
    from sparsify.config import load_config
    from sparsify.data.datasets import build_loaders
    from sparsify.models.build import build_model
    from sparsify.stages.run import resolve_shapes

    config = load_config(os.path.join(ROOT, "configs", "quickstart.yaml"))
    shapes = resolve_shapes(config)
    model = build_model(config.model.arch, num_classes=shapes["num_classes"], in_channels=shapes["in_channels"],
                        weights=None, log=lambda message: None)
    loader, _ = build_loaders(config.data, seed=0, **shapes)
    return model, loader, min(batches, len(loader))


def resnet18_setup(batches: int, batch_size: int = 32, size: int = 32):
    """torchvision resnet18 and random 32 px images held in memory."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    model = torchvision.models.resnet18(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    count = batches * batch_size
    data = TensorDataset(torch.randn(count, 3, size, size, generator=gen), torch.randint(0, 10, (count,), generator=gen))
    return model, DataLoader(data, batch_size=batch_size, shuffle=False), batches


def measure(name: str, model, loader, batches: int, repeats: int) -> dict:
    import torch

    from sparsify.training.distill import Distiller
    from sparsify.training.loop import train_epochs
    from sparsify.training.trainer import OptimConfig

    device = torch.device("cpu")
    distiller = Distiller(copy.deepcopy(model), alpha=0.5, temperature=4.0)  # the dense model teaches
    enforcer = prune_once(model)
    cfg = OptimConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images = batches * loader.batch_size

    def run(kind: str) -> float:
        start = time.perf_counter()
        train_epochs(model, loader, enforcer=enforcer, cfg=cfg, epochs=1, limit=batches, device=device,
                     distiller=distiller if kind == "distill" else None)
        return images / (time.perf_counter() - start)

    run("distill"), run("plain")  # warm-up
    rates = {"distill": [], "plain": []}
    for rep in range(repeats):
        for kind in (("distill", "plain") if rep % 2 == 0 else ("plain", "distill")):
            rates[kind].append(run(kind))
        progress(f"{name} repeat {rep + 1}/{repeats}: distill {rates['distill'][-1]:.0f} img/s, "
                 f"plain {rates['plain'][-1]:.0f} img/s")
    batch = next(iter(loader))[0]
    forward = []
    for _ in range(10):
        start = time.perf_counter()
        distiller.teacher_logits(batch)
        forward.append(time.perf_counter() - start)
    med = {kind: median(values) for kind, values in rates.items()}
    return {
        "batch": list(batch.shape),
        "batches_per_epoch": batches,
        "images_per_s": {kind: summary(values, 1.0, 1) for kind, values in rates.items()},
        "ratio_distill_over_plain": round(med["distill"] / med["plain"], 4),
        "teacher_forward_ms": summary(forward, 1e3, 2),
        "plain_step_ms": round(1e3 * loader.batch_size / med["plain"], 2),
        "distill_step_ms": round(1e3 * loader.batch_size / med["distill"], 2),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=5)
    p.add_argument("--quickstart-batches", type=int, default=30)
    p.add_argument("--resnet-batches", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, what threads: auto gives on 2 CPUs)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"quickstart": measure("quickstart", *quickstart_setup(args.quickstart_batches), args.repeats)}
    torch.manual_seed(0)
    results["resnet18_32px"] = measure("resnet18", *resnet18_setup(args.resnet_batches), args.repeats)
    ratios = [r["ratio_distill_over_plain"] for r in results.values()]
    emit({
        "benchmark": "distill_overhead",
        "repeats": args.repeats,
        **results,
        "target": {"ratio_distill_over_plain_min": TARGET_RATIO},
        "pass": all(r >= TARGET_RATIO for r in ratios),
    })


if __name__ == "__main__":
    main()
