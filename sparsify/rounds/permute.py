"""Channel permutation before n:m pruning (Pool & Yu 2021): reorder input channels to keep more magnitude.

One permutation per channel set (`channels.py`), applied to the producers' output channels,
everything in between and the consumers' input channels, leaves the network's function unchanged.
Sets the tracer could not follow are left alone, and their layers are reported with the reason.
The search itself is in `permsearch.py`. Its budget, `max_iterations`, is split between the sets
in order of search cost, cheapest first: each set gets an equal share of the iterations left, and
what a set does not use (it converged) goes to the later, larger ones. The result depends on the
seed and the budget only. `time_limit` is a safety; when it stops a search,
the record says so (`cut_by_time_limit`), because that order depends on the machine.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from sparsify.graph.channels import ChannelSet, trace_channel_sets
from sparsify.rounds.permsearch import kept_magnitude, search_permutation

DEFAULT_MAX_ITERATIONS = 2000  # sparsity.permute.max_iterations (config.py); the bench measures it

_NO_ORDER = {"time limit": "no better order found before sparsity.permute.time_limit",
             "no budget": "no iteration of sparsity.permute.max_iterations was left for this set",
             "nothing to gain": "n:m pruning already keeps all of its magnitude"}


def permute_model_(model: nn.Module, eligible: list[str], *, n: int, m: int, example: torch.Tensor,
                   max_iterations: int = DEFAULT_MAX_ITERATIONS, time_limit: float | None = None,
                   seed: int = 0) -> dict:
    """Search and apply input-channel permutations in place; returns the record for the checkpoint.

    `time_limit` (seconds, None: none) counts from the end of the tracing, and is shared like the budget."""
    started = time.perf_counter()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layers = {name: {"permuted": False, "reason": ""} for name in eligible}
    sets = searchable_sets(model, example, layers)
    used, cut = search_sets_(sets, tensors, layers, n=n, m=m, max_iterations=max_iterations, time_limit=time_limit,
                             seed=seed)
    return {"permuted": sum(entry["permuted"] for entry in layers.values()), "eligible": len(eligible),
            "iterations": used, "max_iterations": max_iterations, "cut_by_time_limit": cut,
            "seconds": round(time.perf_counter() - started, 3), "time_limit": time_limit, "layers": layers}


def searchable_sets(model: nn.Module, example: torch.Tensor, layers: dict) -> list[tuple[int, ChannelSet]]:
    """(trace index, set) of the sets that may move and feed an eligible layer; the others' layers get a reason."""
    try:
        sets = trace_channel_sets(model, example)
    except Exception as exc:  # fx raises many error types for code it cannot trace
        reason = f"the model cannot be traced by torch.fx ({str(exc).splitlines()[0][:120]})"
        for entry in layers.values():
            entry["reason"] = reason
        return []
    for s in sets:
        for name in s.consumers:
            if name in layers and s.problem:
                layers[name]["reason"] = f"its input channels cannot move: {s.problem}"
    return [(index, s) for index, s in enumerate(sets) if not s.problem and any(c in layers for c in s.consumers)]


def search_sets_(sets: list[tuple[int, ChannelSet]], tensors: dict, layers: dict, *, n: int, m: int,
                 max_iterations: int, time_limit: float | None, seed: int) -> tuple[int, bool]:
    """Search every set, cheapest first, each with an equal share of the iterations (and seconds) left;
    returns the iterations used and whether the time limit cut a search."""
    costs = {index: search_cost(s, tensors, m) for index, s in sets}
    ordered = sorted(sets, key=lambda item: (costs[item[0]], item[0]))
    left, cut, started = max_iterations, False, time.perf_counter()
    for position, (index, s) in enumerate(ordered):
        sets_left = len(ordered) - position
        seconds = math.inf if time_limit is None else (time_limit - (time.perf_counter() - started)) / sets_left
        used, status = permute_set_(s, tensors, layers, n=n, m=m, iterations=left // sets_left,
                                    seconds=max(seconds, 0.0), seed=seed + index)
        left -= used
        cut = cut or status == "time limit"
    return max_iterations - left, cut


