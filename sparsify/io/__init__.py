"""Files: `files` (atomic writes), `checkpoint` (the safetensors format: weights, masks, metadata,
and the checks on load), `rundir` (the run folder: checkpoints, history.jsonl, the lock),
`restore` (a live model from a checkpoint) and `export` (Exporter classes for other tools).
"""
