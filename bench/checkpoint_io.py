"""Benchmark: durable sparsify checkpoint save+load vs a durable plain safetensors save+load (resnet50).

Data: torchvision resnet50 (random weights) after one prune round (block 8x8, variance,
target 0.5, step 0.2), its state_dict plus the 52 block masks and metadata like a real prune
stage writes (pattern, settings, per-layer prune log, versions, ...).

  target:   sha = sparsify.io.checkpoint.save_checkpoint(path, state, masks, meta)
            sparsify.io.checkpoint.load_checkpoint(path, expected_sha256=sha)
            (atomic: temporary file, fsync, rename, folder fsync; sha256; NaN/inf and pruned-zero checks)
  durable:  safetensors.torch.save_file(state, path) + fsync of the file, then
            safetensors.torch.load_file(path) + a clone of every tensor (load_file maps the file
            lazily; the clone reads every byte, as a load that uses the weights does)
  plain:    save_file + load_file, nothing synced or read (for reference)

Target, durable and plain alternate (rotating order) every repeat; the parts of the sparsify
path are timed in the same repeat on the file it just wrote: serialize (state -> header +
byte views), write (to the page cache), fsync, sha256, map + header, deserialize (views into
the mapping), finite check, pruned-zero check, and for comparison a read() of the whole file.
Files go to a scratch folder inside bench/results/ (git-ignored, the same disk as runs/;
`--dir` to change it), are removed (untimed) before each write and deleted at the end.
With PYTHONPATH pointing at another checkout, the end-to-end part times that checkout's code
(the parts need sparsify.io.tensorfile and are left out without it).

torch runs with the CPU threads a sparsify command uses (`--threads`, default auto: CPUs - 1).

Targets: median (save+load) / median durable (save+load) <= 1.5; checkpoint size / plain size <= 1.01.
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
TARGET_DURABLE_RATIO = 1.5


def pruned_resnet50():
    """(state, masks, pattern, meta) of resnet50 after one block 8x8 prune round."""
    import safetensors
    import torch
    import torchvision

    from sparsify.core.block import BlockPattern
    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.prune import PruneSettings, find_layers, prune_round

    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    pattern = BlockPattern(8, 8)
    eligible = [l.name for l in find_layers(model, pattern, include_linear=False, exclude=[]) if l.reason is None]
    settings = PruneSettings(pattern=pattern, criterion="variance", target=0.5, step=0.2)
    masks, log = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    MaskEnforcer(model, masks, pattern).apply_()
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
    return model.state_dict(), masks, pattern, meta


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def part_timers(state, masks, pattern, meta, scratch: str):
    """A function timing each part of the sparsify path once (dict of seconds), or None for old code."""
    try:
        from sparsify.io import tensorfile
        from sparsify.core.masks import check_masks
        from sparsify.io.checkpoint import _cpu_tensors, nonfinite_entries
    except ImportError:
        return None
    path = os.path.join(scratch, "parts.safetensors")
    metadata = {key: json.dumps(value) for key, value in meta.items()}

    def once() -> dict:
        remove(path)
        t = {}
        t["serialize"], chunks = timed(lambda: tensorfile.encode(
            {**_cpu_tensors(state, "model."), **_cpu_tensors(masks, "mask.")}, metadata))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            t["write"], _ = timed(lambda: [os.write(fd, c) for c in chunks])
            t["fsync"], _ = timed(os.fsync, fd)
        finally:
            os.close(fd)
        t["sha256"], _ = timed(lambda: [hashlib.sha256().update(c) for c in chunks])
        t["map_and_header"], (mapped, (header, start)) = timed(lambda: (m := tensorfile.MappedFile(path), m.header()))
        t["deserialize"], tensors = timed(mapped.tensors, header, start)
        loaded = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        t["sha256_of_mapping"], _ = timed(lambda: hashlib.sha256(memoryview(mapped.buffer)).hexdigest())
        t["finite_check"], _ = timed(nonfinite_entries, loaded)
        t["mask_check"], _ = timed(check_masks, loaded, masks, pattern, source=path)
        t["read_whole_file"], _ = timed(lambda: open(path, "rb").read())
        return t

    return once


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=9)
    p.add_argument("--dir", default=RESULTS_DIR, help="folder for the scratch files (default bench/results/)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: auto (what a sparsify command uses: CPUs - 1) or a number")
    args = p.parse_args()

    import safetensors.torch as st
    import torch

    from sparsify.threads import apply_threads

    apply_threads(args.threads if args.threads == "auto" else int(args.threads))

    import sparsify.io.checkpoint as checkpoint_module
    from sparsify.io.checkpoint import load_checkpoint, save_checkpoint

    progress("building resnet50 and pruning one round")
    state, masks, pattern, meta = pruned_resnet50()
    scratch = os.path.join(os.path.abspath(args.dir), f"checkpoint_io-{os.getpid()}")
    os.makedirs(scratch, exist_ok=True)
    ckpt_path = os.path.join(scratch, "001-r01-pruned.safetensors")
    durable_path = os.path.join(scratch, "durable.safetensors")
    plain_path = os.path.join(scratch, "plain.safetensors")

    def target_once():
        remove(ckpt_path)
        t_save, sha = timed(save_checkpoint, ckpt_path, state, masks, meta)
        t_load, ckpt = timed(load_checkpoint, ckpt_path, expected_sha256=sha)
        return t_save, t_load, ckpt

    def durable_once():
        remove(durable_path)
        t_save, _ = timed(lambda: (st.save_file(state, durable_path), fsync_path(durable_path)))
        t_load, loaded = timed(lambda: {k: v.clone() for k, v in st.load_file(durable_path).items()})
        return t_save, t_load, loaded

    def plain_once():
        remove(plain_path)
        t_save, _ = timed(st.save_file, state, plain_path)
        t_load, loaded = timed(st.load_file, plain_path)
        return t_save, t_load, loaded

    parts_once = part_timers(state, masks, pattern, meta, scratch)
    runs = {"target": target_once, "durable": durable_once, "plain": plain_once}
    t = {f"{kind}_{half}": [] for kind in runs for half in ("save", "load")}
    parts: dict[str, list] = {}
    try:
        progress(f"scratch folder {scratch}; warm-up")
        _, _, ckpt = target_once()
        _, _, durable = durable_once()
        exact = (
            set(ckpt.state) == set(state)
            and all(torch.equal(ckpt.state[k], state[k]) and ckpt.state[k].dtype == state[k].dtype for k in state)
            and set(ckpt.masks) == set(masks) and all(torch.equal(ckpt.masks[k], masks[k]) for k in masks)
            and all(json.loads(json.dumps(meta[k])) == ckpt.meta.get(k) for k in meta)
        )
        readable = st.load_file(ckpt_path)  # safetensors' own reader takes the file as it is
        safetensors_reads_it = all(torch.equal(readable["model." + k], state[k]) for k in state)
        durable_exact = all(torch.equal(durable[k], state[k]) for k in state)
        del ckpt, durable, readable
        sizes = {"sparsify_checkpoint": os.path.getsize(ckpt_path), "plain_safetensors": os.path.getsize(durable_path)}
        if parts_once:
            parts_once()
        order = list(runs)
        for rep in range(args.repeats):
            for kind in order[rep % 3:] + order[:rep % 3]:  # rotate who goes first
                save, load, _ = runs[kind]()
                t[f"{kind}_save"].append(save)
                t[f"{kind}_load"].append(load)
            for name, seconds in (parts_once() if parts_once else {}).items():
                parts.setdefault(name, []).append(seconds)
            progress(f"repeat {rep + 1}/{args.repeats}: sparsify {t['target_save'][-1]:.3f} + "
                     f"{t['target_load'][-1]:.3f} s; durable {t['durable_save'][-1]:.3f} + "
                     f"{t['durable_load'][-1]:.3f} s; plain {t['plain_save'][-1]:.3f} + {t['plain_load'][-1]:.3f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    totals = {kind: [a + b for a, b in zip(t[f"{kind}_save"], t[f"{kind}_load"])] for kind in runs}
    med = {k: median(v) for k, v in t.items()}
    durable_ratio = median(totals["target"]) / median(totals["durable"])
    size_ratio = sizes["sparsify_checkpoint"] / sizes["plain_safetensors"]
    result = {
        "benchmark": "checkpoint_io",
        "model": "torchvision resnet50, random weights, after one prune round",
        "code": os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_module.__file__))),
        "tensors": {"state_dict": len(state), "masks": len(masks)},
        "scratch_dir": os.path.abspath(args.dir) + " (same disk as runs/; files deleted afterwards)",
        "repeats": args.repeats,
        "size_bytes": sizes,
        "size_ratio": round(size_ratio, 6),
        "seconds": {
            **{f"{kind}_{half}": summary(t[f"{kind}_{half}"]) for kind in runs for half in ("save", "load")},
            **{f"{kind}_save_plus_load": summary(totals[kind]) for kind in runs},
        },
        "sparsify_parts_s": {name: summary(values) for name, values in parts.items()},
        "ratios": {
            "save_plus_load_over_durable": round(durable_ratio, 4),
            "paired_save_plus_load_over_durable_median": round(median(
                [a / b for a, b in zip(totals["target"], totals["durable"])]), 4),
            "save_over_durable_save": ratio(med["target_save"], med["durable_save"]),
            "load_over_durable_load": ratio(med["target_load"], med["durable_load"]),
            "save_plus_load_over_plain": ratio(median(totals["target"]), median(totals["plain"])),
        },
        "checks": {"sparsify_roundtrip_bit_exact": exact, "safetensors_reads_the_checkpoint": safetensors_reads_it,
                   "durable_roundtrip_bit_exact": durable_exact},
        "target": {"save_plus_load_over_durable_max": TARGET_DURABLE_RATIO, "size_ratio_max": TARGET_SIZE_RATIO},
        "pass_time": durable_ratio <= TARGET_DURABLE_RATIO,
        "pass_size": size_ratio <= TARGET_SIZE_RATIO,
        "pass": bool(durable_ratio <= TARGET_DURABLE_RATIO and size_ratio <= TARGET_SIZE_RATIO and exact
                     and safetensors_reads_it),
    }
    emit(result)


if __name__ == "__main__":
    main()
