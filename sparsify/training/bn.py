"""BatchNorm re-estimation: fresh running statistics for a model whose weights just changed (a prune).

Only the BatchNorm modules run in train mode; every other module stays in eval mode, so dropout
is off and heads such as inception's auxiliary classifier are not taken. Each BatchNorm's running
averages are reset and made cumulative (momentum None), so after `n` batches

    running_mean = (1/n) * sum_b mean_b        running_var = (1/n) * sum_b var_b

where mean_b and var_b (unbiased) are batch b's per-channel statistics: the plain average of the
per-batch statistics, as torch defines momentum None (not the pooled variance of all images).
No gradients are taken, and only the BatchNorm buffers (running_mean, running_var,
num_batches_tracked) change; each module's momentum and every module's mode are restored.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm modules that keep running statistics (track_running_stats True)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]


def recalibrate_batchnorm_(model: nn.Module, batches: Iterable, *, limit: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running statistics over the first `limit` (images, target) batches.

    Returns the number of batches seen. With no BatchNorm or `limit` 0 nothing runs (0); a loader
    that yields no batch leaves the statistics as they were.
    """
    layers = [module for _, module in batchnorm_layers(model)]
    if not layers or limit <= 0:
        return 0
    saved = {id(m): (m.momentum, [b.detach().clone() for b in running_buffers(m)]) for m in layers}
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for module in layers:
        module.reset_running_stats()
        module.momentum = None
        module.train()
    seen = 0
    try:
        with torch.no_grad():
            for images, _ in itertools.islice(batches, limit):
                model(images.to(device))
                seen += 1
    finally:
        for module in layers:
            momentum, buffers = saved[id(module)]
            module.momentum = momentum
            if seen == 0:
                for buffer, old in zip(running_buffers(module), buffers):
                    buffer.copy_(old)
        for module, training in modes.items():
            module.training = training
    return seen


def running_buffers(module: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    return [module.running_mean, module.running_var, module.num_batches_tracked]
