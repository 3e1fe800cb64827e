"""Models: build any torchvision classifier, a built-in one or a `pkg.module:factory` by name
(`build`), load weights into it, and the built-in zoo of small CIFAR/MNIST networks (`zoo`,
registered in MODELS when this package is imported)."""

from sparsify.models import zoo  # noqa: F401  (registers the built-in models)
from sparsify.models.build import MODELS, build_model

__all__ = ["MODELS", "build_model"]
