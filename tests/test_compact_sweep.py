"""Pattern channel and compaction over every torchvision classification model (slow).

For each model (random weights, eval mode, the smallest input it takes): the channel graph picks
the layers pattern channel may prune (`channel_groups`; the others are skipped with a reason); half
the output channels of each of those layers are pruned (the same indices in producers tied through
residual adds, the BatchNorm after each zeroed as the pattern does), then `compact_model` removes
what it can and checks the outputs against the masked model (within 1e-4). The sweep records per
model: outputs match, the share of multiply-adds and parameters left, and every reason a layer was
skipped or a zero channel kept. It writes `compact_sweep.json` in its tmp dir, prints the table and
fails with the models that raised. SPARSIFY_SWEEP="regnet_*,mnasnet*" limits it to some models.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn

from sparsify.core.channel import ChannelPattern
from sparsify.core.masks import MaskEnforcer
from sparsify.graph.channels import is_producer
from sparsify.graph.compact import compact_model
from sparsify.rounds.channelgroups import channel_groups
from sparsify.stages.costs import layer_costs

SMALLEST_INPUT = {"alexnet": 64, "inception_v3": 299, "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224,
                  "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224, "swin_t": 64, "swin_s": 64, "swin_b": 64,
                  "swin_v2_t": 64, "swin_v2_s": 64, "swin_v2_b": 64}
DEFAULT_INPUT = 64


def prune_half_the_channels(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Zero the first half of the output channels of every layer the channel graph lets pattern channel
    prune (and the BatchNorm after it); returns the skipped layers with the reason."""
    names = [f"{n}.weight" for n, m in model.named_modules() if is_producer(m) and m.weight.shape[0] >= 2]
    groups = channel_groups(model, example, names)
    params = dict(model.named_parameters())
    masks = {}
    for name in names:
        if name in groups.skipped:
            continue
        mask = torch.ones(params[name].shape[0], 1, dtype=torch.bool)
        mask[: params[name].shape[0] // 2] = False
        masks[name] = mask
    MaskEnforcer(model, masks, ChannelPattern()).apply_()
    return groups.skipped


def compact_one(arch: str) -> dict:
    """One model's row of the sweep."""
    size = SMALLEST_INPUT.get(arch, DEFAULT_INPUT)
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        skipped = prune_half_the_channels(model, example)
    except Exception as exc:
        return {"arch": arch, "status": "error", "error": f"pruning: {type(exc).__name__}: {exc}"[:300]}
    macs = sum(r["macs"] for r in layer_costs(model, example))
    params = sum(p.numel() for p in model.parameters())
    try:
        result = compact_model(model, example)  # raises ValueError when outputs differ
    except Exception as exc:
        return {"arch": arch, "status": "error", "error": f"compaction: {type(exc).__name__}: {exc}"[:300]}
    left = sum(r["macs"] for r in layer_costs(result.model, example))
    reasons = Counter(why for why in skipped.values())
    reasons.update(plan.reason for plan in result.sets if plan.kept_zero)
    return {"arch": arch, "status": "outputs match", "input": size, "layers_skipped": len(skipped),
            "removed_channels": result.removed, "macs_left": round(left / macs, 4),
            "params_left": round(sum(p.numel() for p in result.model.parameters()) / params, 4),
            "reasons": dict(reasons.most_common())}


def sweep_models() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    chosen = os.environ.get("SPARSIFY_SWEEP")
    if chosen:
        globs = [g.strip() for g in chosen.split(",") if g.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
    return names


def test_a_model_compacts_or_names_its_reasons():
    """The fast check of the sweep's row on two contrasting models."""
    row = compact_one("resnet18")
    assert row["status"] == "outputs match" and row["macs_left"] < 0.35 and row["layers_skipped"] == 1
    assert list(row["reasons"]) == ["its channels cannot be followed: it is (part of) the model output"]
    row = compact_one("squeezenet1_0")  # concats: the expand layers are left alone, with the reason
    assert row["status"] == "outputs match" and any("cat" in why for why in row["reasons"])


@pytest.mark.slow
def test_every_torchvision_model_compacts_or_says_why(tmp_path):
    rows = []
    for arch in sweep_models():
        rows.append(compact_one(arch))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
    (tmp_path / "compact_sweep.json").write_text(json.dumps(rows, indent=1))
    failed = [f"{r['arch']}: {r['error']}" for r in rows if r["status"] != "outputs match"]
    assert not failed, "\n".join(failed)
