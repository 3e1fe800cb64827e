"""Core: tensors in, masks out; no files, no config objects.

`patterns` (the Pattern base class, build/parse/describe) with the built-in patterns in `block`
and `elements` (unstructured, n:m); `criteria` (Criterion: a score per group); `masks`
(MaskEnforcer keeps masked weights exactly zero); `prune` (one round over a model's layers).
"""
