"""Benchmark: sparsify checkpoint save+load vs plain safetensors save_file+load_file (resnet50).

Data: torchvision resnet50 (random weights) after one prune round (block 8x8, variance,
target 0.5, step 0.2), its state_dict plus the 52 block masks and metadata like a real prune
stage writes (pattern, settings, per-layer prune log, versions, ...).

  target:   sha = sparsify.io.checkpoint.save_checkpoint(path, state, masks, meta)
            sparsify.io.checkpoint.load_checkpoint(path, expected_sha256=sha)
  baseline: safetensors.torch.save_file(state, path); safetensors.torch.load_file(path)

Files go to a scratch folder inside bench/results/ (git-ignored, the same disk as runs/;
`--dir` to change it) and are deleted at the end. Each file is removed before it is written
again (untimed), so no save pays for replacing an old file. Target and baseline alternate
(ABBA order) every repeat. Loads read what was just written (page cache warm for both).
Also timed for the explanation: the baseline save followed by an fsync, the baseline load
followed by a clone of every tensor (load_file maps the file lazily, so the plain load alone
reads no data), and the parts of the target load (read the file, sha256 of it, parse and check it;
the load runs the hash in a second thread beside the parse and check).

Targets: checkpoint size / plain size <= 1.01; median (save+load) ratio <= 1.3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchutil import RESULTS_DIR, emit, median, parser, progress, ratio, summary, timed  # noqa: E402

TARGET_SIZE_RATIO = 1.01
TARGET_TIME_RATIO = 1.3


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=7)
    p.add_argument("--dir", default=RESULTS_DIR, help="folder for the scratch files (default bench/results/)")
    args = p.parse_args()

    import safetensors
    import safetensors.torch as st
    import torch
    import torchvision

    from sparsify.io.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.block import BlockPattern
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    torch.manual_seed(0)
    progress("building resnet50 and pruning one round")
    model = torchvision.models.resnet50()
    pattern = BlockPattern(8, 8)
    eligible = [l.name for l in find_layers(model, pattern, include_linear=False, exclude=[]) if l.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="variance", target=0.5, step=0.2)
    masks, log = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    MaskEnforcer(model, masks, pattern).apply_()
    state = model.state_dict()
    meta = {
        "arch": "resnet50", "num_classes": 1000, "in_channels": 3, "input_size": 224,
        "round": 1, "stage": "pruned", "pattern": pattern.spec(), "criterion": "variance", "target": 0.5,
        "sparsity_config": {"pattern": pattern.spec(), "criterion": "variance", "target": 0.5, "step": 0.2,
                            "step_basis": "remaining", "scope": "layer", "keep_rows": True,
                            "keep_cols": True, "balanced": False, "exclude": []},
        "parent": "000-r00-pretrained.safetensors", "parent_sha256": "0" * 64,
        "config_hash": "0" * 16, "metrics": {},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "safetensors": safetensors.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "prune_log": [[e.name, e.groups, e.zeros_before, e.zeros_after, e.target_zeros, e.note] for e in log],
    }

    scratch = os.path.join(os.path.abspath(args.dir), f"checkpoint_io-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    ckpt_path = os.path.join(scratch, "001-r01-pruned.safetensors")
    plain_path = os.path.join(scratch, "plain.safetensors")
    fsync_path = os.path.join(scratch, "plain-fsync.safetensors")

    def remove(path):
        if os.path.exists(path):
            os.unlink(path)

    def target_once():
        remove(ckpt_path)
        t_save, sha = timed(save_checkpoint, ckpt_path, state, masks, meta)
        t_load, ckpt = timed(load_checkpoint, ckpt_path, expected_sha256=sha)
        return t_save, t_load, ckpt

    def baseline_once():
        remove(plain_path)
        t_save, _ = timed(st.save_file, state, plain_path)
        t_load, loaded = timed(st.load_file, plain_path)
        return t_save, t_load, loaded

    def baseline_load_clone_once():
        def load():
            return {k: v.clone() for k, v in st.load_file(plain_path).items()}
        return timed(load)[0]

    def baseline_fsync_once():
        remove(fsync_path)

        def save():
            st.save_file(state, fsync_path)
            fd = os.open(fsync_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return timed(save)[0]

    def parts_once():
        t_read, data = timed(lambda: open(ckpt_path, "rb").read())
        t_sha, _ = timed(lambda: hashlib.sha256(data).hexdigest())
        t_dec, _ = timed(read_checkpoint, ckpt_path)
        return t_read, t_sha, t_dec

    try:
        progress(f"scratch folder {scratch}; warm-up")
        _, _, ckpt = target_once()
        _, _, plain = baseline_once()
        exact = (
            set(ckpt.state) == set(state)
            and all(torch.equal(ckpt.state[k], state[k]) and ckpt.state[k].dtype == state[k].dtype for k in state)
            and set(ckpt.masks) == set(masks)
            and all(torch.equal(ckpt.masks[k], masks[k]) for k in masks)
            and all(json.loads(json.dumps(meta[k])) == ckpt.meta.get(k) for k in meta)
        )
        plain_exact = all(torch.equal(plain[k], state[k]) for k in state)
        del ckpt, plain
        ckpt_size = os.path.getsize(ckpt_path)
        plain_size = os.path.getsize(plain_path)

        t = {k: [] for k in ("ckpt_save", "ckpt_load", "plain_save", "plain_load", "plain_save_fsync",
                             "plain_load_clone", "read", "sha256", "decode")}
        for rep in range(args.repeats):
            order = ("target", "baseline") if rep % 2 == 0 else ("baseline", "target")
            for kind in order:
                if kind == "target":
                    s, l, _ = target_once()
                    t["ckpt_save"].append(s)
                    t["ckpt_load"].append(l)
                else:
                    s, l, _ = baseline_once()
                    t["plain_save"].append(s)
                    t["plain_load"].append(l)
            t["plain_save_fsync"].append(baseline_fsync_once())
            t["plain_load_clone"].append(baseline_load_clone_once())
            read, sha, dec = parts_once()
            t["read"].append(read)
            t["sha256"].append(sha)
            t["decode"].append(dec)
            progress(f"repeat {rep + 1}/{args.repeats}: sparsify save {t['ckpt_save'][-1]:.3f} s + load "
                     f"{t['ckpt_load'][-1]:.3f} s; plain save {t['plain_save'][-1]:.3f} s + load "
                     f"{t['plain_load'][-1]:.3f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    totals_ckpt = [a + b for a, b in zip(t["ckpt_save"], t["ckpt_load"])]
    totals_plain = [a + b for a, b in zip(t["plain_save"], t["plain_load"])]
    paired = [a / b for a, b in zip(totals_ckpt, totals_plain)]
    med = {k: median(v) for k, v in t.items()}
    time_ratio = median(totals_ckpt) / median(totals_plain)
    size_ratio = ckpt_size / plain_size
    result = {
        "benchmark": "checkpoint_io",
        "model": "torchvision resnet50, random weights, after one prune round",
        "tensors": {"state_dict": len(state), "masks": len(masks)},
        "scratch_dir": os.path.abspath(args.dir) + " (same disk as runs/; files deleted afterwards)",
        "repeats": args.repeats,
        "size_bytes": {"sparsify_checkpoint": ckpt_size, "plain_safetensors": plain_size,
                       "difference": ckpt_size - plain_size},
        "size_ratio": round(size_ratio, 6),
        "seconds": {
            "sparsify_save": summary(t["ckpt_save"]),
            "sparsify_load": summary(t["ckpt_load"]),
            "sparsify_save_plus_load": summary(totals_ckpt),
            "plain_save": summary(t["plain_save"]),
            "plain_load": summary(t["plain_load"]),
            "plain_save_plus_load": summary(totals_plain),
            "plain_save_with_fsync": summary(t["plain_save_fsync"]),
            "plain_load_then_clone_all": summary(t["plain_load_clone"]),
        },
        "sparsify_parts_s": {
            "read_file": summary(t["read"]),
            "sha256": summary(t["sha256"]),
            "parse_and_check": summary(t["decode"]),
        },
        "ratios": {
            "save_plus_load": round(time_ratio, 4),
            "save": ratio(med["ckpt_save"], med["plain_save"]),
            "load": ratio(med["ckpt_load"], med["plain_load"]),
            "save_over_plain_save_with_fsync": ratio(med["ckpt_save"], med["plain_save_fsync"]),
            "load_over_plain_load_then_clone_all": ratio(med["ckpt_load"], med["plain_load_clone"]),
            "paired_save_plus_load_median": round(median(paired), 4),
            "save_plus_load_over_durable_materialized_plain": ratio(
                median(totals_ckpt), med["plain_save_fsync"] + med["plain_load_clone"]),
        },
        "checks": {"sparsify_roundtrip_bit_exact": exact, "plain_roundtrip_bit_exact": plain_exact},
        "target": {"size_ratio_max": TARGET_SIZE_RATIO, "save_plus_load_ratio_max": TARGET_TIME_RATIO},
        "pass_size": size_ratio <= TARGET_SIZE_RATIO,
        "pass_time": time_ratio <= TARGET_TIME_RATIO,
        "pass": bool(size_ratio <= TARGET_SIZE_RATIO and time_ratio <= TARGET_TIME_RATIO and exact),
    }
    emit(result)


if __name__ == "__main__":
    main()
