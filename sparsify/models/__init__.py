"""Models: build any torchvision classifier, a built-in one or a `pkg.module:factory` by name
(`build`), torchvision specifics (`tvmodels`), local weight files (`weights`), and the built-in
networks (`builtin`, `zoo`), registered in MODELS when this package is imported."""

from sparsify.models import builtin, zoo  # noqa: F401  (register the built-in models)
from sparsify.models.build import build_model
from sparsify.registry import MODELS

__all__ = ["MODELS", "build_model"]
