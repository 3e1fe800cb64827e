"""Progress for people: one line on stderr; under torchrun only rank 0 speaks."""

from __future__ import annotations

import os
import sys


def log(message: str) -> None:
    """Progress for people, on stderr; under torchrun only rank 0 speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
