"""Benchmark: the accuracy levers of the shell-loop recipe on Fashion-MNIST (`small_resnet`, 8x8 blocks).

Everything runs through the pipeline's stage functions (`download`, `train`, `prune`, `eval_latest`,
`sensitivity`: what `sparsify download/train/prune/eval/sensitivity -c cfg.yaml` call) in run folders
under a temporary directory. One dense run is made first: `download`, then `train` for
`--dense-epochs` epochs. Every arm starts from a copy of that run folder (the bn_sensitivity arms from a
copy that `sensitivity` scanned) and repeats the shell loop of the README,
`while sparsify prune; do sparsify train --epochs 1; done` (8x8 blocks, variance, step 0.2 of the
remaining blocks), until `prune` answers that the target is reached. Arms, each at 50% and 75%:

  * `plain`: no lever (BatchNorm re-estimation off: `sparsity.recalibrate_bn: 0`);
  * `bn`: BatchNorm re-estimation on `--bn-batches` training batches after each prune;
  * `bn_distill`: `bn` + `train.distill: {teacher: dense, alpha: 0.5, temperature: 4.0}`;
  * `bn_erk`: `bn` + `sparsity.allocation: erk`;
  * `bn_sensitivity`: `bn` + `sparsity.allocation: sensitivity` (skipped, with the reason, when
    `sparsify sensitivity --help` does not exit 0);
  * `channel_l1` (50% only): `bn` with `pattern: {type: channel}` and criterion l1, the same loop.

Per arm: top-1 right after each prune (and before the re-estimation), after each round's finetune,
and final. The yardstick: the dense run trained on, one epoch per `train` call, to the same total
number of epochs as each arm. Accuracy after each stage is on the first `--val-batches` x 64 test
images; the final figures (arms and dense) on the first `--final-val-batches` x 64.

`--batches 0 --val-batches 0 --final-val-batches 0` is the full-data run (every training image
each epoch, every test image); `--device cuda --jobs N` runs it on one GPU, N arms at a time.

`--workdir DIR` keeps the run folders and each run's figures (`DIR/progress/*.json`) and resumes:
rerun the same command after a kill and every finished stage is read back, not repeated (a stage
killed half-way resumes from its train-state like `sparsify train` does).

By default subsampled to fit the shared 2-core machine: an epoch is `--batches` batches of 64 (a fresh shuffle of
the 60k training images per stage), the dense reference gets the same. SGD momentum 0.9, lr 0.05 cosine
within each train call, weight decay 5e-4. The reference and the arms run `--jobs` at a time in worker
processes with one torch thread each (the figures do not depend on it: every stage is seeded).
Goals (reported, `pass` when all are met): top-1 right after every prune round with re-estimation
>= 85%; final top-1 >= dense - 0.3 points at 50% and dense - 0.6 at 75%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import emit, progress  # noqa: E402

DISTILL = {"teacher": "dense", "alpha": 0.5, "temperature": 4.0}
ARMS = {  # name -> (lever overrides on top of the recipe, whether it re-estimates BatchNorm)
    "plain": ({"sparsity.recalibrate_bn": 0}, False),
    "bn": ({}, True),
    "bn_distill": ({"train.distill": DISTILL}, True),
    "bn_erk": ({"sparsity.allocation": "erk"}, True),
    "bn_sensitivity": ({"sparsity.allocation": "sensitivity"}, True),
    "channel_l1": ({"sparsity.pattern": {"type": "channel"}, "sparsity.criterion": "l1"}, True),
}
TARGETS = {"50": 0.5, "75": 0.75}
CHANNEL_TARGETS = ("50",)  # the channel arm sits beside 8x8@50% only
GOAL_AFTER_PRUNE = 85.0
GOAL_MARGIN = {"50": 0.3, "75": 0.6}
SENSITIVITY_LEVELS = (0.25, 0.5, 0.75, 0.9)
FULL_TEST_BATCHES = 157  # the 10,000 test images in batches of 64
PRIORITY = ("bn_erk", "bn_sensitivity", "bn", "bn_distill", "channel_l1", "plain")  # first to run, 75% before 50%
SETTINGS = ("dense_epochs", "batches", "val_batches", "final_val_batches", "bn_batches", "seed", "device")


def progress_path(root: str, key: str) -> str:
    return os.path.join(root, "progress", f"{key}.json")


def saved(root: str, key: str) -> dict | None:
    """The figures a run recorded so far under `--workdir` (None: none yet)."""
    path = progress_path(root, key)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def save(root: str, key: str, data: dict) -> None:
    """Record a run's figures so far, atomically (a kill leaves the previous version)."""
    path = progress_path(root, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(f"{path}.tmp", path)


def saved_reference(root: str) -> dict:
    """The dense reference's figures recorded so far, keyed by epoch (JSON keeps the keys as text)."""
    done = saved(root, "dense-reference") or {"acc1_per_epoch": {}, "acc1_final": {}}
    return {part: {int(epoch): value for epoch, value in done[part].items()} for part in done}


def check_settings(root: str, args) -> None:
    """A work folder resumes only the run it was made for: the figures depend on these settings."""
    wanted = {name: getattr(args, name) for name in SETTINGS}
    found = saved(root, "settings")
    if found is None:
        save(root, "settings", wanted)
    elif found != wanted:
        differ = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v)
        sys.exit(f"--workdir {root} holds a run with other settings ({differ}); rerun with those settings "
                 "or give another --workdir")


