"""Benchmark: sparsity methods on Fashion-MNIST with a small ResNet, the same epoch budget for all.

Rows (each trains `tiny_resnet`, 1 -> 16/32/64 channels, from the same seeded random weights):
  * dense: `--epochs` epochs without masks (the reference);
  * static_magnitude: half the epochs dense, one global magnitude prune to 90% of the eligible
    conv weights (scope global, criterion l1, one round), then the other half finetuning;
  * dsr: `--epochs` epochs of dynamic sparse reparameterization at 90% from the first step
    (period batches/5 steps, doubled after the first half, frozen for the last epoch; N_p 10% of the kept weights).
  * gradual: `--epochs` epochs, cubic schedule 0 -> 90% over the first half (every batches/5 steps, l1);
  * magnitude_2of4_oneshot: the dense row's model, one magnitude 2:4 prune (nm, l1), no finetuning;
  * gumbel_2of4_mask_only: the dense row's model, one epoch of learned 2:4 masks (logits only,
    AdamW lr 1.0, weight decay 1e-4), the argmax masks applied. Both 2:4 rows need the dense row.

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
        from sparsify.data.datasets import build_loaders
        from sparsify.models.build import build_model
        from sparsify.core.elements import UnstructuredPattern
        from sparsify.core.prune import find_layers

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
        from sparsify.training.trainer import OptimConfig

        return OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")

    def train(self, model, masks: dict, *, epochs: int, callbacks=()):
        """Train `model` with `masks` enforced; returns the enforcer (its masks are the final ones)."""
        import torch

        from sparsify.core.masks import MaskEnforcer
        from sparsify.training.loop import train_epochs

        torch.manual_seed(self.seed)
        enforcer = MaskEnforcer(model, masks, self.pattern)
        train_epochs(model, self.train_loader, enforcer=enforcer, cfg=self.optim(), epochs=epochs,
                     device=torch.device("cpu"), limit=self.batches, callbacks=list(callbacks))
        return enforcer

    def row(self, model, masks: dict, started: float, *, expected_kept: int | None = None, **extra) -> dict:
        """Accuracy, sparsity over eligible weights (by mask and by weight), kept counts, seconds."""
        from sparsify.training.loop import evaluate

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
    ctx.dense = model  # the 2:4 rows start from it
    return ctx.row(model, {}, started)


def run_static_magnitude(ctx: Context) -> dict:
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.prune import PruneSettings, prune_round

    started = time.perf_counter()
    model = copy.deepcopy(ctx.start)
    dense_epochs = ctx.epochs // 2
    ctx.train(model, {}, epochs=dense_epochs)
    settings = PruneSettings(pattern=ctx.pattern, criterion="l1", target=TARGET, step=1.0, keep_rows=False,
                             keep_cols=False, scope="global")
    weights = dict(model.named_parameters())
    masks, _ = prune_round(weights, full_masks(model, ctx.eligible, ctx.pattern), settings)
    MaskEnforcer(model, masks, ctx.pattern).apply_()
    enforcer = ctx.train(model, masks, epochs=ctx.epochs - dense_epochs)
    total = sum(weights[n].numel() for n in ctx.eligible)
    return ctx.row(model, enforcer.masks, started, expected_kept=total - math.floor(TARGET * total),
                   dense_epochs=dense_epochs)


def run_dsr(ctx: Context) -> dict:
    from sparsify.methods.dsr import DsrCallback, DsrSettings

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


def run_gradual(ctx: Context) -> dict:
    """Cubic schedule 0 -> 90% over the first half of the budget, every batches/5 steps (l1, unstructured)."""
    from types import SimpleNamespace

    from sparsify.config import load_config
    from sparsify.methods.gradual import GradualCallbacks

    started = time.perf_counter()
    model = copy.deepcopy(ctx.start)
    sparsity = load_config(None, ["sparsity.method=gradual", "sparsity.pattern.type=unstructured",
                                  "sparsity.criterion=l1", f"sparsity.target={TARGET}", "sparsity.keep_rows=false",
                                  "sparsity.keep_cols=false", f"sparsity.gradual.end={ctx.epochs / 2}",
                                  f"sparsity.gradual.frequency={max(1, ctx.batches // 5)}"]).sparsity
    callback = GradualCallbacks(SimpleNamespace(sparsity=sparsity, eligible=list(ctx.eligible), parent_meta={},
                                                seed=ctx.seed, extra={"steps_per_epoch": ctx.batches}))
    enforcer = ctx.train(model, {}, epochs=ctx.epochs, callbacks=[callback])
    sizes = [p.numel() for n, p in model.named_parameters() if n in ctx.eligible]
    return ctx.row(model, enforcer.masks, started, expected_kept=sum(n - math.floor(TARGET * n) for n in sizes),
                   pruning_steps=len(callback.log))


def two_of_four_layers(ctx: Context):
    """Eligible convs for 2:4 (input channels a multiple of 4; the 1-channel stem is out)."""
    params = dict(ctx.dense.named_parameters())
    return [n for n in ctx.eligible if params[n].shape[1] % 4 == 0]


def run_magnitude_2of4(ctx: Context) -> dict:
    """One-shot magnitude 2:4 (pattern nm, l1) of the dense row's model, no finetuning."""
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.patterns import build_pattern
    from sparsify.core.prune import PruneSettings, prune_round

    started = time.perf_counter()
    model = copy.deepcopy(ctx.dense)
    nm = build_pattern({"type": "nm", "n": 2, "m": 4})
    names = two_of_four_layers(ctx)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, names, nm),
                           PruneSettings(pattern=nm, criterion="l1", target=0.5, step=1.0, keep_rows=False,
                                         keep_cols=False))
    MaskEnforcer(model, masks, nm).apply_()
    full, expected = two_of_four_masks(ctx, model, masks)
    return ctx.row(model, full, started, expected_kept=expected)


