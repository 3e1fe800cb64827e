"""What the report's figures draw, as plain values: per-round points, training segments, mask grids,
sensitivity curves and bench timings (no matplotlib here).

Side files are read leniently: a file that is absent gives nothing, one that cannot be read or lacks
the keys a figure needs gives nothing and a note saying what was skipped.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch

from sparsify.errors import SparsifyError

DEFAULT_MASK_LAYERS = 4  # mask pictures drawn when --layers is not given: the largest pruned layers


def round_points(history: list[dict]) -> list[dict]:
    """Per round of the history: the sparsity at its end, the last top-1 after training (or an eval of a
    trained checkpoint) and the last top-1 of a pruned checkpoint (an eval right after the prune), or None."""
    points: dict[int, dict] = {}
    for row in history:
        if not isinstance(row.get("round"), int):
            continue
        point = points.setdefault(row["round"], {"round": row["round"], "sparsity": None, "val_acc1": None,
                                                 "pruned_acc1": None})
        if isinstance(row.get("sparsity"), (int, float)):
            point["sparsity"] = row["sparsity"]
        if isinstance(row.get("val_acc1"), (int, float)):
            pruned = row.get("stage") == "pruned" or str(row.get("checkpoint") or "").endswith("-pruned.safetensors")
            point["pruned_acc1" if pruned else "val_acc1"] = row["val_acc1"]
    return [points[key] for key in sorted(points)]


def training_segments(rows: list[dict]) -> list[dict]:
    """metrics.csv rows as one segment per train stage (rows sharing a `start`), in the file's order:
    round, start, the step it begins at, and the steps, losses and learning rates (steps counted on from
    the stage before)."""
    segments: list[dict] = []
    offset = 0
    for row in rows:
        try:
            round_, step, loss, lr = int(row["round"]), int(row["step"]), float(row["loss"]), float(row["lr"])
        except (KeyError, TypeError, ValueError):  # a damaged line, or a window fp16 skipped (no loss)
            continue
        if not segments or segments[-1]["start"] != row.get("start") or step <= segments[-1]["local"][-1]:
            offset = segments[-1]["steps"][-1] if segments else 0
            segments.append({"round": round_, "start": row.get("start"), "begin": offset, "steps": [], "local": [],
                             "loss": [], "lr": []})
        segment = segments[-1]
        segment["steps"].append(offset + step)
        segment["local"].append(step)
        segment["loss"].append(loss)
        segment["lr"].append(lr)
    for segment in segments:
        del segment["local"]
    return segments


def read_side_file(path: Path) -> tuple[object | None, list[str]]:
    """A run's JSON side file (sensitivity.json, bench.json): (data, []) or (None, [why it is skipped]);
    (None, []) when it is not there."""
    if not path.is_file():
        return None, []
    try:
        return json.loads(path.read_text(encoding="utf-8")), []
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, [f"{path} is not readable JSON ({type(error).__name__}); its figures are skipped"]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


SENSITIVITY_VALUES = ("acc1_drop", "top1_drop", "val_acc1", "acc1", "loss_drop", "val_loss", "loss")


def sensitivity_curves(data) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(value name, {layer: [(level, value), ...]}) from sensitivity.json.

    Read: {"layers": [{"layer": NAME, "levels": [{"level": L, VALUE: V}, ...]}, ...]} or
    {"layers": {NAME: [{"level": L, VALUE: V}, ...]}}; "sparsity" may stand for "level", VALUE is the
    first of SENSITIVITY_VALUES the points have. ("", {}) when nothing matches.
    """
    layers = data.get("layers") if isinstance(data, dict) else None
    if isinstance(layers, dict):
        layers = [{"layer": name, "levels": points} for name, points in layers.items()]
    if not isinstance(layers, list):
        return "", {}
    entries = [(str(e.get("layer") or e.get("name") or e.get("parameter")), e.get("levels") or e.get("points"))
               for e in layers if isinstance(e, dict)]
    points = [p for _, levels in entries if isinstance(levels, list) for p in levels if isinstance(p, dict)]
    key = next((k for k in SENSITIVITY_VALUES if any(_number(p.get(k)) is not None for p in points)), None)
    if key is None:
        return "", {}
    curves = {}
    for name, levels in entries:
        pairs = sorted((_number(p.get("level", p.get("sparsity"))), _number(p.get(key)))
                       for p in levels or [] if isinstance(p, dict))
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            curves[name] = pairs
    return key, curves


def bench_layer_speedups(data) -> list[dict]:
    """bench.json's per-layer rows that have layer, batch, chosen and speedup ([] when none do)."""
    rows = data.get("layers") if isinstance(data, dict) else None
    return [{"layer": str(r["layer"]), "batch": int(r["batch"]), "chosen": str(r["chosen"]),
             "speedup": float(r["speedup"])}
            for r in rows or [] if isinstance(r, dict) and isinstance(r.get("batch"), int)
            and _number(r.get("speedup")) is not None and r.get("layer") is not None and r.get("chosen") is not None]


def bench_end_to_end(data) -> list[dict]:
    """bench.json's end-to-end rows that have batch, model and median/min/max ms ([] when none do)."""
    rows = data.get("end_to_end") if isinstance(data, dict) else None
    keys = ("median_ms", "min_ms", "max_ms")
    return [{"batch": int(r["batch"]), "model": str(r["model"]), **{k: float(r[k]) for k in keys}}
            for r in rows or [] if isinstance(r, dict) and isinstance(r.get("batch"), int) and r.get("model")
            and all(_number(r.get(k)) is not None for k in keys)]


def choose_layers(rows: list[dict], glob: str | None, *, count: int = DEFAULT_MASK_LAYERS) -> list[str]:
    """The layers with a mask whose picture is drawn: those matching `glob` (the parameter name, or it
    without '.weight'), else the `count` largest, in model order. A glob matching none is an error."""
    masked = [r for r in rows if r.get("groups") is not None]
    if glob is None:
        largest = sorted(masked, key=lambda r: -math.prod(int(d) for d in r["shape"].split("x")))[:count]
        return [r["parameter"] for r in masked if r in largest]
    chosen = [r["parameter"] for r in masked
              if fnmatch.fnmatchcase(r["parameter"], glob) or fnmatch.fnmatchcase(r["parameter"].removesuffix(".weight"), glob)]
    if not masked:
        raise SparsifyError(f"--layers {glob!r}: this checkpoint has no mask to draw (it is dense); leave --layers out")
    if not chosen:
        names = ", ".join(r["parameter"] for r in masked[:6]) + (", ..." if len(masked) > 6 else "")
        raise SparsifyError(f"--layers {glob!r} matches no layer with a mask; these have one: {names} "
                            "(a glob over parameter names, e.g. 'layer1.*')")
    return chosen


def mask_grid(mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A mask as a (COUT, CIN) picture: the block/group grid itself (True = kept), or for element masks of
    a conv weight the share of its kh x kw taps kept. Returns (2-D float tensor, whether it is a share)."""
    if mask.dim() > 2:
        return mask.float().reshape(mask.shape[0], mask.shape[1], -1).mean(-1), True
    return mask.float().reshape(mask.shape[0], -1), False


def chosen_masks(checkpoint: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The masks of `names` in the reported checkpoint (read again: the report keeps numbers only)."""
    from sparsify.io.checkpoint import load_checkpoint

    masks = load_checkpoint(Path(checkpoint)).masks
    return {name: masks[name] for name in names if name in masks}