def latest(config) -> tuple[dict, dict]:
    """The metadata of the run's latest checkpoint and its history line (`sparsity`, `metrics`)."""
    from pathlib import Path

    from sparsify.io.checkpoint import decode_metadata, read_metadata
    from sparsify.io.rundir import RunDir

    run = RunDir(Path(config.run_dir))
    path = run.latest()
    if path is None:
        return {}, {}
    entry = next((e for e in reversed(run.history()) if e.get("checkpoint") == path.name and e.get("stage") != "eval"),
                 {})
    return decode_metadata(read_metadata(path), path), entry


def recipe_overrides(args, runs_dir: str) -> dict:
    """The shared config: small_resnet on Fashion-MNIST, the shell-loop recipe, the subsample."""
    root = {"data.root": args.data_root} if args.data_root else {}
    return {"runs_dir": runs_dir, "device": args.device, "seed": args.seed, "model.arch": "small_resnet",
            "data.dataset": "fashion-mnist", "data.batch_size": 64, "data.limit_train_batches": limit(args.batches),
            "data.limit_val_batches": limit(args.val_batches), "train.optimizer": "sgd", "train.lr": 0.05,
            "train.momentum": 0.9, "train.weight_decay": 5e-4, "train.lr_schedule": "cosine",
            "sparsity.pattern": {"type": "block", "block": [8, 8]}, "sparsity.criterion": "variance",
            "sparsity.step": 0.2, "sparsity.target": 0.5, "sparsity.recalibrate_bn": args.bn_batches, **root}


def limit(batches: int) -> int | None:
    """A batch count from the command line: 0 means no limit (the whole split)."""
    return batches or None


def make_config(base: dict, name: str, extra: dict | None = None):
    from sparsify.config import load_config

    values = {**base, "name": name, **(extra or {})}
    return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) or v is None else v}"
                              for k, v in values.items()])


def sensitivity_command_exists() -> tuple[bool, str]:
    """Whether `sparsify sensitivity --help` exits 0 (the allocation's scan is there)."""
    proc = subprocess.run([sys.executable, "-m", "sparsify", "sensitivity", "--help"], capture_output=True, text=True)
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode == 0, (tail[-1] if tail else f"exit status {proc.returncode}")


def final_top1(config, val_batches: int) -> float:
    """Top-1 of the run's latest checkpoint on the first `val_batches` test batches (`sparsify eval`)."""
    from sparsify.stages import eval_latest

    wider = config.model_copy(update={"data": config.data.model_copy(update={"limit_val_batches": val_batches})})
    return round(eval_latest(wider).metrics["val_acc1"], 2)


def make_dense(base: dict, args, name: str, extra: dict) -> dict:
    """download + dense training; the dense run's figures. A run records its pattern, so the channel arm
    gets its own dense run (same seed and budget: the same model). Resumes a run folder it finds."""
    from sparsify.stages import download, train

    root = base["runs_dir"]
    if (done := saved(root, name)) is not None:
        return done
    started = time.perf_counter()
    config = make_config(base, name, extra)
    meta, _ = latest(config)
    if not meta:
        download(config)
    if meta.get("stage") != "trained":
        progress(f"{name}: {args.dense_epochs} epoch(s) of {args.batches or 'all'} batches")
        train(config, epochs=args.dense_epochs)
    dense = {"epochs": args.dense_epochs, "acc1": round(latest(config)[0]["metrics"]["val_acc1"], 2),
             "acc1_final_val": final_top1(config, limit(args.final_val_batches)),
             "seconds": round(time.perf_counter() - started, 1)}
    save(root, name, dense)
    return dense


