"""Benchmark: every pattern at its natural sparsity on Fashion-MNIST with a small ResNet.

`tiny_resnet` (1 -> 16/32/64 channels) is trained dense from seeded random weights for
`--dense-epochs` epochs, then each row starts from that model, prunes once straight to its
pattern's natural sparsity (`step: 1.0`), and reports top-1 right after the prune and after one
epoch of finetuning with the masks enforced:
  * block 8x8 at 50% (variance, scope layer, keep_rows/keep_cols as by default);
  * unstructured 80% global (l1: one ranking of |w| over all eligible layers);
  * unstructured 80% global, then regroup (clusters 4, growth 1.5, split_rows 32, min_rows 3) with
    our partitioner, and with the contiguous baseline partition (rows cut in their own order);
  * 2:4 (nm, l1) without and with channel permutation (`sparsify.rounds.permute`, when present).
`dense_plus_1` trains the dense model one more epoch: the reference at the same budget.
`--recalibrate-bn N` re-estimates BatchNorm on N training batches right after each prune
(`sparsify.training.bn`, as `sparsity.recalibrate_bn` does in `sparsify prune`) and adds
`acc1_after_bn_recalibration`; the finetuning epoch then starts from the re-estimated statistics.
Eligible: every conv but the 1-channel stem; the Linear head stays dense.

The training set is subsampled: an epoch is `--batches` random batches of 64 (a fresh shuffle of
the 60k images each epoch); accuracy is on the first `--val-batches` x 256 test images. SGD
momentum 0.9, lr 0.05 cosine within each train call, weight decay 5e-4, on the CPU.

`regroup_quality` compares the two partitioners on the same masks (blocks, density before and
after, weights added and removed, connectivity cut, seconds). Checks (the `pass` target): each row
lands exactly on its sparsity (masks and weights), and our partitioner's cut is not above the
baseline's on any layer.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, parser, progress  # noqa: E402

EXCLUDE = ["conv1.weight"]
REGROUP = {"clusters": 4, "growth": 1.5, "split_rows": 32, "min_rows": 3}
PER_LAYER = ("cut", "blocks", "added", "removed")  # per layer in regroup_quality: [ours, baseline]


class Context:
    """Loaders, the trained dense model, and the helpers every row uses."""

    def __init__(self, *, batches: int, val_batches: int, seed: int, recalibrate_bn: int = 0) -> None:
        import torch

        from sparsify.config import DataConfig
        from sparsify.data.datasets import build_loaders

        self.batches, self.val_batches, self.seed, self.recalibrate_bn = batches, val_batches, seed, recalibrate_bn
        self.train_loader, _ = build_loaders(DataConfig(dataset="fashion-mnist", batch_size=64),
                                             input_size=28, num_classes=10, in_channels=1, seed=seed)
        _, self.val_loader = build_loaders(DataConfig(dataset="fashion-mnist", batch_size=256),
                                           input_size=28, num_classes=10, in_channels=1, seed=seed)
        self.device = torch.device("cpu")

    def train(self, model, masks: dict, pattern, *, epochs: int) -> None:
        """Train with `masks` enforced (none: dense)."""
        import torch

        from sparsify.core.masks import MaskEnforcer
        from sparsify.training.loop import train_epochs
        from sparsify.training.trainer import OptimConfig

        torch.manual_seed(self.seed)
        cfg = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
        enforcer = MaskEnforcer(model, masks, pattern)
        train_epochs(model, self.train_loader, enforcer=enforcer, cfg=cfg, epochs=epochs, device=self.device,
                     limit=self.batches)

    def recalibrate(self, model) -> dict:
        """--recalibrate-bn N: BatchNorm re-estimated on N training batches; top-1 and seconds after it."""
        if not self.recalibrate_bn:
            return {}
        import torch

        from sparsify.training.bn import recalibrate_batchnorm_

        torch.manual_seed(self.seed)
        started = time.perf_counter()
        recalibrate_batchnorm_(model, iter(self.train_loader), limit=self.recalibrate_bn, device=self.device)
        seconds = round(time.perf_counter() - started, 2)
        return {"acc1_after_bn_recalibration": self.accuracy(model), "bn_recalibration_seconds": seconds}

    def accuracy(self, model) -> float:
        from sparsify.training.loop import evaluate

        return round(evaluate(model, self.val_loader, device=self.device, limit=self.val_batches)["val_acc1"], 2)


def eligible_layers(model, pattern) -> list[str]:
    from sparsify.core.prune import find_layers

    return [layer.name for layer in find_layers(model, pattern, include_linear=False, exclude=EXCLUDE)
            if layer.reason is None]


def prune_once(model, pattern, *, criterion: str, target: float, scope: str = "layer") -> dict:
    """Masks at the pattern's natural sparsity in one round; the model's pruned weights are zeroed."""
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.prune import PruneSettings, prune_round

    names = eligible_layers(model, pattern)
    settings = PruneSettings(pattern=pattern, criterion=criterion, target=target, step=1.0, scope=scope)
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, names, pattern), settings)
    MaskEnforcer(model, masks, pattern).apply_()
    return masks


def sparsity_of(model, masks: dict, pattern) -> dict:
    """Zeros over the eligible weights, counted on the masks and on the weights."""
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in masks)
    kept = sum(int(pattern.group_sizes(tuple(params[n].shape))[m].sum()) for n, m in masks.items())
    nonzero = sum(int(params[n].count_nonzero()) for n in masks)
    return {"sparsity_masks": round(1 - kept / total, 4), "sparsity_weights": round(1 - nonzero / total, 4)}


def finish_row(ctx: Context, model, masks: dict, pattern, started: float, **extra) -> dict:
    """Accuracy after the prune, then after one finetuning epoch."""
    after_prune = ctx.accuracy(model)
    recalibrated = ctx.recalibrate(model)
    ctx.train(model, masks, pattern, epochs=1)
    return {"acc1_after_prune": after_prune, **recalibrated, "acc1_after_finetune": ctx.accuracy(model),
            **sparsity_of(model, masks, pattern), "seconds": round(time.perf_counter() - started, 1), **extra}


def row_block(ctx: Context, dense) -> dict:
    from sparsify.core.block import BlockPattern

    started, model, pattern = time.perf_counter(), copy.deepcopy(dense), BlockPattern(8, 8)
    masks = prune_once(model, pattern, criterion="variance", target=0.5)
    return finish_row(ctx, model, masks, pattern, started, natural_sparsity=0.5)


def row_global(ctx: Context, dense) -> tuple[dict, object, dict]:
    from sparsify.core.elements import UnstructuredPattern

    started, model, pattern = time.perf_counter(), copy.deepcopy(dense), UnstructuredPattern()
    masks = prune_once(model, pattern, criterion="l1", target=0.8, scope="global")
    pruned = (copy.deepcopy(model), dict(masks))
    return finish_row(ctx, model, masks, pattern, started, natural_sparsity=0.8), pruned


def row_regroup(ctx: Context, pruned, partition) -> tuple[dict, list[dict]]:
    """Regroup the global-80% masks with `partition`, then the same accuracy columns."""
    import torch

    from sparsify.core.masks import MaskEnforcer
    from sparsify.core.elements import UnstructuredPattern
    from sparsify.rounds.regroup import regroup_mask

    started, (model, masks), pattern = time.perf_counter(), copy.deepcopy(pruned), UnstructuredPattern()
    new, stats = {}, []
    for name, mask in masks.items():
        before = mask.reshape(mask.shape[0], -1).numpy()
        t0 = time.perf_counter()
        result = regroup_mask(before, partition=partition, **REGROUP)
        stats.append({"parameter": name, **result.stats(before), "seconds": round(time.perf_counter() - t0, 4)})
        new[name] = torch.from_numpy(result.mask).reshape(mask.shape).clone()
    MaskEnforcer(model, new, pattern).apply_()  # weights regroup adds are 0 until finetuning moves them
    return finish_row(ctx, model, new, pattern, started), stats


def row_nm(ctx: Context, dense, *, permute: bool) -> dict:
    from sparsify.core.elements import NMPattern

    started, model, pattern = time.perf_counter(), copy.deepcopy(dense), NMPattern(2, 4)
    extra = {"natural_sparsity": 0.5}
    if permute:
        import torch

        try:
            from sparsify.rounds.permute import permute_model_
        except ImportError:
            return {"skipped": "sparsify.rounds.permute is not available in this tree"}
        before = ctx.accuracy(model)
        record = permute_model_(model, eligible_layers(model, pattern), n=2, m=4, time_limit=120.0,
                                example=torch.zeros(1, 1, 28, 28), seed=ctx.seed)
        extra.update(permuted=f"{record['permuted']}/{record['eligible']}", permute_seconds=record["seconds"],
                     acc1_change_from_permutation=round(ctx.accuracy(model) - before, 2))
    masks = prune_once(model, pattern, criterion="l1", target=0.5)
    return finish_row(ctx, model, masks, pattern, started, **extra)


def summarize_regroup(ours: list[dict], baseline: list[dict]) -> dict:
    def total(stats, key):
        return sum(s[key] for s in stats)

    def side(stats):
        weights = total(stats, "weights")
        return {"blocks": total(stats, "blocks"),
                "density_before": round(sum(s["density_before"] * s["weights"] for s in stats) / weights, 4),
                "density_after": round(sum(s["density_after"] * s["weights"] for s in stats) / weights, 4),
                "added": total(stats, "added"), "removed": total(stats, "removed"), "cut": total(stats, "cut"),
                "seconds": round(total(stats, "seconds"), 3)}

    return {"hypergraph": side(ours), "contiguous_baseline": side(baseline),
            "per_layer": [{"parameter": a["parameter"], **{k: [a[k], b[k]] for k in PER_LAYER}}
                          for a, b in zip(ours, baseline)]}


def header(args) -> dict:
    return {"benchmark": "patterns_fmnist", "model": "tiny_resnet", "dense_epochs": args.dense_epochs,
            "batches_per_epoch": args.batches, "val_images": min(args.val_batches * 256, 10000),
            "recalibrate_bn": args.recalibrate_bn}


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=1)
    p.add_argument("--dense-epochs", type=int, default=3, help="dense training epochs before pruning")
    p.add_argument("--batches", type=int, default=150, help="batches of 64 per epoch (subsampled)")
    p.add_argument("--val-batches", type=int, default=20, help="test batches of 256 for accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm on N training batches after each prune (0: off)")
    p.add_argument("--only-block", action="store_true", help="the dense rows and block 8x8 only")
    args = p.parse_args()

    import torch

    from sparsify.models.build import build_model
    from sparsify.core.elements import UnstructuredPattern
    from sparsify.rounds.regroup import contiguous_partition, hypergraph_partition

    started = time.perf_counter()
    ctx = Context(batches=args.batches, val_batches=args.val_batches, seed=args.seed,
                  recalibrate_bn=args.recalibrate_bn)
    torch.manual_seed(args.seed)
    dense = build_model("tiny_resnet", num_classes=10, in_channels=1)
    progress(f"dense training: {args.dense_epochs} epochs of {args.batches} batches")
    ctx.train(dense, {}, UnstructuredPattern(), epochs=args.dense_epochs)
    rows = {"dense": {"acc1": ctx.accuracy(dense)}}
    plus = copy.deepcopy(dense)
    ctx.train(plus, {}, UnstructuredPattern(), epochs=1)
    rows["dense_plus_1"] = {"acc1": ctx.accuracy(plus)}
    progress("block 8x8 at 50%")
    rows["block_8x8_50"] = row_block(ctx, dense)
    if args.only_block:
        on_sparsity = rows["block_8x8_50"]["sparsity_masks"] == rows["block_8x8_50"]["sparsity_weights"] == 0.5
        emit({**header(args), "rows": rows, "checks": {"rows_on_their_sparsity": on_sparsity}, "pass": on_sparsity,
              "wall_s": round(time.perf_counter() - started, 1)})
        return
    progress("unstructured 80% global")
    rows["unstructured_80_global"], pruned = row_global(ctx, dense)
    progress("regroup: our partitioner and the contiguous baseline")
    rows["unstructured_80_global_regroup"], ours = row_regroup(ctx, pruned, hypergraph_partition)
    rows["unstructured_80_global_regroup_contiguous"], baseline = row_regroup(ctx, pruned, contiguous_partition)
    progress("2:4 without and with permutation")
    rows["nm_2to4"] = row_nm(ctx, dense, permute=False)
    rows["nm_2to4_permuted"] = row_nm(ctx, dense, permute=True)
    checks = {
        "rows_on_their_sparsity": all(r["sparsity_masks"] == r["sparsity_weights"] == r["natural_sparsity"]
                                      for r in rows.values() if "natural_sparsity" in r),
        "partitioner_cut_not_above_baseline": all(a["cut"] <= b["cut"] for a, b in zip(ours, baseline)),
    }
    emit({**header(args), "rows": rows, "regroup_quality": summarize_regroup(ours, baseline), "checks": checks,
          "target": "each row on its natural sparsity; our partitioner's cut <= the contiguous baseline's",
          "pass": all(checks.values()), "wall_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
