"""Benchmark: channel permutation search for 2:4 (time and kept-magnitude gain) on three models.

  * torchvision resnet50 and resnet18 with random weights (53 and 20 eligible layers);
  * the built-in `small_resnet` trained for one pass over `--train-images` Fashion-MNIST images
    (SGD, batch 64), so its weights have the structure of a trained model.

Each model: `permute_model_` with the config's default budget `sparsity.permute.max_iterations`
and safety `time_limit`, then the iterations it used, whether the time limit cut it, the
magnitude 2:4 keeps with and without the permutation (the baseline, measured on the same
weights in the same run), the outputs before/after (must agree), and a 2:4 prune round's time
for scale. Target: the whole script (all models, training included) within 60 s, the
permutation never lowers the kept magnitude, and no search is cut by the time limit.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, parser, progress, timed  # noqa: E402

TARGET_TOTAL_S = 60.0


def train_small_resnet(images: int):
    """small_resnet after one pass over the first `images` Fashion-MNIST training images."""
    import torch

    from sparsify.data.images import load_fashion_mnist_split
    from sparsify.models.builtin import small_resnet

    x, y = load_fashion_mnist_split(__import__("pathlib").Path("/usr/share/datasets/fashion-mnist"), "train")
    x, y = x[:images], y[:images]
    torch.manual_seed(0)
    model = small_resnet(num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for start in range(0, len(x), 64):
        loss = torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recalibrate_batchnorm_(model, x)
    model.eval()
    vx, vy = load_fashion_mnist_split(__import__("pathlib").Path("/usr/share/datasets/fashion-mnist"), "val")
    with torch.no_grad():
        acc = float((model(vx[:2000]).argmax(1) == vy[:2000]).float().mean())
    return model, acc, x[:8]


def recalibrate_batchnorm_(model, images) -> None:
    """BatchNorm running statistics as the plain average over `images` (32 steps are too few for momentum)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 256):
            model(images[start:start + 256])


def measure(model, example, *, max_iterations: int, time_limit: float) -> dict:
    """Permute in place; gain, time, equality of outputs, and a 2:4 prune round for scale."""
    import torch

    from sparsify.core.masks import full_masks
    from sparsify.core.elements import NMPattern
    from sparsify.rounds.permute import describe_permutation, permute_model_
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    pattern = NMPattern(2, 4)
    eligible = [layer.name for layer in find_layers(model, pattern, include_linear=True, exclude=[])
                if layer.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.2)
    weights = dict(model.named_parameters())
    prune_s, _ = timed(prune_round, weights, full_masks(model, eligible, pattern), settings)
    with torch.no_grad():
        before = model(example)
    cpu_started = time.process_time()
    seconds, record = timed(permute_model_, model, eligible, n=2, m=4, max_iterations=max_iterations,
                            time_limit=time_limit, example=example)
    cpu_seconds = time.process_time() - cpu_started
    with torch.no_grad():
        after = model(example)
    layers = [v for v in record["layers"].values() if "kept_before" in v]
    kept_before = sum(v["kept_before"] for v in layers)
    kept_after = sum(v["kept_after"] for v in layers)
    searches = [v.get("search") for v in record["layers"].values()]
    return {
        "summary": describe_permutation(record),
        "layers_permuted": f"{record['permuted']}/{record['eligible']}",
        "search_s": round(seconds, 3), "search_cpu_s": round(cpu_seconds, 3),
        "iterations_used": record["iterations"], "max_iterations": max_iterations,
        "cut_by_time_limit": record["cut_by_time_limit"], "time_limit_s": time_limit,
        "kept_magnitude_unpermuted": round(kept_before, 4), "kept_magnitude_permuted": round(kept_after, 4),
        "kept_gain_pct": round(100 * (kept_after / kept_before - 1), 4) if kept_before else None,
        "best_layer_gain_pct": round(100 * max((v["gain"] for v in layers), default=0.0), 4),
        "searches": {s: searches.count(s) for s in set(searches) if s},
        "prune_round_s": round(prune_s, 3),
        "max_output_change": float((after - before).abs().max()),
        "max_output": float(before.abs().max()),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=1)
    p.add_argument("--train-images", type=int, default=2048, help="Fashion-MNIST images for the one training pass")
    p.add_argument("--max-iterations", type=int, default=None, help="search budget per model (default: the config's)")
    p.add_argument("--time-limit", type=float, default=None, help="safety seconds per model (default: the config's)")
    args = p.parse_args()
    started = time.perf_counter()

    import torch
    import torchvision

    from sparsify.config import PermuteConfig

    budget = {"max_iterations": args.max_iterations or PermuteConfig().max_iterations,
              "time_limit": args.time_limit or PermuteConfig().time_limit}
    results = {}
    for arch in ("resnet50", "resnet18"):
        progress(f"{arch} (random weights), {budget['max_iterations']} iterations, "
                 f"time limit {budget['time_limit']} s")
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)().eval()
        results[f"{arch}_random"] = measure(model, torch.randn(1, 3, 64, 64), **budget)
    progress(f"small_resnet: one pass over {args.train_images} Fashion-MNIST images")
    train_s, (small, acc, example) = timed(train_small_resnet, args.train_images)
    results["small_resnet_fmnist"] = measure(small, example, **budget)
    results["small_resnet_fmnist"].update({"train_s": round(train_s, 2), "val_acc_2000": round(acc, 4)})
    total = time.perf_counter() - started
    checks = {name: r["max_output_change"] <= 1e-5 * max(1.0, r["max_output"]) and r["kept_gain_pct"] >= 0
              and not r["cut_by_time_limit"] for name, r in results.items()}
    emit({
        "benchmark": "permutation",
        "target": f"whole script <= {TARGET_TOTAL_S} s with default settings; kept magnitude never lower; "
                  "no search cut by the time limit",
        "total_s": round(total, 2),
        "pass": total <= TARGET_TOTAL_S and all(checks.values()),
        "checks": checks,
        "results": results,
    })


if __name__ == "__main__":
    main()