def scan_dense(root: str, base: dict, args) -> dict:
    """`sparsify sensitivity` on a copy of the dense run (`dense-sensitivity`, where the bn_sensitivity arms start)."""
    from sparsify.stages.sensitivity import ScanSettings, sensitivity
    from sparsify.threads import apply_threads

    apply_threads("auto")
    if (done := saved(root, "dense-sensitivity")) is not None:
        return done
    started = time.perf_counter()
    config = branch(root, base, "dense-sensitivity", {})
    progress("sensitivity scan of the dense checkpoint")  # the scan keeps the layers it measured before a kill
    data = sensitivity(config, ScanSettings(levels=SENSITIVITY_LEVELS, batches=args.val_batches or FULL_TEST_BATCHES))
    done = {"levels": list(SENSITIVITY_LEVELS), "val_batches": args.val_batches, "layers": len(data["layers"]),
            "seconds": round(time.perf_counter() - started, 1)}
    save(root, "dense-sensitivity", done)
    return done


def branch(root: str, base: dict, name: str, extra: dict, dense: str = "dense"):
    """A copy of the dense run folder `dense` under `name` (kept if there already), and its config."""
    target = os.path.join(root, name)
    if not os.path.isdir(target):  # copied whole or not at all
        shutil.rmtree(f"{target}.partial", ignore_errors=True)
        shutil.copytree(os.path.join(root, dense), f"{target}.partial")
        os.replace(f"{target}.partial", target)
    return make_config(base, name, extra)


def prune_and_measure(config, bn: bool, recorded: list[dict]) -> dict | None:
    """One `sparsify prune` (None once the target is reached) and top-1 right after it; a prune that
    ran but was not recorded (killed before) is measured, not repeated."""
    from sparsify.errors import TargetReached
    from sparsify.stages import eval_latest, prune

    meta, entry = latest(config)
    if not (meta.get("stage") == "pruned" and meta["round"] not in {row["round"] for row in recorded}):
        try:
            prune(config, show_eval=bn)
        except TargetReached:
            return None
        meta, entry = latest(config)
    row = {"round": meta["round"], "sparsity": round(entry["sparsity"], 4)}
    if bn:
        recal = meta.get("bn_recalibration", {})
        row["acc1_before_bn"] = round(recal["val_acc1_before"], 2)
        row["acc1_after_prune"] = round(recal["val_acc1_after"], 2)
    else:
        row["acc1_after_prune"] = round(eval_latest(config).metrics["val_acc1"], 2)
    return row


def finetune_once(config, row: dict) -> None:
    """`sparsify train --epochs 1` after the round's prune (read back when it ran but was not recorded)."""
    from sparsify.stages import train

    meta, _ = latest(config)
    if not (meta.get("stage") == "trained" and meta["round"] == row["round"]):
        train(config, epochs=1)
        meta, _ = latest(config)
    row["acc1_after_finetune"] = round(meta["metrics"]["val_acc1"], 2)


def run_arm(root: str, base: dict, args, name: str, target: str) -> dict:
    """The shell loop on a copy of the dense run until prune reports the target reached (resumed from
    what `--workdir` recorded)."""
    from sparsify.threads import apply_threads

    apply_threads("auto")
    key = f"{name}@{target}"
    state = saved(root, key) or {"rounds": []}
    if "acc1_final" in state:
        return state
    overrides, bn = ARMS[name]
    started = time.perf_counter()
    dense = "dense"
    if "sparsity.pattern" in overrides:  # a run records its pattern: the channel arm needs its own dense run
        dense = "dense-channel"
        state["own_dense_run"] = make_dense(base, args, dense, overrides)
    elif overrides.get("sparsity.allocation") == "sensitivity":
        dense = "dense-sensitivity"  # scanned by scan_dense before this arm starts
    config = branch(root, base, f"{name}-{target}", {**overrides, "sparsity.target": TARGETS[target]}, dense)
    rounds = state["rounds"]
    while True:
        if not rounds or "acc1_after_finetune" in rounds[-1]:
            if len(rounds) >= args.max_rounds:
                break
            row = prune_and_measure(config, bn, rounds)
            if row is None:
                break
            rounds.append(row)
            save(root, key, state)
        finetune_once(config, rounds[-1])
        save(root, key, state)
        progress(f"{key}: {rounds[-1]}")
    state.update({"epochs": args.dense_epochs + len(rounds), "sparsity": rounds[-1]["sparsity"] if rounds else 0.0,
                  "acc1_final": final_top1(config, limit(args.final_val_batches)),
                  "seconds": round(state.get("seconds", 0) + time.perf_counter() - started, 1)})
    save(root, key, state)
    if not args.workdir:
        shutil.rmtree(config.run_dir)
    return state


