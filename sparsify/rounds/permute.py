"""Channel permutation before n:m pruning (Pool & Yu 2021): reorder input channels to keep more magnitude.

One permutation per channel set (`channels.py`), applied to the producers' output channels,
everything in between and the consumers' input channels, leaves the network's function unchanged.
Sets the tracer could not follow are left alone, and their layers are reported with the reason.
The search itself is in `permsearch.py`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sparsify.rounds.channels import ChannelSet, trace_channel_sets
from sparsify.rounds.permsearch import kept_magnitude, search_permutation

_NO_ORDER = {"no time": "no time was left of sparsity.permute.time_limit",
             "time limit": "no better order found before the time limit",
             "nothing to gain": "n:m pruning already keeps all of its magnitude"}


def permute_model_(model: nn.Module, eligible: list[str], *, n: int, m: int, time_limit: float,
                   example: torch.Tensor, seed: int = 0) -> dict:
    """Search and apply input-channel permutations in place; returns the record for the checkpoint."""
    started = time.perf_counter()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    layers = {name: {"permuted": False, "reason": ""} for name in eligible}
    try:
        sets = trace_channel_sets(model, example)
    except Exception as exc:  # fx raises many error types for code it cannot trace
        reason = f"the model cannot be traced by torch.fx ({str(exc).splitlines()[0][:120]})"
        sets = []
        for entry in layers.values():
            entry["reason"] = reason
    searchable = [s for s in sets if not s.problem and any(c in layers for c in s.consumers)]
    for s in sets:
        for name in s.consumers:
            if name in layers and s.problem:
                layers[name]["reason"] = f"its input channels cannot move: {s.problem}"
    costs = [search_cost(s, tensors, m) for s in searchable]
    for index, s in enumerate(searchable):
        left = time_limit - (time.perf_counter() - started)
        share = left * costs[index] / max(sum(costs[index:]), 1e-12)
        permute_set_(s, tensors, layers, n=n, m=m, seconds=max(share, 0.0), seed=seed + index)
    permuted = sum(entry["permuted"] for entry in layers.values())
    return {"permuted": permuted, "eligible": len(eligible), "seconds": round(time.perf_counter() - started, 3),
            "time_limit": time_limit, "layers": layers}


def search_cost(s: ChannelSet, tensors: dict, m: int) -> float:
    rows = sum(tensors[c].numel() // s.size for c in s.consumers)
    stripes = s.size // m
    return float(rows * stripes * stripes)


def consumer_rows(weight: torch.Tensor) -> torch.Tensor:
    """(COUT * kh * kw, CIN) magnitudes: one row per output channel and kernel tap."""
    return weight.detach().abs().movedim(1, -1).reshape(-1, weight.shape[1]).float()


@torch.no_grad()
def permute_set_(s: ChannelSet, tensors: dict, layers: dict, *, n: int, m: int, seconds: float, seed: int) -> None:
    """Search one set's permutation on its eligible consumers' weights and apply it to every tensor."""
    names = [c for c in s.consumers if c in layers]
    rows = [consumer_rows(tensors[c]) for c in names]
    perm, status = search_permutation(torch.cat(rows), n=n, m=m, seconds=seconds, seed=seed)
    identity = torch.equal(perm, torch.arange(s.size))
    for name, r in zip(names, rows):
        before, after = kept_magnitude(r, n=n, m=m), kept_magnitude(r[:, perm], n=n, m=m)
        layers[name].update({"kept_before": round(before, 4), "kept_after": round(after, 4),
                             "gain": round(after / before - 1, 6) if before else 0.0,
                             "siblings": len(s.consumers) - 1, "search": status})
        layers[name]["permuted"] = not identity
        layers[name]["reason"] = "" if not identity else _NO_ORDER.get(status, "the search found no better order")
    if not identity:
        apply_permutation_(s, tensors, perm)


@torch.no_grad()
def apply_permutation_(s: ChannelSet, tensors: dict, perm: torch.Tensor) -> None:
    """New channel i is old channel perm[i]: producers, the ops between, and the consumers' inputs."""
    for name, dim in s.moves:
        tensors[name].copy_(tensors[name].index_select(dim, perm))
    for name in s.consumers:
        tensors[name].copy_(tensors[name].index_select(1, perm))


def permute_before_prune_(model: nn.Module, meta: dict, *, pattern, eligible: list[str], time_limit: float,
                          seed: int) -> dict:
    """The prune stage's permutation step; returns {"permutation": record} for the checkpoint metadata."""
    example = torch.randn(1, meta["in_channels"], meta["input_size"], meta["input_size"],
                          generator=torch.Generator().manual_seed(seed))
    record = permute_model_(model, eligible, n=pattern.n, m=pattern.m, time_limit=time_limit, example=example,
                            seed=seed)
    return {"permutation": record}


def describe_permutation(record: dict) -> str:
    """'12/20 layers permuted, kept magnitude +0.8%' for messages and reports."""
    layers = [v for v in record["layers"].values() if "kept_before" in v]
    before = sum(v["kept_before"] for v in layers)
    after = sum(v["kept_after"] for v in layers)
    gain = f", kept magnitude {100 * (after / before - 1):+.2f}%" if before else ""
    return f"{record['permuted']}/{record['eligible']} layers permuted{gain} ({record['seconds']:.1f} s)"
