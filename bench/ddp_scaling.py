"""Images/s of sparsify's train loop on 1 vs 2 gloo processes (CPU), with block masks enforced.

Each repeat starts `world` processes (torch.multiprocessing, gloo, file rendezvous); each runs
`sparsify.training.loop.train_epochs` on `tiny_resnet` with 50% 8x8 block masks over in-memory images
(DistributedSampler shards, DDP averages gradients). The second of two epochs is timed; the
figure is the sum over ranks of images/s. Every process uses one thread (torchrun's default
OMP_NUM_THREADS=1). Worlds alternate for `--repeats` rounds.

On a 2-core machine this shows that the distributed plumbing works (DDP, sampler, reductions,
identical weights and masks on every rank), not a speed-up: two processes share the same two
cores the single process already uses.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchutil import emit, median, parser, progress, summary  # noqa: E402

NOTE = ("2 CPU cores: two processes share the cores one process already uses, so this checks the "
        "distributed plumbing (DDP, sampler shards, reductions, identical weights/masks), not a speed-up")


def worker(rank: int, world: int, init_file: str, out: str, batch: int, samples: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from sparsify.data.samplers import ResumableDistributedSampler
    from sparsify.training.distributed import mask_digests
    from sparsify.core.masks import MaskEnforcer
    from sparsify.models.build import build_model
    from sparsify.core.block import BlockPattern
    from sparsify.core.prune import PruneSettings, find_layers, prune_round
    from sparsify.core.masks import full_masks
    from sparsify.training.loop import train_epochs
    from sparsify.training.trainer import LoopOptions, OptimConfig

    torch.set_num_threads(1)  # one thread per process, as torchrun sets OMP_NUM_THREADS=1
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model("tiny_resnet", num_classes=10, in_channels=3, weights=None, log=lambda m: None)
    pattern = BlockPattern(8, 8)
    names = [layer.name for layer in find_layers(model, pattern, include_linear=False, exclude=[]) if layer.reason is None]
    weights = dict(model.named_parameters())
    masks, _ = prune_round(weights, full_masks(model, names, pattern),
                           PruneSettings(pattern=pattern, criterion="l1", target=0.5, step=0.5))
    enforcer = MaskEnforcer(model, masks, pattern)
    data = TensorDataset(torch.randn(samples, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 10, (samples,), generator=torch.Generator().manual_seed(2)))
    loader = DataLoader(data, batch_size=batch // world,
                        sampler=ResumableDistributedSampler(data, num_replicas=world, rank=rank, seed=0),
                        generator=torch.Generator().manual_seed(0))
    metrics = train_epochs(model, loader, enforcer=enforcer, cfg=OptimConfig(lr=0.01), epochs=2,
                           device=torch.device("cpu"), options=LoopOptions(log_every=10_000))
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    digest = mask_digests(enforcer.masks)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (checksum, digest))
        same = all(g == gathered[0] for g in gathered)
        dist.destroy_process_group()
    else:
        same = True
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"images_per_s": metrics["images_per_s"], "ranks_agree": same}, f)


def measure(world: int, *, batch: int, samples: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(worker, args=(world, os.path.join(tmp, "init"), out, batch, samples), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    p.add_argument("--samples", type=int, default=512, help="images per epoch")
    args = p.parse_args()
    rates = {1: [], 2: []}
    agree = True
    for repeat in range(args.repeats):
        for world in ((1, 2) if repeat % 2 == 0 else (2, 1)):
            result = measure(world, batch=args.batch, samples=args.samples)
            rates[world].append(result["images_per_s"])
            agree = agree and result["ranks_agree"]
            progress(f"repeat {repeat + 1}: {world} process(es): {result['images_per_s']:.0f} img/s")
    ratio = median(rates[2]) / median(rates[1])
    emit({
        "benchmark": "ddp_scaling",
        "what": f"images/s of train_epochs, tiny_resnet 32x32, global batch {args.batch}, masks on, gloo on CPU",
        "images_per_s_1_process": summary(rates[1], digits=1),
        "images_per_s_2_processes": summary(rates[2], digits=1),
        "ratio_2_over_1": round(ratio, 3),
        "note": NOTE,
        "target": "runs and ranks agree (weights and masks identical on both ranks); no speed target on 2 cores",
        "pass": agree,
        "checks": {"weights_and_masks_identical_on_every_rank": agree},
    })


if __name__ == "__main__":
    main()