def dense_reference(root: str, base: dict, args, upto: int) -> dict:
    """The dense run trained on, one epoch per `train` call, to `upto` epochs in all (on from what was
    recorded); top-1 after every epoch, on the stage's and on the final test images."""
    from sparsify.stages import train
    from sparsify.threads import apply_threads

    apply_threads("auto")
    done = saved_reference(root)
    config = branch(root, base, "dense-reference", {})
    for epoch in range(args.dense_epochs + len(done["acc1_per_epoch"]) + 1, upto + 1):
        if epochs_trained(config, args.dense_epochs) < epoch:  # else trained but not recorded: read it back
            train(config, epochs=1)
        meta, _ = latest(config)
        done["acc1_per_epoch"][epoch] = round(meta["metrics"]["val_acc1"], 2)
        done["acc1_final"][epoch] = final_top1(config, limit(args.final_val_batches))
        save(root, "dense-reference", done)
        progress(f"dense reference: {epoch} epochs, top-1 {done['acc1_final'][epoch]}")
    return done


def epochs_trained(config, dense_epochs: int) -> int:
    """Epochs behind the latest checkpoint of the dense reference: the dense run's, then one per train."""
    from pathlib import Path

    from sparsify.io.rundir import RunDir

    trains = [e for e in RunDir(Path(config.run_dir)).history() if e.get("stage") == "trained"]
    return dense_epochs + len(trains) - 1


def run_jobs(root: str, base: dict, args, plan: list[tuple[str, str]]) -> tuple[dict, dict, dict | None]:
    """The sensitivity scan, the dense reference and every arm (in PRIORITY order, 75% first), `--jobs` at a
    time in worker processes, each bn_sensitivity arm once the scan is done. When an arm ends after more
    epochs than the reference has, the reference trains on to them next (one reference job at a time: it is
    one run folder). Returns (arms, reference, scan)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    order = sorted(plan, key=lambda arm: (-TARGETS[arm[1]], PRIORITY.index(arm[0])))
    needs_scan = any(name == "bn_sensitivity" for name, _ in plan)
    reference_upto = args.dense_epochs + args.reference_rounds
    queue = ([("scan", scan_dense, ())] if needs_scan else []) + [("reference", dense_reference, (reference_upto,))]
    queue += [(f"{name}@{target}", run_arm, (name, target)) for name, target in order]
    results, running = {}, {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        while queue or running:
            ready = [job for job in queue if (not job[0].startswith("bn_sensitivity") or "scan" in results)
                     and (job[0] != "reference" or "reference" not in running.values())]
            for job in ready[:args.jobs - len(running)]:
                queue.remove(job)
                running[pool.submit(job[1], root, base, args, *job[2])] = job[0]
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                results[key] = future.result()
                if "@" in key and results[key]["epochs"] > reference_upto:
                    reference_upto = results[key]["epochs"]
                    queue = [job for job in queue if job[0] != "reference"]
                    queue.insert(0, ("reference", dense_reference, (reference_upto,)))
    arms = {f"{name}@{target}": results[f"{name}@{target}"] for name, target in plan}
    wanted = max([arm["epochs"] for arm in arms.values()] + [args.dense_epochs + 1])
    return arms, dense_reference(root, base, args, wanted), results.get("scan")


def goals(arms: dict, reference: dict) -> dict:
    """The issue's goals per arm: top-1 after each prune with re-estimation, final vs the dense yardstick."""
    after_prune, final = {}, {}
    for key, arm in arms.items():
        if "acc1_final" not in arm or not arm["rounds"]:  # skipped, or still running (--recorded)
            continue
        name, target = key.rsplit("@", 1)
        if name.startswith("channel"):
            continue  # reported beside 8x8@50%, no goal
        if ARMS[name][1]:
            worst = min(r["acc1_after_prune"] for r in arm["rounds"])
            after_prune[key] = {"lowest": worst, "goal": GOAL_AFTER_PRUNE, "by": round(worst - GOAL_AFTER_PRUNE, 2),
                                "met": worst >= GOAL_AFTER_PRUNE}
        dense = reference["acc1_final"].get(arm["epochs"])
        if dense is not None:
            gap = round(arm["acc1_final"] - dense, 2)
            final[key] = {"final": arm["acc1_final"], "dense_same_epochs": dense, "gap": gap,
                          "allowed": -GOAL_MARGIN[target], "by": round(gap + GOAL_MARGIN[target], 2),
                          "met": gap >= -GOAL_MARGIN[target]}
    return {"after_prune_with_bn_ge_85": after_prune, "final_vs_equal_budget_dense": final}


