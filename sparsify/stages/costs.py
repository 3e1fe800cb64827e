"""What a checkpoint costs to run and to store: parameters, nonzeros, multiply-adds and bytes.

Multiply-adds are counted for convolutions and Linear layers only (the rest of a CNN is a rounding
error next to them), per image: each output position (pixel of a convolution, token of a Linear)
costs one multiply-add per weight of the layer, grouped convolutions included, and the *effective* count keeps only the
nonzero weights, which is what a kernel that skips every zero would do.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


def layer_costs(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """One row per Conv/Linear layer that ran in a forward pass of `example` (any batch size): its
    parameters, nonzero weights, and dense and effective multiply-adds per image."""
    rows: dict[str, dict] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            if name in rows or not isinstance(output, torch.Tensor):
                return
            weight = module.weight.detach()
            channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
            positions = output[0].numel() // output.shape[channel_dim]  # output positions of one image
            rows[name] = {"layer": name, "kind": type(module).__name__, "shape": list(weight.shape),
                          "params": weight.numel(), "nonzeros": int(torch.count_nonzero(weight)),
                          "macs": positions * weight.numel(),
                          "effective_macs": positions * int(torch.count_nonzero(weight))}
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return list(rows.values())


def model_costs(model: nn.Module, rows: list[dict]) -> dict:
    """Totals of `layer_costs` rows, with the model's parameter count beside them."""
    params = sum(p.numel() for p in model.parameters())
    nonzeros = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    macs = sum(row["macs"] for row in rows)
    effective = sum(row["effective_macs"] for row in rows)
    return {"params": params, "nonzero_params": nonzeros, "macs": macs, "effective_macs": effective,
            "mac_ratio": round(effective / macs, 4) if macs else 1.0}


def compressed_size(data: bytes) -> int:
    """Bytes after fast zlib compression: what the zeros save on disk or on the wire, as a plain archive would."""
    return len(zlib.compress(data, 1))


def compaction_costs(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module | None, dict]:
    """What `export --compact` would leave of `model`: (the compact model or None, a JSON-ready record of
    parameters and multiply-adds before and after, per layer and in total, and the zero channels kept with
    the reason). A model torch.fx cannot trace gives (None, {"error": why})."""
    from sparsify.graph.compact import compact_model

    try:
        result = compact_model(model, example[:2])
    except Exception as exc:  # untraceable, or a compaction whose check failed
        return None, {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"}
    before = {row["layer"]: row for row in layer_costs(model, example)}
    after = {row["layer"]: row for row in layer_costs(result.model, example)}
    layers = [{"layer": name, "shape_before": row["shape"], "shape_after": after[name]["shape"],
               "params_before": row["params"], "params_after": after[name]["params"],
               "macs_before": row["macs"], "macs_after": after[name]["macs"]}
              for name, row in before.items() if name in after and row["shape"] != after[name]["shape"]]
    totals = {"params_before": sum(p.numel() for p in model.parameters()),
              "params_after": sum(p.numel() for p in result.model.parameters()),
              "macs_before": sum(r["macs"] for r in before.values()),
              "macs_after": sum(r["macs"] for r in after.values())}
    kept = [plan.record() for plan in result.sets if plan.kept_zero]
    return result.model, {"removed_channels": result.removed, **totals, "layers": layers, "kept": kept}
