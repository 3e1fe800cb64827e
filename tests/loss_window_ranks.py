"""A tiny deterministic train run whose every step's loss is recorded next to metrics.csv.

Run in-process by tests/test_metrics_rows.py, and as a script under torch.distributed.run (gloo,
2 processes) for the rows summed over ranks and an epoch resumed part-way: `python loss_window_ranks.py OUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsify.data.samplers import ResumableDistributedSampler
from sparsify.training.distributed import current_info
from sparsify.core.masks import MaskEnforcer
from sparsify.core.block import BlockPattern
from sparsify.training.loop import train_epochs
from sparsify.training.trainer import LoopOptions, OptimConfig, Trainer
from sparsify.training.log import TrainLog

SAMPLES, BATCH = 44, 4  # 11 batches in one process, 6 (the last one short) in each of two


def recorded_steps(steps: list) -> None:
    """Make Trainer.step append (step loss, batch size) of this rank to `steps`."""
    original = Trainer.step

    def step(self, images, target, *, lr):
        out = original(self, images, target, lr=lr)
        steps.append((float(out[0]), len(target)))
        return out

    Trainer.step = step


def tiny_run(csv_path: Path, *, epochs: int = 3, save_state=None, resume=None, log_every: int = 3) -> dict:
    """Three epochs of a small masked CNN on fixed random data, a metrics row every `log_every` steps; the last
    epoch's metrics."""
    info = current_info()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4))
    enforcer = MaskEnforcer(model, {"0.weight": torch.tensor([[True]])}, BlockPattern(8, 8))
    data = TensorDataset(torch.randn(SAMPLES, 3, 6, 6, generator=torch.Generator().manual_seed(1)),
                         torch.randint(0, 4, (SAMPLES,), generator=torch.Generator().manual_seed(2)))
    sampler = ResumableDistributedSampler(data, num_replicas=info.world_size, rank=info.rank, seed=0)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, generator=torch.Generator().manual_seed(0))
    log = TrainLog(csv_path=csv_path, round_=1, start="s")
    options = LoopOptions(log_every=log_every, save_every_steps=4 if save_state else None)
    return train_epochs(model, loader, enforcer=enforcer, cfg=OptimConfig(lr=0.1), epochs=epochs,
                        device=torch.device("cpu"), options=options, train_log=log, save_state=save_state,
                        resume=resume)


def main(out: Path) -> None:
    import torch.distributed as dist

    from conftest import resume_from, saver_at

    dist.init_process_group("gloo")
    steps: list = []
    recorded_steps(steps)
    whole = tiny_run(out / "metrics.csv")
    (out / f"steps-{dist.get_rank()}.json").write_text(json.dumps(steps))
    state = out / "train-state.safetensors"
    tiny_run(out / "first.csv", save_state=saver_at(state, 16, epochs=3))  # mid-window, mid-way through epoch 3
    dist.barrier()
    resumed = tiny_run(out / "resumed.csv", resume=resume_from(state))
    if dist.get_rank() == 0:
        (out / "last-epoch.json").write_text(json.dumps({"whole": whole, "resumed": resumed}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