def channel_beside_blocks(arms: dict) -> dict:
    """Final top-1 of filter pruning at 50% of the channels and of 8x8 blocks at 50%, same recipe and budget."""
    pairs = {key: arms[key]["acc1_final"] for key in ("channel_l1@50", "bn@50") if "acc1_final" in arms.get(key, {})}
    return pairs if len(pairs) == 2 else {}


def checks(arms: dict) -> dict:
    """Every 8x8 arm ends on its target sparsity (within one 8x8 block of a layer) and reached it by pruning."""
    landed = {key: abs(arm["sparsity"] - TARGETS[key.rsplit("@", 1)[1]]) <= 0.01 for key, arm in arms.items()
              if "acc1_final" in arm and not key.startswith("channel")}
    return {"block_arms_on_target": all(landed.values()), "per_arm": landed}


LEVERS = {"bn": ("plain", "bn"), "distill": ("bn", "bn_distill"), "erk": ("bn", "bn_erk"),
          "sensitivity": ("bn", "bn_sensitivity")}  # lever -> (arm without it, arm with it)


def lever_effects(arms: dict) -> dict:
    """Per lever and target: what turning it on changed (points): the lowest top-1 right after a prune, the final."""
    effects = {}
    for lever, (off, on) in LEVERS.items():
        for target in TARGETS:
            a, b = arms.get(f"{off}@{target}", {}), arms.get(f"{on}@{target}", {})
            if "acc1_final" in a and "acc1_final" in b and a["rounds"] and b["rounds"]:
                effects[f"{lever}@{target}"] = {
                    "lowest_after_prune": round(min(r["acc1_after_prune"] for r in b["rounds"])
                                                - min(r["acc1_after_prune"] for r in a["rounds"]), 2),
                    "final": round(b["acc1_final"] - a["acc1_final"], 2), "epochs": [a["epochs"], b["epochs"]]}
    return effects


def planned_arms(args) -> list[tuple[str, str]]:
    """(arm, target) pairs of --arms x --targets; the channel arm only beside 8x8@50%."""
    wanted = args.arms.split(",")
    unknown = [a for a in wanted if a not in ARMS]
    if unknown:
        sys.exit(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    return [(name, target) for target in args.targets.split(",") for name in wanted
            if not name.startswith("channel") or target in CHANNEL_TARGETS]


def parse_args():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", 
                   help="smoke run: tiny subsample; plain, bn_distill, channel_l1 at 50%% only")
    p.add_argument("--dense-epochs", type=int, default=4, help="dense epochs before the first prune (default 4)")
    p.add_argument("--batches", type=int, default=24, help="training batches of 64 per epoch (default 24; 0: all 938)")
    p.add_argument("--val-batches", type=int, default=8, help="test batches of 64 after each stage (default 8; 0: all)")
    p.add_argument("--final-val-batches", type=int, default=32, help="test batches of 64 for the finals (default 32; 0: all)")
    p.add_argument("--bn-batches", type=int, default=20, help="sparsity.recalibrate_bn of the bn arms (default 20)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of 50,75")
    p.add_argument("--max-rounds", type=int, default=30, help="safety cap on rounds per arm")
    p.add_argument("--reference-rounds", type=int, default=7,
                   help="epochs the dense reference trains beside the arms (more follow if an arm needs them)")
    p.add_argument("--jobs", type=int, default=2, help="arms run at once, one process and torch thread each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (the arms' jobs share one GPU)")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--workdir", metavar="DIR",
                   help="make the run folders under DIR, keep them and resume from them (rerun the same command)")
    p.add_argument("--recorded", action="store_true",
                   help="print what --workdir recorded so far (finished and running arms), run nothing")
    p.add_argument("--repeats", type=int, default=1, help="ignored (run_all passes it to every bench)")
    args = p.parse_args()
    if args.quick:
        args.dense_epochs, args.batches, args.val_batches, args.final_val_batches = 1, 4, 2, 4
        args.arms, args.targets, args.bn_batches = "plain,bn_distill,channel_l1", "50", 2
        args.reference_rounds = 4
    return args