def two_of_four_masks(ctx: Context, model, masks: dict) -> tuple[dict, int]:
    """Element masks for every eligible layer (all kept where 2:4 does not apply) and the kept count 2:4 allows."""
    import torch

    params = dict(model.named_parameters())
    full = {n: masks[n].reshape(params[n].shape) if n in masks else torch.ones_like(params[n], dtype=torch.bool)
            for n in ctx.eligible}
    expected = sum(params[n].numel() // (2 if n in masks else 1) for n in ctx.eligible)
    return full, expected


def run_gumbel_2of4(ctx: Context) -> dict:
    """Learned 2:4 masks on the dense row's model: logits only (AdamW lr 1.0), one epoch, argmax saved."""
    from types import SimpleNamespace

    import torch

    from sparsify.methods.gumbel import GumbelOptions
    from sparsify.methods.gumbel import GumbelCallbacks
    from sparsify.core.masks import MaskEnforcer
    from sparsify.training.loop import train_epochs
    from sparsify.training.trainer import OptimConfig

    started = time.perf_counter()
    model = copy.deepcopy(ctx.dense)
    names = two_of_four_layers(ctx)
    callback = GumbelCallbacks(SimpleNamespace(sparsity=SimpleNamespace(gumbel=GumbelOptions()), eligible=names,
                                               parent_meta={}, seed=ctx.seed, extra={"trainable": "mask"}))
    torch.manual_seed(ctx.seed)
    enforcer = MaskEnforcer(model, {}, ctx.pattern)
    callback.prepare(model, enforcer)  # before the optimizer: the logits are the trained parameters
    train_epochs(model, ctx.train_loader, enforcer=enforcer, epochs=1, device=torch.device("cpu"),
                 limit=ctx.batches, callbacks=[callback],
                 cfg=OptimConfig(optimizer="adamw", lr=1.0, weight_decay=1e-4))
    callback.on_train_end(model, enforcer)
    masks, expected = two_of_four_masks(ctx, model, enforcer.masks)
    return ctx.row(model, masks, started, expected_kept=expected,
                   groups_changed=callback.stage_meta()["gumbel_groups_changed"])


# Rows in the order they run: name -> function(ctx) -> dict. Other methods add theirs here.
ROWS = {"dense": run_dense, "static_magnitude": run_static_magnitude, "dsr": run_dsr, "gradual": run_gradual,
        "magnitude_2of4_oneshot": run_magnitude_2of4, "gumbel_2of4_mask_only": run_gumbel_2of4}
SPARSE_90 = ("static_magnitude", "dsr", "gradual")  # rows that must end at exactly 90% of the eligible weights


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
