"""The run's sensitivity.json: written by `sparsify sensitivity`, read by `allocation: sensitivity`.

Shape: {"key": {...}, "baseline": {"loss", "acc1"}, "layers": [{"layer": NAME, "shape", "weights",
"groups", "levels": [{"level", "sparsity", "groups_zero", "loss", "acc1", "loss_drop", "acc1_drop"}, ...]}],
"allocation": {...}}. `sparsity` is the share of the layer's weights zero at that level (whole groups,
after the constraints), `loss_drop` how much the loss rose, `acc1_drop` the top-1 points lost.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.io.files import atomic_write_bytes

SENSITIVITY_FILE = "sensitivity.json"


def read_json(path: Path):
    """The content of `path`, or None when it is missing or not readable JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def curves_of(layers: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(sparsity, loss increase) points per layer of sensitivity.json's `layers`."""
    return {e["layer"]: [(float(p["sparsity"]), float(p["loss_drop"])) for p in e["levels"]] for e in layers}


def read_curves(run_root: Path, eligible: list[str]) -> dict[str, list[tuple[float, float]]]:
    """The measured curves of `eligible` from the run's sensitivity.json; one line when it is missing,
    unreadable, or measured on other layers (or not on all of them)."""
    path = run_root / SENSITIVITY_FILE
    data = read_json(path)
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        what = "is missing" if not path.exists() else "is not readable"
        raise SparsifyError(f"sparsity.allocation sensitivity: {path} {what}; run `sparsify sensitivity -c CFG` first")
    try:
        curves = curves_of(layers)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SparsifyError(f"sparsity.allocation sensitivity: {path} is not in the form `sparsify sensitivity` "
                            "writes; run `sparsify sensitivity -c CFG` again") from None
    if set(curves) != set(eligible):
        missing, extra = set(eligible) - set(curves), set(curves) - set(eligible)
        which = f"lacks {sorted(missing)[0]}" if missing else f"has {sorted(extra)[0]}, not eligible now"
        raise SparsifyError(f"sparsity.allocation sensitivity: {path} does not match the eligible layers "
                            f"({which}; {len(curves)} measured, {len(eligible)} eligible); "
                            "run `sparsify sensitivity -c CFG` first")
    return curves
