"""torch.distributed plumbing: process group from torchrun's environment, samplers, reductions.

`torchrun --nproc_per_node N -m sparsify train -c X` (and multi-node rendezvous flags) set
WORLD_SIZE, RANK and LOCAL_RANK; `setup_distributed` reads them and joins the group (nccl on
CUDA, gloo on CPU). Without them everything here is a no-op for a single process, so the
same code path trains on one CPU and on many GPUs. `launch` is what `--nproc N` runs: the
launcher of torch.distributed itself (`torch.distributed.run`), not a spawner of our own.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sparsify.errors import MaskDivergenceError, SparsifyError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (single process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SparsifyError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start the job with torchrun") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def current_info() -> DistInfo:
    """DistInfo of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparsifyError(f"device {name!r} was asked for but CUDA is not available; use device: cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise SparsifyError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not (torch.backends.mps.is_available()):
        raise SparsifyError("device 'mps' was asked for but Apple's Metal backend is not available here; "
                            "use device: cpu or auto")
    return torch.device(name)


def pick_device(name: str, info: DistInfo) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK under torchrun on GPUs, else the configured one."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:  # set_device needs an index: this rank's GPU
        device = torch.device("cuda", info.local_rank if info.active else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@contextmanager
def distributed_session(device_name: str) -> Iterator[tuple[DistInfo, torch.device]]:
    """Join torchrun's process group for the duration of a command (no-op for one process)."""
    info = env_dist_info()
    if not info.active or dist.is_initialized():
        yield (current_info() if info.active else info), pick_device(device_name, info)
        return
    device = pick_device(device_name, info)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        yield info, device
        barrier()  # every rank waits for rank 0 to finish writing
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum each value over all ranks (float64, so counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (a one-element list for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def main_holds(lock) -> Iterator[None]:
    """Rank 0 holds the context manager `lock` (the run lock); the other ranks wait for it."""
    if current_info().is_main:
        with lock:
            barrier()
            yield
    else:
        barrier()
        yield


def run_on_main(func: Callable, *args, **kwargs):
    """Run `func` on rank 0 only and hand its result (or its SparsifyError) to every rank."""
    info = current_info()
    if not info.active:
        return func(*args, **kwargs)
    box: list = [None]
    if info.is_main:
        try:
            box[0] = ("ok", func(*args, **kwargs))
        except SparsifyError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


# ---------------------------------------------------------------- masks on every rank


def mask_digests(masks: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(name, sha256 of shape + bits) of every mask, sorted by name."""
    digests = []
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", torch.bool).contiguous()
        h = hashlib.sha256(str(tuple(mask.shape)).encode())
        h.update(mask.numpy().tobytes())
        digests.append((name, h.hexdigest()))
    return digests


def first_divergence(per_rank: list[list[tuple[str, str]]]) -> str | None:
    """The first layer whose mask differs between ranks, as a message (None when all agree)."""
    reference = dict(per_rank[0])
    for rank, digests in enumerate(per_rank[1:], start=1):
        other = dict(digests)
        for name in sorted(set(reference) | set(other)):
            if reference.get(name) != other.get(name):
                where = "is missing on one of them" if name not in reference or name not in other else "differs"
                return f"the mask of {name} {where} between rank 0 and rank {rank}"
    return None


def check_masks_agree(masks: dict[str, torch.Tensor]) -> None:
    """All-gather a hash of every mask; MaskDivergenceError naming the first differing layer."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mask_digests(masks))
    problem = first_divergence(per_rank)
    if problem:
        raise MaskDivergenceError(f"{problem}; masks must be identical on every rank "
                                  "(prune once, load the same checkpoint everywhere)")


# ---------------------------------------------------------------- samplers


# ---------------------------------------------------------------- the launcher


def launch(argv: list[str], *, nproc: int) -> None:
    """Run `python -m sparsify <argv>` in `nproc` local processes through torch.distributed.run."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if env_dist_info().active:
        raise SparsifyError("--nproc was given inside a torchrun job; drop --nproc or call sparsify without torchrun")
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "sparsify", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        failed = len(exc.failures)
        raise SparsifyError(f"{failed} of {nproc} processes failed (their errors are above); fix that and rerun "
                            "the same command, it resumes from the last train-state") from None
