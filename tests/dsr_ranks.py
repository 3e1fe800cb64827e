"""Worker of the two-process gloo test in test_dsr.py (a module of its own, so the spawned
processes import only torch and sparsify.methods.dsr)."""

import torch

from sparsify.methods.dsr import broadcast_from_main, reparameterize, step_generator, thin_masks


def rank_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: reparameterize the same weights, then with drifted ones plus the broadcast."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(7)
    weights = {"a": torch.randn(8, 4, 3, 3, generator=gen) * 0.01, "b": torch.randn(16, 8, generator=gen) * 0.01}
    masks = thin_masks(weights, {"a": 60, "b": 30}, seed=7)
    same, _ = reparameterize(weights, masks, threshold=0.01, target=10, tolerance=0.1,
                             generator=step_generator(7, 5))
    if rank == 1:  # a rank whose weights drifted still ends with rank 0's masks and threshold
        weights = {n: w + 0.05 for n, w in weights.items()}
    drifted, report = reparameterize(weights, masks, threshold=0.01, target=10, tolerance=0.1,
                                     generator=step_generator(7, 5))
    synced, threshold = broadcast_from_main(drifted, report.threshold_next, device=torch.device("cpu"))
    flat = torch.cat([same[n].flatten() for n in same] + [synced[n].flatten() for n in synced]).to(torch.uint8)
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    thresholds = [torch.zeros(1, dtype=torch.float64) for _ in range(2)]
    dist.all_gather(thresholds, torch.tensor([threshold], dtype=torch.float64))
    if rank == 0:
        torch.save({"masks": gathered, "thresholds": thresholds}, out)
    dist.destroy_process_group()
