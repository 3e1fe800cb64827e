"""torch.distributed plumbing: process group from torchrun's environment, samplers, reductions.

`torchrun --nproc_per_node N -m sparsify train -c X` (and multi-node rendezvous flags) set
WORLD_SIZE, RANK and LOCAL_RANK; `setup_distributed` reads them and joins the group (nccl on
CUDA, gloo on CPU). Without them everything here is a no-op for a single process, so the
same code path trains on one CPU and on many GPUs. `launch` is what `--nproc N` runs: the
launcher of torch.distributed itself (`torch.distributed.run`), not a spawner of our own.

Wherever ranks wait for each other around work that can fail (rank 0 taking the run lock,
downloading, pruning, writing; every rank loading the checkpoint), the failure is handed to every
rank as a status (`run_on_main`, `fails_together`), so all of them stop with the same message
instead of waiting in a collective for a rank that has stopped.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pickle
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sparsify.errors import MaskDivergenceError, SparsifyError
from sparsify.training.parent import LAUNCHER_PID, end_with_parent

LEAVE_TIMEOUT_S = 30  # at exit after a failure on every rank: how long a rank waits for the others
_EVERY_RANK = "sparsify_raised_on_every_rank"
_control = None  # the gloo group of statuses (None: the default group, e.g. one the caller set up)


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
    """Join torchrun's process group for the duration of a command (no-op for one process).

    Beside the job's group (nccl on CUDA, gloo on CPU) a gloo group carries the statuses ranks
    wait on (`run_on_main`, `fails_together`): CPU objects, and torch's gloo timeout (30 min)
    rather than nccl's shorter one while rank 0 prunes or downloads.
    """
    global _control
    info = env_dist_info()
    if not info.active or dist.is_initialized():
        yield (current_info() if info.active else info), pick_device(device_name, info)
        return
    end_with_parent()
    device = pick_device(device_name, info)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    _control = dist.new_group(backend="gloo")
    try:
        yield info, device
        barrier()  # every rank waits for rank 0 to finish writing
    except BaseException as exc:
        if getattr(exc, _EVERY_RANK, False):  # every rank raises it: leave once each has printed it
            atexit.register(leave_together)
            raise
        close_session()
        raise
    close_session()


def close_session() -> None:
    global _control
    _control = None
    dist.destroy_process_group()


def leave_together() -> None:
    """At exit, after a failure every rank raised (and printed): wait for the others, then close.

    torchrun stops every process as soon as one exits with an error, so a rank that exited first
    could cut off the message of another one still printing it.
    """
    try:
        dist.monitored_barrier(group=_control, timeout=timedelta(seconds=LEAVE_TIMEOUT_S))
    except Exception:  # a rank that is gone already: nothing left to wait for
        pass
    close_session()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        with peers_lost_as_error():
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
    """Rank 0 holds the context manager `lock` (the run lock) while every rank runs the block.

    When taking it fails (the run is locked, the folder is missing, ...), every rank raises that error.
    """
    with ExitStack() as stack:
        run_on_main(stack.enter_context, lock)
        yield


def run_on_main(func: Callable, *args, **kwargs):
    """Run `func` on rank 0 only and hand its result, or its exception, to every rank.

    Rank 0 raises its own exception; the others raise it too (a SparsifyError as itself, any other
    exception as a SparsifyError reading like the last line of rank 0's traceback, an interrupt
    as KeyboardInterrupt), so no rank goes on waiting for a rank 0 that has stopped.
    """
    info = current_info()
    if not info.active:
        return func(*args, **kwargs)
    box: list = [None]
    mine = result = None
    if info.is_main:
        try:
            result = func(*args, **kwargs)
            box[0] = ("ok", pickle.dumps(result))  # pickled here: a result that cannot travel is rank 0's error
        except BaseException as exc:
            mine, box[0] = exc, failure_of(exc)
    with own_failure_first(mine):
        dist.broadcast_object_list(box, src=0, group=_control)
    status = box[0]
    if status[0] == "ok":
        return result if info.is_main else pickle.loads(status[1])
    raise on_every_rank(rebuild_failure(status)) from None


@contextmanager
def fails_together() -> Iterator[None]:
    """Every rank runs the block; when it raises on any rank, it raises on every rank.

    A rank whose block failed raises its own exception; the others raise that of the lowest failing
    rank. The block must not wait for the other ranks itself (no collective inside): a rank that
    failed before it would never reach it.
    """
    if not current_info().active:
        yield
        return
    mine = None
    try:
        yield
    except BaseException as exc:
        mine = exc
    per_rank: list = [None] * dist.get_world_size(group=_control)
    with own_failure_first(mine):
        dist.all_gather_object(per_rank, None if mine is None else failure_of(mine), group=_control)
    failed = [status for status in per_rank if status is not None]
    if failed:
        raise on_every_rank(rebuild_failure(failed[0])) from None


@contextmanager
def own_failure_first(mine: BaseException | None) -> Iterator[None]:
    """Around the collective that hands a rank's failure (`mine`, None when it has none) to the others:
    a rank that failed raises its own exception, marked as raised on every rank, once the collective is
    done, and also when the peers are lost during it (rather than the lost-peers error)."""
    try:
        with peers_lost_as_error():
            yield
    except SparsifyError:
        if mine is not None:
            raise mine from None
        raise
    if mine is not None:
        raise on_every_rank(mine)


def run_on_every_rank(func: Callable, *args, **kwargs):
    """`func(*args, **kwargs)` on every rank; when it raises on one, it raises on all (`fails_together`)."""
    with fails_together():
        return func(*args, **kwargs)


# ---------------------------------------------------------------- failures handed between ranks


def exception_line(exc: BaseException) -> str:
    """What Python prints as the end of the traceback of `exc`: 'ValueError: message'."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def failure_of(exc: BaseException) -> tuple:
    """`exc` as a status another rank can raise again (plain values: it crosses a process group)."""
    if isinstance(exc, KeyboardInterrupt):
        return ("interrupt",)
    if isinstance(exc, SystemExit):
        return ("exit", exc.code if exc.code is None or isinstance(exc.code, int) else str(exc.code))
    if isinstance(exc, SparsifyError):
        try:
            payload = pickle.dumps(exc)
        except Exception:  # an error class with unpicklable attributes travels as its message
            payload = None
        return ("error", str(exc), int(exc.exit_code), payload)
    return ("error", exception_line(exc), 1, None)


