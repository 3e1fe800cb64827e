"""`sparsify check`: prove that a checkpoint (or any state dict) follows a sparsity pattern.

A sparsify checkpoint is checked layer by layer against its masks: every masked-out weight must
be exactly 0.0, and the weights must follow the declared pattern (its own, or `--pattern`). For a
pattern with followers (`channel`), the per-channel parameters a pruned channel takes with it (its
bias, the BatchNorm scale and shift after it) must be 0.0 at the pruned channels too. A
plain state dict (`.safetensors`, `.pth`) has no masks: every conv/Linear-shaped weight the
pattern applies to is checked for the structure alone (for n:m, at most n nonzeros in every group
of m input channels; blocks and single weights always form a valid layout, so for `block` and
`unstructured` only the sparsity is reported). A sparsify checkpoint must also fit the model its metadata
names (every tensor's name and shape, as a strict `load_state_dict` wants them), and no tensor of any file
may hold NaN or inf: either is a failed check naming the first offending tensor.

Checked against 2:4, every conv/Linear weight (checked or not) also gets a `tensorrt` verdict:
`yes` when TensorRT's rule for 2:4 sparse kernels holds (`sparsify.core.tensorrt`), else `no: why`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sparsify.errors import SparsifyError, first_line, path_problem
from sparsify.core.patterns import Pattern, build_pattern, describe_pattern, parse_pattern
from sparsify.core.tensorrt import TENSORRT_PATTERN, TENSORRT_RULE, tensorrt_2to4


def check_file(path: Path, *, pattern: str | None = None) -> dict:
    """Findings per layer and the verdict, as JSON-ready data."""
    path = Path(path)
    if not path.is_file():
        raise SparsifyError(f"{path} {path_problem(path)}; pass a checkpoint or a state dict file"
                            f"{latest_hint(path)}")
    state, masks, meta = read_tensors(path)
    if pattern is None and not meta.get("pattern"):
        what = "its metadata names no pattern" if meta else "it is a plain state dict, not a sparsify checkpoint"
        raise SparsifyError(f"{path}: {what}, so there is no pattern to check against; pass --pattern (e.g. 2:4, "
                            "8x8, unstructured)")
    spec = parse_pattern(pattern) if pattern else meta["pattern"]
    declared = build_pattern(spec)
    followers = None
    if masks:
        stored = build_pattern(meta["pattern"])
        layers = [masked_finding(name, state, masks[name], stored, declared, meta.get("target")) for name in masks]
        followers = check_followers_(layers, state, masks, stored, meta)
        skipped = [{"parameter": n, "reason": "no mask (not pruned)"} for n in weight_names(state) if n not in masks]
    else:  # a plain state dict, or a checkpoint not pruned yet (its metadata names the pattern): by shape
        layers, skipped = check_plain(state, declared)
    model = model_fit(state, meta) if meta else None
    problems = ([model["problem"]] if model and model["problem"] else []) + nonfinite_problems(layers, state)
    result = verdict(path, spec, layers, skipped, kind="checkpoint" if meta else "state dict", problems=problems)
    result["pruned"] = bool(masks)
    if model is not None:
        result["model"] = model
    if followers is not None:
        result["followers"] = followers
    if declared.describe() == TENSORRT_PATTERN:
        result["tensorrt"] = tensorrt_verdicts_(state, layers, skipped)
    return result


def tensorrt_verdicts_(state: dict, layers: list[dict], skipped: list[dict]) -> dict:
    """Add each conv/Linear weight's `tensorrt` verdict to its entry; the count that TensorRT can run 2:4."""
    entries = [e for e in layers + skipped if e["parameter"] in state and state[e["parameter"]].dim() >= 2]
    for entry in entries:
        entry["tensorrt"] = tensorrt_2to4(state[entry["parameter"]])
    return {"rule": TENSORRT_RULE, "layers": len(entries),
            "accelerable": sum(entry["tensorrt"] == "yes" for entry in entries)}


def latest_hint(folder: Path) -> str:
    """', e.g. <run>/checkpoints/<latest>' when `folder` is a run folder (or its checkpoints/), else ''."""
    if not folder.is_dir():
        return ""
    checkpoints = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    found = sorted(checkpoints.glob("*.safetensors"))
    return f", e.g. {found[-1]}" if found else ""


def read_tensors(path: Path) -> tuple[dict, dict, dict]:
    """(state, masks, metadata) of a sparsify checkpoint; (state, {}, {}) of a plain state dict."""
    from sparsify.io.checkpoint import is_sparsify_metadata, parse_checkpoint, read_metadata
    from sparsify.models.weights import read_weights_file

    if path.suffix == ".safetensors" and is_sparsify_metadata(read_metadata(path)):
        ckpt = parse_checkpoint(path)
        return ckpt.state, ckpt.masks, ckpt.meta
    return read_weights_file(path), {}, {}