def main() -> None:
    args = parse_args()
    from sparsify.threads import apply_threads

    threads = apply_threads("auto")  # also in every worker process
    started = time.perf_counter()
    sensitivity_ok, why = sensitivity_command_exists()
    plan = planned_arms(args)
    skipped = {}
    if not sensitivity_ok:
        for name, target in [a for a in plan if a[0] == "bn_sensitivity"]:
            skipped[f"{name}@{target}"] = f"`sparsify sensitivity --help` failed: {why}"
        plan = [a for a in plan if a[0] != "bn_sensitivity"]
    if args.recorded:
        emit(recorded(args, plan, threads, started))
        return
    root = args.workdir or tempfile.mkdtemp(prefix="accuracy_fmnist-")
    if args.workdir:
        os.makedirs(root, exist_ok=True)
        check_settings(root, args)
    try:
        base = recipe_overrides(args, root)
        dense = make_dense(base, args, "dense", {})
        arms, reference, scanned = run_jobs(root, base, args, plan)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    arms.update({key: {"skipped": why} for key, why in skipped.items()})
    emit(result_of(args, threads, dense, scanned, arms, reference, started))


def recorded(args, plan: list[tuple[str, str]], threads: int, started: float) -> dict:
    """What `--workdir` holds so far, as the JSON a finished run prints; arms still running have
    `"finished": false` and stay out of the goals and checks."""
    if not args.workdir or saved(args.workdir, "settings") is None:
        sys.exit("--recorded reads a --workdir that a run has used; give its --workdir")
    check_settings(args.workdir, args)
    arms = {}
    for name, target in plan:
        state = saved(args.workdir, f"{name}@{target}")
        if state is not None:
            arms[f"{name}@{target}"] = {**state, "finished": "acc1_final" in state}
    reference = saved_reference(args.workdir)
    complete = all(arm["finished"] for arm in arms.values()) and len(arms) == len(plan)
    return result_of(args, threads, saved(args.workdir, "dense"), saved(args.workdir, "dense-sensitivity"), arms,
                     reference, started, complete=complete)


def result_of(args, threads: int, dense: dict, scanned: dict | None, arms: dict, reference: dict,
              started: float, complete: bool = True) -> dict:
    """The JSON the script prints: settings, the runs' figures, goals, lever effects, checks."""
    met, check = goals(arms, reference), checks(arms)
    all_met = all(g["met"] for group in met.values() for g in group.values())
    return {"benchmark": "accuracy_fmnist", "model": "small_resnet", "dataset": "fashion-mnist", "threads": threads,
            "recipe": {"pattern": "8x8 blocks", "criterion": "variance", "step": 0.2, "lr": 0.05,
                       "lr_schedule": "cosine per train call", "weight_decay": 5e-4, "bn_batches": args.bn_batches,
                       "distill": DISTILL},
            "subsample": {"batches_per_epoch": args.batches or "all (938)", "batch_size": 64,
                          "dense_epochs": args.dense_epochs,
                          "val_images": min((args.val_batches or FULL_TEST_BATCHES) * 64, 10000),
                          "final_val_images": min((args.final_val_batches or FULL_TEST_BATCHES) * 64, 10000)},
            "device": args.device,
            "quick": args.quick, "dense": dense, "sensitivity_scan": scanned, "arms": arms,
            "dense_reference": reference, "goals": met, "lever_effects": lever_effects(arms),
            "channel_vs_8x8_at_50": channel_beside_blocks(arms), "checks": check,
            "target": "after-prune top-1 with BN >= 85%; final >= dense - 0.3 (50%), - 0.6 (75%)",
            "complete": complete, "pass": complete and all_met and check["block_arms_on_target"],
            "wall_s": round(time.perf_counter() - started, 1)}


if __name__ == "__main__":
    main()