def search_cost(s: ChannelSet, tensors: dict, m: int) -> int:
    """Magnitudes a sweep over the set's stripe pairs gathers, up to a constant: rows x stripes^2."""
    rows = sum(tensors[c].numel() // s.size for c in s.consumers)
    stripes = s.size // m
    return rows * stripes * stripes


def consumer_rows(weight: torch.Tensor) -> torch.Tensor:
    """(COUT * kh * kw, CIN) magnitudes: one row per output channel and kernel tap."""
    return weight.detach().abs().movedim(1, -1).reshape(-1, weight.shape[1]).float()


@torch.no_grad()
def permute_set_(s: ChannelSet, tensors: dict, layers: dict, *, n: int, m: int, iterations: int,
                 seconds: float, seed: int) -> tuple[int, str]:
    """Search one set's permutation on its eligible consumers' weights and apply it to every tensor;
    returns the iterations used and how the search ended."""
    names = [c for c in s.consumers if c in layers]
    rows = [consumer_rows(tensors[c]) for c in names]
    perm, status, used = search_permutation(torch.cat(rows), n=n, m=m, iterations=iterations, seconds=seconds,
                                            seed=seed)
    identity = torch.equal(perm, torch.arange(s.size))
    for name, r in zip(names, rows):
        before, after = kept_magnitude(r, n=n, m=m), kept_magnitude(r[:, perm], n=n, m=m)
        layers[name].update({"kept_before": round(before, 4), "kept_after": round(after, 4),
                             "gain": round(after / before - 1, 6) if before else 0.0,
                             "siblings": len(s.consumers) - 1, "search": status, "iterations": used})
        layers[name]["permuted"] = not identity
        layers[name]["reason"] = "" if not identity else _NO_ORDER.get(status, "the search found no better order")
    if not identity:
        apply_permutation_(s, tensors, perm)
    return used, status


@torch.no_grad()
def apply_permutation_(s: ChannelSet, tensors: dict, perm: torch.Tensor) -> None:
    """New channel i is old channel perm[i]: producers, the ops between, and the consumers' inputs."""
    for name, dim in s.moves:
        tensors[name].copy_(tensors[name].index_select(dim, perm))
    for name in s.consumers:
        tensors[name].copy_(tensors[name].index_select(1, perm))


def permute_before_prune_(model: nn.Module, meta: dict, *, pattern, eligible: list[str], max_iterations: int,
                          time_limit: float | None, seed: int) -> dict:
    """The prune stage's permutation step; returns {"permutation": record} for the checkpoint metadata."""
    example = torch.randn(1, meta["in_channels"], meta["input_size"], meta["input_size"],
                          generator=torch.Generator().manual_seed(seed))
    record = permute_model_(model, eligible, n=pattern.n, m=pattern.m, max_iterations=max_iterations,
                            time_limit=time_limit, example=example, seed=seed)
    return {"permutation": record}


def describe_permutation(record: dict) -> str:
    """'12/20 layers permuted, kept magnitude +0.8% (1200/6000 iterations, 3.1 s)' for messages and reports,
    with a warning when the time limit cut the search."""
    layers = [v for v in record["layers"].values() if "kept_before" in v]
    before = sum(v["kept_before"] for v in layers)
    after = sum(v["kept_after"] for v in layers)
    gain = f", kept magnitude {100 * (after / before - 1):+.2f}%" if before else ""
    budget = f"{record['iterations']}/{record['max_iterations']} iterations, " if "max_iterations" in record else ""
    text = f"{record['permuted']}/{record['eligible']} layers permuted{gain} ({budget}{record['seconds']:.1f} s)"
    if record.get("cut_by_time_limit"):
        text += (f"; CUT by time_limit ({record['time_limit']:g} s): these masks depend on this machine's speed "
                 "and will not repeat elsewhere; raise sparsity.permute.time_limit or lower max_iterations")
    return text