def rebuild_failure(status: tuple) -> BaseException:
    """The exception a rank raises for another rank's `failure_of` status."""
    kind = status[0]
    if kind == "interrupt":
        return KeyboardInterrupt()
    if kind == "exit":
        return SystemExit(status[1])
    _, message, exit_code, payload = status
    if payload is not None:
        try:
            return pickle.loads(payload)
        except Exception:  # e.g. a class whose __init__ wants more than the message
            pass
    error = SparsifyError(message)
    error.exit_code = exit_code
    return error


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark `exc` as raised on every rank, so the session closes only once each rank has printed it."""
    try:
        setattr(exc, _EVERY_RANK, True)
    except AttributeError:  # an exception type without attributes is left unmarked
        pass
    return exc


@contextmanager
def peers_lost_as_error() -> Iterator[None]:
    """A collective that fails because another process stopped (or timed out) as one line."""
    try:
        yield
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparsifyError(f"another process of this job stopped while this one waited for it ({first}); "
                            "its own error is above or in its log") from None


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


def launch(argv: list[str], *, nproc: int, quiet: bool = True) -> None:
    """Run `python -m sparsify <argv>` in `nproc` local processes through torch.distributed.run.

    Each process gets OMP_NUM_THREADS = max(1, (usable CPUs - 1) // nproc), the `auto` rule shared out, unless
    it is set (torch.distributed.run would set 1 and warn); `quiet` keeps the launcher's own log lines (a
    rank's exit code, the SIGTERMs it sends to the others) off stderr, since every failing rank has said why
    and the last line sums it up.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from sparsify.threads import usable_cpus

    if env_dist_info().active:
        raise SparsifyError("--nproc was given inside a torchrun job; drop --nproc or call sparsify without torchrun")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (usable_cpus() - 1) // nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # each rank ends with this process, even one killed with SIGKILL
    if quiet:
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    args = parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "sparsify", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        failed = len(exc.failures)
        raise SparsifyError(f"{failed} of {nproc} processes failed (their errors are above); fix that and rerun "
                            "the same command, it resumes from the last train-state") from None
