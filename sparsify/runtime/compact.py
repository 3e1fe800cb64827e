"""load_compact(): the model of a compact safetensors export (`sparsify export --compact`) as a module.

The file holds the compact state dict; its metadata names the architecture and, under
`compact_shapes`, every tensor whose shape compaction changed (or that it added: a bias a fold
created). The loader builds the architecture, gives those tensors their new shapes (and the layers
their new channel counts), then loads the state dict strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from sparsify.errors import SparsifyError, path_problem
from sparsify.graph.compact import shrink_to_
from sparsify.io.restore import build_model_for


def load_compact(path: str | Path) -> nn.Module:
    """The compact model of `path` in eval mode, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise SparsifyError(f"compact model {path} {path_problem(path)}; name a file written by "
                            "`sparsify export --compact --format safetensors`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SparsifyError(f"{path} is not a safetensors file ({exc}); name a file written by "
                            "`sparsify export --compact`") from None
    if "compact_shapes" not in metadata or "arch" not in metadata:
        raise SparsifyError(f"{path} has no compact_shapes metadata: it was not written by "
                            "`sparsify export --compact` (a plain export loads with load_state_dict)")
    meta = {key: json.loads(value) for key, value in metadata.items() if key in ("arch", "num_classes", "in_channels")}
    model = build_model_for(meta)
    shrink_to_(model, json.loads(metadata["compact_shapes"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise SparsifyError(f"{path} does not fit a compact {meta['arch']}: {first}") from None
    return model.eval()
