"""Sparse activations (the `activations:` config section): spatial masks after chosen modules.

A site is a module picked by a glob over module names; its output (N, C, H, W) is multiplied by
an (H, W) mask shared by every channel and sample. Kinds: `checkerboard` (q quarters of each
2x2 cell kept: [0::2, 0::2], then [1::2, 1::2], [0::2, 1::2], [1::2, 0::2]), `static` (a random
mask with exactly round(q/4 * H * W) kept positions, fixed by the run's seed) and `dynamic`
(a new random mask of that size every forward). A BatchNorm2d site with `sparse_batchnorm`
normalises only the kept positions (batch statistics and running statistics over those alone)
and outputs 0 elsewhere. With `dense_inference`, evaluation uses no mask and scales the output
by the mask's density. Nothing here enters the state_dict: masks are rebuilt from the config; a
`dynamic` site's random stream travels in the train-state, so a resumed stage draws the same masks.
"""

from __future__ import annotations

import fnmatch
import zlib

import torch
from torch import nn
from torch.nn import functional as F

from sparsify.errors import SparsifyError
from sparsify.training.callbacks import TrainCallback

KINDS = ("checkerboard", "static", "dynamic")


def checkerboard(height: int, width: int, *, quarters: int) -> torch.Tensor:
    """Bool (H, W) mask keeping `quarters` of the four positions of every 2x2 cell."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for index, (row, col) in enumerate([(0, 0), (1, 1), (0, 1), (1, 0)]):
        if index < quarters:
            mask[row::2, col::2] = True
    return mask


def random_position_mask(height: int, width: int, *, quarters: int, generator: torch.Generator) -> torch.Tensor:
    """Bool (H, W) mask with exactly round(quarters/4 * H * W) kept positions at random."""
    total = height * width
    kept = torch.randperm(total, generator=generator)[: round(quarters * total / 4)]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[kept] = True
    return mask.reshape(height, width)


class ActivationSite:
    """The mask of one site and the densities it measured in evaluation."""

    def __init__(self, name: str, *, kind: str, quarters: int, dense_inference: bool, seed: int) -> None:
        if kind not in KINDS:
            raise SparsifyError(f"unknown activations.kind {kind!r}; choose one of: {', '.join(KINDS)}")
        self.name, self.kind, self.quarters, self.dense_inference = name, kind, quarters, dense_inference
        self.seed = seed + zlib.crc32(name.encode())
        self.generator = torch.Generator().manual_seed(self.seed)
        self.fixed: dict[tuple[int, int], torch.Tensor] = {}
        self.nonzero = self.seen = 0
        self.mask_density = None

    def mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The mask for this forward: fixed per size, or fresh for `dynamic`."""
        if self.kind == "dynamic":
            return random_position_mask(height, width, quarters=self.quarters, generator=self.generator).to(device)
        key = (height, width)
        if key not in self.fixed:
            if self.kind == "checkerboard":
                self.fixed[key] = checkerboard(height, width, quarters=self.quarters)
            else:
                fixed_gen = torch.Generator().manual_seed(self.seed + 7919 * height + width)
                self.fixed[key] = random_position_mask(height, width, quarters=self.quarters, generator=fixed_gen)
        return self.fixed[key].to(device)

    def record(self, output: torch.Tensor, mask: torch.Tensor) -> None:
        """Count nonzero outputs (evaluation only: training speed is untouched)."""
        self.nonzero += int(output.detach().ne(0).sum())
        self.seen += output.numel()
        self.mask_density = float(mask.float().mean())

    def summary(self) -> dict:
        measured = self.nonzero / self.seen if self.seen else None
        return {"kind": self.kind, "quarters": self.quarters,
                "mask_density": None if self.mask_density is None else round(self.mask_density, 6),
                "measured_density": None if measured is None else round(measured, 6)}


