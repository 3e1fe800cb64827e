"""Methods: how masks behave while training (`sparsity.method`), one registered Method class each:
`static` (prune rounds only), `dsr`, `gumbel`, `gradual`; `base` holds Method and TrainContext,
`activations` the sparse-activation callbacks.
"""
