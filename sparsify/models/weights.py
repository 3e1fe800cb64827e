"""Local weight files (.safetensors, .pth, .pt): read without unpickling code, checked against the model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsify.errors import ModelError
from sparsify.models.tvmodels import AUX_CLASSIFIERS, AUX_HEAD_ARCHS, find_head, first_line

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt")


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or `.pth`/`.pt` (plain, or under state_dict/model)."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist; check model.weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelError(
                f"weights file {path} is not a valid safetensors file ({first_line(exc)}); "
                "re-export it with safetensors.torch.save_file"
            ) from None
    if path.suffix not in (".pth", ".pt"):
        raise ModelError(
            f"weights file {path} has suffix {path.suffix!r}; use .safetensors, .pth or .pt"
        )
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive (or an old-style pickle)
        what = "is empty" if not head else f"starts with {head!r}, not a zip archive or a pickle"
        raise ModelError(f"weights file {path} was not written by torch.save (it {what}); save "
                         "model.state_dict() with torch.save, or use a .safetensors file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and corrupt archives alike
        raise ModelError(
            f"weights file {path} cannot be read as tensors ({first_line(exc)}); "
            "save model.state_dict() with torch.save, not the whole model"
        ) from None
    return unwrap_state_dict(data, path)


def unwrap_state_dict(data: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one stored under a "state_dict" or "model" entry."""
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(
            f"weights file {path} holds no state dict of tensors; save model.state_dict(), "
            "optionally under a 'state_dict' or 'model' key"
        )
    return data


def strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a `module.` or `model.` key prefix when that makes the keys match the model."""
    if expected & set(state):
        return state
    for prefix in ("module.", "model."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            return stripped
    return state


def load_weights_file(model: nn.Module, path: Path, *, log: Callable[[str], None]) -> None:
    """Load a local state dict strictly, except a head whose shape differs is re-initialised."""
    own = model.state_dict()
    state = strip_prefix(read_weights_file(path), set(own))
    state = drop_absent_aux_keys(state, own)
    skipped = mismatched_head_keys(model, state, own)
    absent_aux = {k for k in own if k.startswith(aux_prefixes()) and k not in state}
    state = {k: v for k, v in state.items() if k not in skipped}
    check_keys(path, own, state, skipped | absent_aux)
    model.load_state_dict(state, strict=False)
    log(f"loaded weights from {path}")
    if skipped:
        log(f"re-initialised head {', '.join(sorted(skipped))}: its shape differs from the file's")
    if absent_aux:
        heads = sorted({k.split(".")[0] for k in absent_aux})
        log(f"auxiliary heads {', '.join(heads)} are not in the file: they start freshly initialised")


def aux_prefixes() -> tuple[str, ...]:
    """State-dict key prefixes of the inception_v3/googlenet auxiliary heads."""
    return tuple(f"{name}." for names in AUX_HEAD_ARCHS.values() for name in names)


def drop_absent_aux_keys(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Ignore inception_v3/googlenet auxiliary-head keys when the model has no such heads."""
    prefixes = aux_prefixes()
    if any(k.startswith(prefixes) for k in own):
        return state
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def mismatched_head_keys(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> set[str]:
    """Head parameter keys present in `state` with a shape other than the model's."""
    found = find_head(model)
    if found is None:
        return set()
    heads = [found[0], *(n for names in AUX_CLASSIFIERS.values() for n in names)]
    keys = {f"{head}.{kind}" for head in heads for kind in ("weight", "bias")}
    return {k for k in keys if k in state and k in own and state[k].shape != own[k].shape}


def check_keys(
    path: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], skipped: set[str]
) -> None:
    """Refuse missing, unexpected or mis-shaped keys, naming the first few."""
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ModelError(
            f"weights file {path} does not fit the model ({'; '.join(problems)}); "
            "check model.arch and that the file holds this architecture's state_dict"
        )
