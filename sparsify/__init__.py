"""sparsify: make trained convolutional networks sparse, round by round."""

__version__ = "0.1.0"
