"""Training: `trainer` (one optimizer step with masks exact), `loop` (epochs, evaluation),
`callbacks` (the TrainCallback hooks), `log` (progress line, metrics.csv), `state` (the
train-state of exact resume), `ema`, `distributed` (torchrun plumbing) and `stage` (one train
stage on every rank).
"""