def weight_names(state: dict) -> list[str]:
    """Conv- and Linear-shaped weights: `*weight` tensors with 2 to 5 dimensions."""
    return [n for n, t in state.items() if n.endswith("weight") and 2 <= t.dim() <= 5]


def model_fit(state: dict, meta: dict) -> dict:
    """Whether the checkpoint's tensors are those of the model its metadata names (names and shapes, as a
    strict `load_state_dict` wants them): {'arch', 'checked', 'problem', 'reason' (why not checked)}."""
    from sparsify.io.restore import build_model_for, fit_problem, model_metadata_problem
    from sparsify.models.tvmodels import build_for_shapes

    arch = meta.get("arch")
    problem = model_metadata_problem(meta)
    if problem:
        return {"arch": arch, "checked": True, "problem": f"the checkpoint {problem}", "reason": ""}
    try:
        model = build_for_shapes(lambda: build_model_for(meta))
    except (SparsifyError, ImportError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        return {"arch": arch, "checked": False, "problem": "",
                "reason": f"model {arch!r} could not be built: {first_line(exc)}"}
    problem = fit_problem(state, model)
    return {"arch": arch, "checked": True, "problem": f"the checkpoint does not fit model {arch!r}: {problem}"
            if problem else "", "reason": ""}


def nonfinite_problems(layers: list[dict], state: dict) -> list[str]:
    """Each tensor holding NaN or inf: a problem of its layer when it is a checked one, else returned."""
    from sparsify.io.checkpoint import nonfinite_entries

    by_layer = {layer["parameter"]: layer for layer in layers}
    problems = []
    for name in nonfinite_entries(state):
        if name in by_layer:
            by_layer[name]["problems"].insert(0, "holds NaN or inf")
            by_layer[name]["follows"] = False
        else:
            problems.append(f"{name} holds NaN or inf")
    return problems


def masked_finding(name: str, state: dict, mask: torch.Tensor, stored, declared, target) -> dict:
    """A pruned layer's finding; a failed one when the mask has no conv/Linear weight to mask."""
    from sparsify.io.checkpoint import mask_target_problem

    problem = mask_target_problem(name, state)
    if problem is None:
        return check_masked(name, state[name], mask, stored, declared, target)
    shape = "x".join(map(str, state[name].shape)) if name in state else "-"
    return {"parameter": name, "shape": shape, "follows": False, "sparsity": 0.0, "target": target, "zeros": 0,
            "weights": 0, "problems": [problem]}


def check_masked(name: str, weight: torch.Tensor, mask: torch.Tensor, stored, declared, target) -> dict:
    """One pruned layer: mask fits, masked weights are 0.0, and the weights follow `declared`."""
    problems = []
    expected = tuple(stored.mask_shape(tuple(weight.shape)))
    if tuple(mask.shape) != expected or mask.dtype != torch.bool:
        problems.append(f"mask has shape {tuple(mask.shape)} ({mask.dtype}), needs bool {expected}")
    else:
        element = stored.expand(mask, tuple(weight.shape))
        leaked = int(weight[~element].ne(0).sum())
        if leaked:
            problems.append(f"{leaked} masked weights are not 0.0")
    problems += structure_problems(declared, weight)
    return finding(name, weight, problems, target=target)


def check_followers_(layers: list[dict], state: dict, masks: dict, stored, meta: dict) -> dict | None:
    """Patterns whose pruned output channels take per-channel parameters with them (`Pattern.followers`:
    pattern channel's own bias and the BatchNorm scale and shift after it): each such parameter must be
    0.0 at the pruned channels. Adds a problem to the layer where one is not; returns what was checked
    (None for patterns without followers)."""
    if type(stored).followers is Pattern.followers:
        return None
    from sparsify.io.restore import build_model_for

    try:
        model = build_model_for(meta)
    except (SparsifyError, ImportError, RuntimeError, ValueError, KeyError) as exc:
        return {"checked": 0, "reason": f"not checked: the model could not be built ({exc})"}
    followers = stored.followers(model, [name for name in masks if name in state and state[name].dim() >= 2])
    by_layer = {layer["parameter"]: layer for layer in layers}
    checked = 0
    for param, owner in sorted(followers.items()):
        if param not in state or owner not in masks:
            continue
        pruned = ~masks[owner].reshape(-1)
        values = state[param].reshape(-1)
        if values.numel() != pruned.numel():
            continue
        checked += 1
        leaked = int(values[pruned].ne(0).sum())
        if leaked:
            layer = by_layer[owner]
            layer["problems"].append(f"{leaked} pruned output channels have a nonzero {param}")
            layer["follows"] = False
    return {"checked": checked, "reason": ""}


def check_plain(state: dict, declared) -> tuple[list[dict], list[dict]]:
    """Every weight the pattern applies to, by shape; the others with the reason they were skipped."""
    layers, skipped = [], []
    for name in weight_names(state):
        weight = state[name]
        reason = shape_reason(declared, tuple(weight.shape))
        if reason:
            skipped.append({"parameter": name, "reason": reason})
        else:
            layers.append(finding(name, weight, structure_problems(declared, weight), target=None))
    return layers, skipped


def shape_reason(pattern, shape: tuple[int, ...]) -> str | None:
    """Why `pattern` does not apply to a weight of `shape` (read as an ungrouped conv or a Linear)."""
    cin, cout, taps = shape[1], shape[0], shape[2:]
    from sparsify.models.tvmodels import build_for_shapes

    module = build_for_shapes(lambda: nn.Linear(cin, cout) if not taps
                              else [nn.Conv1d, nn.Conv2d, nn.Conv3d][len(taps) - 1](cin, cout, taps))
    return pattern.ineligible_reason(module, shape)


def structure_problems(pattern, weight: torch.Tensor) -> list[str]:
    """What breaks the pattern's layout beyond its mask (n:m: groups with more than n nonzeros)."""
    return pattern.layout_problems(weight)


def finding(name: str, weight: torch.Tensor, problems: list[str], *, target) -> dict:
    zeros = int(weight.eq(0).sum())
    return {"parameter": name, "shape": "x".join(map(str, weight.shape)), "follows": not problems,
            "sparsity": round(zeros / max(weight.numel(), 1), 6), "target": target, "zeros": zeros,
            "weights": weight.numel(), "problems": problems}


def verdict(path: Path, spec: dict, layers: list[dict], skipped: list[dict], *, kind: str,
            problems: list[str] = ()) -> dict:
    """The overall answer: follows when the file has no problem of its own (`problems`: a model it does not
    fit, NaN or inf outside the checked layers), every checked layer follows and at least one was checked."""
    bad = [layer for layer in layers if not layer["follows"]]
    zeros = sum(layer["zeros"] for layer in layers)
    total = sum(layer["weights"] for layer in layers)
    reason = ""
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        reason = f"{path}: {problems[0]}{more}"
    elif not layers:
        reason = f"{path} has no weight that pattern {describe_pattern(spec)} applies to"
    elif bad:
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        reason = f"{bad[0]['parameter']} does not follow {describe_pattern(spec)}: {bad[0]['problems'][0]}{more}"
    targets = {layer["target"] for layer in layers}
    return {"file": str(path), "kind": kind, "pattern": describe_pattern(spec), "follows": not reason,
            "reason": reason, "checked": len(layers), "violating": len(bad),
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "target": targets.pop() if len(targets) == 1 else None, "layers": layers, "skipped": skipped,
            "problems": list(problems)}


def render(result: dict, fmt: str) -> str:
    """Text (one line per layer, then the verdict) or JSON."""
    if fmt == "json":
        return json.dumps(result, indent=2)
    kind = result["kind"] + (", no layer pruned yet: checked by shape" if result["kind"] == "checkpoint"
                             and not result.get("pruned", True) else "")
    lines = [f"{result['file']} ({kind}), pattern {result['pattern']}:"]
    for layer in result["layers"]:
        state = "ok" if layer["follows"] else "VIOLATES: " + "; ".join(layer["problems"])
        lines.append(f"  {layer['parameter']} [{layer['shape']}] sparsity {100 * layer['sparsity']:.2f}%"
                     f"{_target_text(layer['target'])} {state}{_tensorrt_text(layer)}")
    for item in result["skipped"]:
        lines.append(f"  {item['parameter']}: not checked ({item['reason']}){_tensorrt_text(item)}")
    lines += _model_lines(result)
    if result.get("followers"):
        followers = result["followers"]
        lines.append(f"followers: {followers['checked']} bias/BatchNorm tensors of pruned channels checked"
                     + (f" ({followers['reason']})" if followers["reason"] else ""))
    if "tensorrt" in result:
        trt = result["tensorrt"]
        lines.append(f"tensorrt 2:4: {trt['accelerable']} of {trt['layers']} conv/Linear layers follow TensorRT's rule "
                     f"for sparse kernels ({trt['rule']})")
    word = "follows" if result["follows"] else "does NOT follow"
    lines.append(f"{word} {result['pattern']}: {result['checked']} layers checked, {result['violating']} violating, "
                 f"{len(result['skipped'])} not checked; sparsity of checked weights "
                 f"{100 * result['sparsity']:.2f}%{_target_text(result['target'])}")
    return "\n".join(lines)


def _model_lines(result: dict) -> list[str]:
    """The model fit (checkpoints) and each problem of the file's own."""
    model = result.get("model")
    lines = []
    if model and not model["checked"]:
        lines.append(f"model: not checked ({model['reason']})")
    elif model and not model["problem"]:
        lines.append(f"model: every tensor fits {model['arch']}")
    return lines + [f"  VIOLATES: {problem}" for problem in result.get("problems", [])]


def _tensorrt_text(entry: dict) -> str:
    return f"; tensorrt 2:4: {entry['tensorrt']}" if "tensorrt" in entry else ""


def _target_text(target: float | None) -> str:
    return "" if target is None else f" (target {100 * target:.2f}%)"
