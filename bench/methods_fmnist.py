"""Benchmark: sparsity methods on Fashion-MNIST with a small ResNet, the same epoch budget for all.

Rows (each trains `tiny_resnet`, 1 -> 16/32/64 channels, from the same seeded random weights):
  * dense: `--epochs` epochs without masks (the reference);
  * static_magnitude: half the epochs dense, one global magnitude prune to 90% of the eligible
    conv weights (scope global, criterion l1, one round), then the other half finetuning;
  * dsr: `--epochs` epochs of dynamic sparse reparameterization at 90% from the first step
    (period batches/5 steps, doubled after the first half, frozen for the last epoch; N_p 10% of the kept weights).
More rows (gradual, gumbel 2:4, magnitude 2:4) are functions `(ctx) -> row` added to ROWS.

The training set is subsampled: `--batches` random batches of 64 per epoch (a fresh shuffle of the
60k images each epoch) and the first `--val-batches` x 256 test images, so all rows finish in a few
minutes on 2 CPU cores. SGD momentum 0.9, lr 0.05 cosine within each train call, weight decay 5e-4.
Eligible weights: every conv but the 1-channel stem (the Linear head stays dense).

Checks (the `pass` target): every sparse row keeps exactly the expected number of weights
(floor(0.9 x size) zeros per layer for dsr, floor(0.9 x all eligible) for the global prune; no
kept weight outside the masks), and dsr's kept count is the same after every reparameterization.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, progress  # noqa: E402

TARGET = 0.9
EXCLUDE = ["conv1.weight"]


class Context:
    """What every row shares: loaders, the starting model, the eligible layers, the budget."""

    def __init__(self, *, epochs: int, batches: int, val_batches: int, seed: int) -> None:
        import torch

        from sparsify.config import DataConfig
        from sparsify.data import build_loaders
        from sparsify.models import build_model
        from sparsify.patterns import UnstructuredPattern
        from sparsify.prune import find_layers

        self.epochs, self.batches, self.val_batches, self.seed = epochs, batches, val_batches, seed
        data = DataConfig(dataset="fashion-mnist", batch_size=64)
        self.train_loader, _ = build_loaders(data, input_size=28, num_classes=10, in_channels=1, seed=seed)
        val_cfg = DataConfig(dataset="fashion-mnist", batch_size=256)
        _, self.val_loader = build_loaders(val_cfg, input_size=28, num_classes=10, in_channels=1, seed=seed)
        torch.manual_seed(seed)
        self.start = build_model("tiny_resnet", num_classes=10, in_channels=1)
        self.pattern = UnstructuredPattern()
        layers = find_layers(self.start, self.pattern, include_linear=False, exclude=EXCLUDE)
        self.eligible = [layer.name for layer in layers if layer.reason is None]

    def optim(self):
        from sparsify.train import OptimConfig

        return OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")

    def train(self, model, masks: dict, *, epochs: int, callbacks=()):
        """Train `model` with `masks` enforced; returns the enforcer (its masks are the final ones)."""
        import torch

        from sparsify.masks import MaskEnforcer
        from sparsify.train import train_epochs

        torch.manual_seed(self.seed)
        enforcer = MaskEnforcer(model, masks, self.pattern)
        train_epochs(model, self.train_loader, enforcer=enforcer, cfg=self.optim(), epochs=epochs,
                     device=torch.device("cpu"), limit=self.batches, callbacks=list(callbacks))
        return enforcer

    def row(self, model, masks: dict, started: float, *, expected_kept: int | None = None, **extra) -> dict:
        """Accuracy, sparsity over eligible weights (by mask and by weight), kept counts, seconds."""
        from sparsify.train import evaluate

        metrics = evaluate(model, self.val_loader, device=__import__("torch").device("cpu"), limit=self.val_batches)
        params = dict(model.named_parameters())
        total = sum(params[n].numel() for n in self.eligible)
        kept = sum(int(masks[n].sum()) for n in self.eligible) if masks else total
        nonzero = sum(int(params[n].count_nonzero()) for n in self.eligible)
        return {"val_acc1": round(metrics["val_acc1"], 2), "val_loss": round(metrics["val_loss"], 4),
                "sparsity_masks": round(1 - kept / total, 6), "sparsity_weights": round(1 - nonzero / total, 6),
                "kept": kept, "expected_kept": expected_kept if expected_kept is not None else total,
                "seconds": round(time.perf_counter() - started, 1), **extra}


def run_dense(ctx: Context) -> dict:
    started = time.perf_counter()
    model = copy.deepcopy(ctx.start)
    ctx.train(model, {}, epochs=ctx.epochs)
    return ctx.row(model, {}, started)


def run_static_magnitude(ctx: Context) -> dict:
    from sparsify.masks import MaskEnforcer, full_masks
    from sparsify.prune import PruneSettings, prune_round

    started = time.perf_counter()
    model = copy.deepcopy(ctx.start)
    dense_epochs = ctx.epochs // 2
    ctx.train(model, {}, epochs=dense_epochs)
    settings = PruneSettings(ctx.pattern, "l1", TARGET, 1.0, "remaining", False, False, False, scope="global")
    weights = dict(model.named_parameters())
    masks, _ = prune_round(weights, full_masks(model, ctx.eligible, ctx.pattern), settings)
    MaskEnforcer(model, masks, ctx.pattern).apply_()
    enforcer = ctx.train(model, masks, epochs=ctx.epochs - dense_epochs)
    total = sum(weights[n].numel() for n in ctx.eligible)
    return ctx.row(model, enforcer.masks, started, expected_kept=total - math.floor(TARGET * total),
                   dense_epochs=dense_epochs)


def run_dsr(ctx: Context) -> dict:
    from sparsify.dsr import DsrCallback, DsrSettings

    started = time.perf_counter()
    model = copy.deepcopy(ctx.start)
    settings = DsrSettings(target=TARGET, prune_fraction=0.1, period=max(1, ctx.batches // 5),
                           double_at=(ctx.epochs // 2,),
                           stop_epoch=max(ctx.epochs - 1, 1))
    callback = DsrCallback(settings, list(ctx.eligible), ctx.seed, threshold=settings.threshold)
    counts = []
    original = callback.after_step

    def counted(step, epoch, model_, enforcer):
        before = len(callback.steps)
        original(step, epoch, model_, enforcer)
        if len(callback.steps) > before:
            counts.append(sum(int(enforcer.masks[n].sum()) for n in ctx.eligible))

    callback.after_step = counted
    enforcer = ctx.train(model, {}, epochs=ctx.epochs, callbacks=[callback])
    pruned = [s.total_pruned for s in callback.steps]
    sizes = [p.numel() for n, p in model.named_parameters() if n in ctx.eligible]
    return ctx.row(model, enforcer.masks, started, expected_kept=sum(n - math.floor(TARGET * n) for n in sizes),
                   reparameterizations=len(callback.steps),
                   kept_constant=len(set(counts)) == 1 if counts else None, pruned_per_step_first_last=[pruned[:3], pruned[-3:]],
                   target_pruned=callback.target, final_threshold=callback.threshold)


# Rows in the order they run: name -> function(ctx) -> dict. Other methods add theirs here.
ROWS = {"dense": run_dense, "static_magnitude": run_static_magnitude, "dsr": run_dsr}
SPARSE_90 = ("static_magnitude", "dsr")  # rows that must end at exactly 90% of the eligible weights


def main() -> None:
    import argparse

    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4, help="epoch budget of every row (default 4)")
    p.add_argument("--batches", type=int, default=150, help="batches of 64 per epoch (default 150)")
    p.add_argument("--val-batches", type=int, default=8, help="test batches of 256 (default 8)")
    p.add_argument("--repeats", type=int, default=1, help="ignored (one run per row); kept for run_all.py")
    p.add_argument("--only", nargs="+", choices=list(ROWS), help="run only these rows")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ctx = Context(epochs=args.epochs, batches=args.batches, val_batches=args.val_batches, seed=0)
    rows = {}
    for name in args.only or ROWS:
        progress(f"{name}: {args.epochs} epochs x {args.batches} batches")
        rows[name] = ROWS[name](ctx)
        progress(f"{name}: {rows[name]}")
    exact = {n: rows[n]["kept"] == rows[n]["expected_kept"] and rows[n]["sparsity_weights"] >= rows[n]["sparsity_masks"]
             for n in SPARSE_90 if n in rows}
    checks = {"exact_90_percent": exact, "dsr_kept_constant": rows.get("dsr", {}).get("kept_constant")}
    emit({
        "benchmark": "methods_fmnist",
        "setup": {"model": "tiny_resnet", "eligible_layers": len(ctx.eligible), "epochs": args.epochs,
                  "train_images_per_epoch": 64 * args.batches, "val_images": 256 * args.val_batches,
                  "target_sparsity": TARGET},
        "rows": rows,
        "target": "every 90% row keeps exactly the expected count (floor(0.9 x weights) zeros: per layer for dsr, "
                  "over all eligible weights for the global prune); dsr keeps its count at every step",
        "pass": all(exact.values()) and checks["dsr_kept_constant"] is not False,
        "checks": checks,
    })


if __name__ == "__main__":
    main()