def masked_output(site: ActivationSite, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """Forward hook body: multiply the output by the site's mask (or scale it at dense inference)."""
    if output.dim() != 4:
        raise SparsifyError(f"activation site {site.name!r} outputs shape {tuple(output.shape)}; sites must "
                            "output (N, C, H, W) feature maps, pick conv, BatchNorm2d or ReLU modules")
    mask = site.mask(output.shape[2], output.shape[3], output.device)
    if not module.training and site.dense_inference:
        result = output * mask.float().mean()
    else:
        result = output * mask.to(output.dtype)
    if not module.training:
        site.record(result, mask)
    return result


def sparse_batchnorm(site: ActivationSite, module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm2d over the kept positions only; dropped positions output 0."""
    mask = site.mask(x.shape[2], x.shape[3], x.device)
    momentum = module.momentum if module.momentum is not None else 0.0
    if module.training and module.track_running_stats:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    use_batch = module.training or not module.track_running_stats
    if not module.training and site.dense_inference:
        full = F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias,
                            False, 0.0, module.eps)
        result = full * mask.float().mean()
    else:
        kept = F.batch_norm(x[:, :, mask], module.running_mean, module.running_var, module.weight,
                            module.bias, use_batch, momentum, module.eps)
        result = x.new_zeros(x.shape)
        result[:, :, mask] = kept
    if not module.training:
        site.record(result, mask)
    return result


def attach_activation_masks_(model: nn.Module, *, sites: list[str], kind: str, quarters: int,
                             sparse_bn: bool, dense_inference: bool, seed: int) -> list[ActivationSite]:
    """Attach a mask after every module whose name matches a glob in `sites`; returns the sites."""
    attached = []
    modules = [(n, m) for n, m in model.named_modules() if n]
    for glob in sites:
        if not any(fnmatch.fnmatchcase(n, glob) for n, _ in modules):
            raise SparsifyError(f"activations.sites glob {glob!r} matches no module; module names look "
                                f"like {modules[min(5, len(modules) - 1)][0]!r}")
    for name, module in modules:
        if not any(fnmatch.fnmatchcase(name, glob) for glob in sites):
            continue
        site = ActivationSite(name, kind=kind, quarters=quarters, dense_inference=dense_inference, seed=seed)
        if sparse_bn and isinstance(module, nn.BatchNorm2d):
            module.forward = lambda x, _s=site, _m=module: sparse_batchnorm(_s, _m, x)
        else:
            module.register_forward_hook(lambda mod, inputs, out, _s=site: masked_output(_s, mod, out))
        attached.append(site)
    return attached


def densities(sites: list[ActivationSite]) -> dict[str, dict]:
    """Per-site densities for checkpoint metadata (`activations`)."""
    return {site.name: site.summary() for site in sites}


class ActivationCallbacks(TrainCallback):
    """Train-stage hooks: attach the config's sites before training, report their densities after."""

    def __init__(self, cfg, *, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.sites: list[ActivationSite] = []

    def prepare(self, model: nn.Module, enforcer=None, **_) -> None:
        c = self.cfg
        self.sites = attach_activation_masks_(model, sites=c.sites, kind=c.kind, quarters=c.quarters,
                                              sparse_bn=c.sparse_batchnorm, dense_inference=c.dense_inference,
                                              seed=self.seed)

    def state_dict(self) -> dict | None:
        """Where each `dynamic` site's mask stream stands (a resumed stage draws the masks it would have)."""
        streams = {site.name: site.generator.get_state() for site in self.sites if site.kind == "dynamic"}
        return streams or None

    def load_state_dict(self, state: dict | None) -> None:
        by_name = {site.name: site for site in self.sites}
        for name, stream in (state or {}).items():
            if name not in by_name:
                raise SparsifyError(f"the train-state has a mask stream for activation site {name!r}, which the "
                                    "config does not attach; remove train-state.safetensors to start the stage over")
            by_name[name].generator.set_state(stream)

    def stage_meta(self) -> dict:
        return {"activations": densities(self.sites)}


def activation_callbacks(cfg, *, seed: int) -> list:
    """[ActivationCallbacks] when `activations.sites` is set, else []."""
    return [ActivationCallbacks(cfg, seed=seed)] if cfg.sites else []
