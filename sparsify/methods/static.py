"""Method `static`: the masks that `prune` rounds wrote stay fixed while training."""

from __future__ import annotations

from sparsify.methods.base import Method
from sparsify.registry import METHODS


@METHODS.register("static")
class Static(Method):
    name = "static"
    summary = "masks fixed during training; `prune` rounds shrink them"
    patterns = ("block", "unstructured", "nm", "channel")
