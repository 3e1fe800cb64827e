"""`sparsify eval`: the latest checkpoint on the validation set (a history line, no new checkpoint)."""

from __future__ import annotations

import time

from sparsify.config import RunConfig
from sparsify.methods.activations import activation_callbacks
from sparsify.stages.run import StageResult, check_same_model, checkpoint_loaders, model_sparsity, now
from sparsify.io.rundir import RunDir
from sparsify.io.restore import load_run
from sparsify.training.distributed import resolve_device
from sparsify.training.loop import evaluate


def eval_latest(config: RunConfig) -> StageResult:
    """Evaluate the latest checkpoint on the validation set (no new checkpoint)."""
    run = RunDir(config.run_dir)
    with run.lock("eval"):
        started = time.perf_counter()
        loaded = load_run(run)
        meta = loaded.checkpoint.meta
        check_same_model(config, meta)  # the pattern may differ: evaluation uses the checkpoint's masks
        device = resolve_device(config.device)
        _, val_loader = checkpoint_loaders(config, meta, seed=config.seed, pin_memory=device.type == "cuda")
        for sites in activation_callbacks(config.activations, seed=config.seed):  # masks are not in checkpoints
            sites.prepare(loaded.model)
        metrics = {k: round(v, 4) for k, v in evaluate(loaded.model.to(device), val_loader, device=device,
                                                       limit=config.data.limit_val_batches).items()}
        sparsity = model_sparsity(loaded.checkpoint.state, loaded.masks, loaded.pattern)
        seconds = time.perf_counter() - started
        run.append_history({"time": now(), "command": "eval", "round": meta["round"], "stage": "eval",
                            "checkpoint": loaded.checkpoint.path.name, "sha256": loaded.checkpoint.sha256,
                            "sparsity": round(sparsity, 6), "metrics": metrics, "seconds": round(seconds, 3)})
    result = StageResult("eval", meta["round"], "eval", loaded.checkpoint.path, sparsity, metrics, seconds)
    result.message = (f"{loaded.checkpoint.path.name}: val top-1 {metrics['val_acc1']:.2f}%, "
                      f"top-5 {metrics['val_acc5']:.2f}%, loss {metrics['val_loss']:.4f}, sparsity {sparsity:.2%}"
                      f"{recalibration_note(meta.get('bn_recalibration'))}")
    return result


def recalibration_note(record: dict | None) -> str:
    """For a checkpoint `prune` wrote: '; BatchNorm re-estimated at prune on N batches' (and the top-1 before
    the re-estimation when `prune --eval` measured it), so `eval` right after a prune shows what it did."""
    if not record:
        return ""
    before = (f" (val top-1 {record['val_acc1_before']:.2f}% before it)"
              if "val_acc1_before" in record else "")
    return f"; BatchNorm re-estimated at prune on {record['batches']} batches{before}"
