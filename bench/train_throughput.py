"""Benchmark: images/s of sparsify's training loop (masks on) vs a plain loop like torchvision's reference.

Setup: torchvision resnet18 (random weights, 10 classes) with block 8x8 masks from one prune
round (variance, target 0.5, step 0.5: half of the eligible weights zeroed). Data: `--batches`
batches of `--batch-size` random 3 x `--image-size` px images held in memory, served by a
DataLoader over a TensorDataset (no workers, no shuffle). Same device (CPU), same optimizer
(SGD lr 1e-3, momentum 0.9, weight decay 1e-4, a fresh one per epoch on both sides).

  sparsify: `sparsify.training.loop.train_epochs(model, loader, enforcer=..., epochs=1, ...)`, the loop
            `sparsify train` runs (LR schedule, masks after every step, metrics, progress);
  plain:    the loop of torchvision's references/classification `train_one_epoch`: to(device),
            forward, loss, zero_grad, backward, step, top-1/top-5 and loss.item() every step;
            on a separate copy of the pruned model, without masks.

After one warm-up epoch each, epochs alternate sparsify / plain (ABBA order) `--repeats` times;
images/s of an epoch = images / wall time of the call. Target: median sparsify images/s /
median plain images/s >= 0.97. Also timed: `MaskEnforcer.mask_grads_()` + `apply_()` alone (ms)
and their share of a step.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, median, parser, progress, pruned_resnet18, ratio, summary  # noqa: E402

TARGET_RATIO = 0.97


def plain_epoch(model, loader, *, device) -> None:
    """One epoch the way torchvision's reference `train_one_epoch` runs it (no masks)."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for image, target in loader:
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = model(image)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        top5 = output.topk(5, 1).indices.eq(target[:, None])
        acc1, acc5 = top5[:, 0].float().mean() * 100, top5.any(1).float().mean() * 100
        loss.item(), acc1.item(), acc5.item()  # what the reference's metric logger reads


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batches", type=int, default=4, help="batches per epoch (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = p.parse_args()

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from sparsify.core.masks import MaskEnforcer
    from sparsify.training.loop import train_epochs
    from sparsify.training.trainer import OptimConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model, masks, pattern = pruned_resnet18()
    sparsify_model, plain_model = model, copy.deepcopy(model)
    enforcer = MaskEnforcer(sparsify_model, masks, pattern)
    gen = torch.Generator().manual_seed(1)
    count = args.batches * args.batch_size
    data = TensorDataset(torch.randn(count, 3, args.image_size, args.image_size, generator=gen),
                         torch.randint(0, 10, (count,), generator=gen))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False)
    cfg = OptimConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_schedule="constant")
    progress(f"resnet18, {len(masks)} masked layers; {args.batches} batches of {args.batch_size} x 3 x "
             f"{args.image_size} x {args.image_size} per epoch; torch threads {torch.get_num_threads()}")

    def run(kind: str) -> float:
        start = time.perf_counter()
        if kind == "sparsify":
            train_epochs(sparsify_model, loader, enforcer=enforcer, cfg=cfg, epochs=1, device=device)
        else:
            plain_epoch(plain_model, loader, device=device)
        return count / (time.perf_counter() - start)

    run("sparsify"), run("plain")  # warm-up
    rates = {"sparsify": [], "plain": []}
    for rep in range(args.repeats):
        order = ("sparsify", "plain") if rep % 2 == 0 else ("plain", "sparsify")
        for kind in order:
            rates[kind].append(run(kind))
        progress(f"repeat {rep + 1}/{args.repeats}: sparsify {rates['sparsify'][-1]:.1f} img/s, "
                 f"plain {rates['plain'][-1]:.1f} img/s")

    # the mask step alone, right after a backward (gradients present)
    images, target = data[: args.batch_size]
    sparsify_model.train()
    torch.nn.functional.cross_entropy(sparsify_model(images), target).backward()
    grads_t, apply_t = [], []
    for _ in range(20):
        start = time.perf_counter()
        enforcer.mask_grads_()
        grads_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        enforcer.apply_()
        apply_t.append(time.perf_counter() - start)

    params = dict(sparsify_model.named_parameters())
    exact = all(bool(params[n].detach()[~pattern.expand(m, tuple(params[n].shape))].eq(0).all())
                for n, m in masks.items())
    med = {kind: median(values) for kind, values in rates.items()}
    step_s = args.batch_size / med["sparsify"]
    mask_s = median(grads_t) + median(apply_t)
    throughput_ratio = med["sparsify"] / med["plain"]
    emit({
        "benchmark": "train_throughput",
        "model": "torchvision resnet18 (num_classes 10), random weights, one block 8x8 round",
        "batch": [args.batch_size, 3, args.image_size, args.image_size],
        "batches_per_epoch": args.batches,
        "repeats": args.repeats,
        "images_per_s": {kind: summary(values, 1.0, 2) for kind, values in rates.items()},
        "ratio_sparsify_over_plain": round(throughput_ratio, 4),
        "mask_step_ms": {"mask_grads_": summary(grads_t, 1e3, 3), "apply_": summary(apply_t, 1e3, 3),
                         "both_median": round(mask_s * 1e3, 3)},
        "mask_step_share_of_step": ratio(mask_s, step_s),
        "checks": {"masked_weights_exactly_zero": exact},
        "target": {"ratio_sparsify_over_plain_min": TARGET_RATIO},
        "pass": bool(throughput_ratio >= TARGET_RATIO and exact),
    })


if __name__ == "__main__":
    main()
