"""The result of `sparsify sensitivity` as text: a table (one row per layer), CSV (one row per layer and
level) or the JSON of sensitivity.json."""

from __future__ import annotations

import csv
import io
import json

CSV_COLUMNS = ["layer", "weights", "level", "sparsity", "loss", "acc1", "loss_drop", "acc1_drop", "allocated"]


def render_sensitivity(data: dict, fmt: str) -> str:
    """`data` (sensitivity.json's content) as `table`, `csv` or `json`."""
    if fmt == "json":
        return json.dumps(data, indent=1)
    if fmt == "csv":
        return sensitivity_csv(data)
    return "\n".join(sensitivity_table(data))


def allocated_targets(data: dict) -> dict[str, float]:
    return (data.get("allocation") or {}).get("layers") or {}


def sensitivity_table(data: dict) -> list[str]:
    """Per layer: top-1 points lost and loss increase at each level, and the allocated target."""
    base, key, layers = data["baseline"], data["key"], data["layers"]
    targets = allocated_targets(data)
    width = max([len("layer"), *(len(e["layer"]) for e in layers)])
    lines = [f"sensitivity of {key['checkpoint']} on {key['batches']} validation batch(es): baseline top-1 "
             f"{base['acc1']:.2f}%, loss {base['loss']:.4f}; each cell is top-1 points lost / loss increase "
             "with that layer alone pruned to the level",
             f"{'layer':<{width}}  {'weights':>9}  " + "  ".join(f"{'@' + format(level, 'g'):>15}" for level in
                                                               key["levels"]) + "  allocated"]
    for entry in layers:
        cells = "  ".join(f"{p['acc1_drop']:>6.2f} / {p['loss_drop']:>6.3f}" for p in entry["levels"])
        target = targets.get(entry["layer"])
        lines.append(f"{entry['layer']:<{width}}  {entry['weights']:>9}  {cells}  "
                     + (f"{target:>9.1%}" if target is not None else f"{'-':>9}"))
    lines.append(allocation_line(data))
    return lines


def allocation_line(data: dict) -> str:
    allocation = data.get("allocation") or {}
    if "layers" not in allocation:
        return f"allocation: {allocation.get('note', 'not computed')}"
    return (f"allocation for target {allocation['target']:.1%} of the eligible weights: {allocation['sparsity']:.2%} "
            f"zero, predicted loss increase {allocation['predicted_loss_drop']:.4f} (sum over layers); "
            "prune with --set sparsity.allocation=sensitivity")


def sensitivity_csv(data: dict) -> str:
    """One row per layer and level, raw values; `allocated` is the layer's target from the allocation."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    targets = allocated_targets(data)
    for entry in data["layers"]:
        for point in entry["levels"]:
            writer.writerow({"layer": entry["layer"], "weights": entry["weights"],
                             "allocated": targets.get(entry["layer"], ""),
                             **{k: point[k] for k in CSV_COLUMNS if k in point}})
    return out.getvalue().rstrip("\n")
