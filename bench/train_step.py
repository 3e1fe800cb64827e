"""Benchmark: a training step with masks enforced vs the same step without them (resnet18, CPU).

Setup: torchvision resnet18 (random weights, 10 classes), block 8x8 masks from one prune round
(`prune_round`, criterion variance, target 0.5, step 0.5 -> about 50% of the eligible weights
zeroed), SGD (lr 1e-3, momentum 0.9, weight decay 1e-4), batches of 32 images of 112x112 held
in memory. Two copies of the pruned model, each with its own optimizer:

  masked step (what `sparsify.training.loop.train_epoch` does per batch):
      forward, loss, zero_grad(set_to_none=True), backward,
      MaskEnforcer.mask_grads_(), optimizer.step(), MaskEnforcer.apply_(), loss.item()
  plain step: the same without the two MaskEnforcer calls.

After a warm-up, blocks of `--block` steps alternate masked / plain (ABBA order over repeats).
Also timed: `mask_grads_` and `apply_` alone (median ms) and their share of the masked step.

Target: median masked step / median plain step <= 1.03.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, median, parser, progress, pruned_resnet18, ratio, summary  # noqa: E402

TARGET_RATIO = 1.03


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=20)
    p.add_argument("--block", type=int, default=1, help="steps per masked/plain block (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=112)
    args = p.parse_args()

    import torch
    from torch import nn

    from sparsify.core.masks import MaskEnforcer

    model, masks, pattern = pruned_resnet18()
    eligible = list(masks)
    params = dict(model.named_parameters())
    eligible_weights = sum(params[n].numel() for n in eligible)
    zeroed = sum(int((params[n] == 0).sum()) for n in eligible)
    progress(f"resnet18: {len(eligible)} masked layers, {zeroed / eligible_weights:.1%} of "
             f"{eligible_weights:,} eligible weights zeroed")

    masked_model, plain_model = model, copy.deepcopy(model)
    masked_model.train()
    plain_model.train()
    enforcer = MaskEnforcer(masked_model, masks, pattern)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    masked_opt, plain_opt = sgd(masked_model), sgd(plain_model)
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen),
         torch.randint(0, 10, (args.batch_size,), generator=gen))
        for _ in range(4)
    ]

    def masked_step(images, target):
        loss = criterion(masked_model(images), target)
        masked_opt.zero_grad(set_to_none=True)
        loss.backward()
        enforcer.mask_grads_()
        masked_opt.step()
        enforcer.apply_()
        return loss.item()

    def plain_step(images, target):
        loss = criterion(plain_model(images), target)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()
        return loss.item()

    counter = {"masked": 0, "plain": 0}
    steps = {"masked": masked_step, "plain": plain_step}

    def run_block(kind: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            images, target = batches[counter[kind] % len(batches)]
            counter[kind] += 1
            start = time.perf_counter()
            steps[kind](images, target)
            out.append(time.perf_counter() - start)
        return out

    def time_call(func, n: int = 10) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            func()
            out.append(time.perf_counter() - start)
        return out

    progress(f"warm-up: {args.warmup} steps each")
    run_block("masked", args.warmup)
    run_block("plain", args.warmup)

    times = {"masked": [], "plain": []}
    paired = []
    mask_grads_t, apply_t = [], []
    for rep in range(args.repeats):
        order = ("masked", "plain") if rep % 2 == 0 else ("plain", "masked")
        block = {}
        for kind in order:
            block[kind] = run_block(kind, args.block)
            times[kind].extend(block[kind])
        paired.append(median(block["masked"]) / median(block["plain"]))
        # the enforcer calls alone, on the masked model right after its step (grads present)
        mask_grads_t.extend(time_call(enforcer.mask_grads_))
        apply_t.extend(time_call(enforcer.apply_))
        progress(f"repeat {rep + 1}/{args.repeats}: masked {median(block['masked']) * 1e3:.1f} ms, "
                 f"plain {median(block['plain']) * 1e3:.1f} ms, ratio {paired[-1]:.3f}")

    # invariant check: masked weights are exactly zero in the masked model, not in the plain one
    masked_params = dict(masked_model.named_parameters())
    plain_params = dict(plain_model.named_parameters())
    held, drifted = True, 0
    for name, mask in masks.items():
        element = pattern.expand(mask, tuple(masked_params[name].shape))
        held &= bool(masked_params[name].detach()[~element].eq(0).all())
        drifted += int(plain_params[name].detach()[~element].ne(0).sum())

    med_masked, med_plain = median(times["masked"]), median(times["plain"])
    med_grads, med_apply = median(mask_grads_t), median(apply_t)
    step_ratio = med_masked / med_plain
    result = {
        "benchmark": "train_step",
        "model": "torchvision resnet18 (num_classes 10), random weights",
        "batch": [args.batch_size, 3, args.image_size, args.image_size],
        "optimizer": "SGD lr 1e-3 momentum 0.9 weight_decay 1e-4",
        "masked_layers": len(masks),
        "masked_sparsity_eligible": round(zeroed / eligible_weights, 6),
        "repeats": args.repeats,
        "steps_per_block": args.block,
        "step_ms": {"masked": summary(times["masked"], 1e3, 2), "plain": summary(times["plain"], 1e3, 2)},
        "ratio_masked_over_plain": round(step_ratio, 4),
        "paired_block_ratios": [round(r, 4) for r in paired],
        "paired_block_ratio_median": round(median(paired), 4),
        "mask_ops_ms": {
            "mask_grads_": summary(mask_grads_t, 1e3, 3),
            "apply_": summary(apply_t, 1e3, 3),
            "both_median": round((med_grads + med_apply) * 1e3, 3),
        },
        "mask_ops_share_of_masked_step": ratio(med_grads + med_apply, med_masked),
        "masked_minus_plain_ms": round((med_masked - med_plain) * 1e3, 2),
        "checks": {
            "masked_weights_exactly_zero": held,
            "plain_model_masked_entries_nonzero": drifted,
        },
        "target": {"ratio_masked_over_plain_max": TARGET_RATIO},
        "pass": bool(step_ratio <= TARGET_RATIO and held),
    }
    emit(result)


if __name__ == "__main__":
    main()
