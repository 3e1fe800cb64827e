"""Benchmark: train-loop images/s for several thread settings, on an idle machine and under CPU load.

Workload (`--workload quickstart`, the default): what `sparsify run -c configs/quickstart.yaml`
trains: `tiny_resnet` (1 -> 16/32/64 channels) on the embedded 8x8 digits, batch 32, masks from
one block 8x8 round (variance, target 0.5, step 0.2), SGD lr 0.05 momentum 0.9 weight decay 5e-4,
through `sparsify.data.datasets.build_loaders` and `sparsify.training.loop.train_epochs`. `--workload resnet18`:
torchvision resnet18 with one block 8x8 round (as in train_throughput.py), 32 random 3 x 112 x 112
images per batch held in memory: large convolutions, where more threads pay off.

Every setting is its own worker process, started once with its environment (OMP_WAIT_POLICY and
OMP_NUM_THREADS must be set before the OpenMP runtime starts) and kept alive; it sets
`torch.set_num_threads` / `torch.set_num_interop_threads`, trains one warm-up call and then
answers "measure" requests: calls of `train_epochs(..., epochs=1, limit=--batches)` until
`--seconds` have passed; images/s = images / wall time of those calls.

Conditions: `idle` (nothing started by the script), `load` (one busy-loop process, any CPU) and
`load_pinned` (one busy-loop process pinned to the last allowed CPU). A load process is started
before and stopped after each condition block, and stops by itself after `--load-limit` seconds.
Repeats interleave: every repeat runs every condition, and within it every setting, in an order
rotated each repeat. Reported: the median images/s per setting and condition, the ratio to the
baseline (torch's default threads, idle, same run), and per condition the ratio of every setting
to the baseline setting under the same condition. Target (`pass`): the setting that `auto`
resolves to on this machine (`sparsify.threads.auto_threads`, OMP_NUM_THREADS ignored) keeps at
least half of its idle throughput under one busy process, and is not slower than torch's default
under load. On a machine that other jobs already keep busy the first part cannot hold: read
`environment.cpu_pressure_some_avg60_pct`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _benchutil import emit, environment, median, parser, progress, ratio, summary  # noqa: E402

TARGET_LOADED_OVER_IDLE = 0.5
BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def settings_for(cores: int) -> list[dict]:
    """The thread settings measured: name, torch threads, interop threads, extra environment."""
    found = [
        {"name": f"threads={cores} (torch default)", "threads": None, "interop": None, "env": {}},
        {"name": f"threads={cores}, OMP_WAIT_POLICY=PASSIVE", "threads": None, "interop": None,
         "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
        {"name": f"threads={cores}, interop=1", "threads": None, "interop": 1, "env": {}},
    ]
    if cores > 2:
        found.append({"name": f"threads={cores - 1}", "threads": cores - 1, "interop": None, "env": {}})
        found.append({"name": f"threads={cores - 1}, OMP_WAIT_POLICY=PASSIVE", "threads": cores - 1,
                      "interop": None, "env": {"OMP_WAIT_POLICY": "PASSIVE"}})
    if cores > 1:
        found.append({"name": "threads=1 (torch.set_num_threads)", "threads": 1, "interop": None, "env": {}})
        found.append({"name": "OMP_NUM_THREADS=1 (environment)", "threads": None, "interop": None,
                      "env": {"OMP_NUM_THREADS": "1"}})
    return found


# ---------------------------------------------------------------- worker process


def build_workload(name: str, batches: int):
    """(model, loader, enforcer, cfg, images per call) for one workload."""
    import torch

    from sparsify.core.masks import MaskEnforcer, full_masks
    from sparsify.core.block import BlockPattern
    from sparsify.core.prune import PruneSettings, find_layers, prune_round
    from sparsify.training.trainer import OptimConfig

    torch.manual_seed(0)
    pattern = BlockPattern(8, 8)
    if name == "quickstart":
        from sparsify.config import DataConfig
        from sparsify.data.datasets import build_loaders
        from sparsify.models.build import build_model

        model = build_model("tiny_resnet", num_classes=10, in_channels=1, weights=None)
        loader, _ = build_loaders(DataConfig(dataset="digits", batch_size=32), input_size=8, num_classes=10,
                                  in_channels=1, seed=0)
        settings = PruneSettings(pattern, "variance", 0.5, 0.2, "remaining", True, True, False)
        cfg = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine")
    else:
        import torchvision
        from torch.utils.data import DataLoader, TensorDataset

        model = torchvision.models.resnet18(num_classes=10)
        gen = torch.Generator().manual_seed(1)
        count = batches * 32
        data = TensorDataset(torch.randn(count, 3, 112, 112, generator=gen),
                             torch.randint(0, 10, (count,), generator=gen))
        loader = DataLoader(data, batch_size=32, shuffle=False)
        settings = PruneSettings(pattern, "variance", 0.5, 0.5, "remaining", True, True, False)
        cfg = OptimConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_schedule="constant")
    eligible = [l.name for l in find_layers(model, pattern, include_linear=False, exclude=[]) if l.reason is None]
    masks, _ = prune_round(dict(model.named_parameters()), full_masks(model, eligible, pattern), settings)
    enforcer = MaskEnforcer(model, masks, pattern)
    enforcer.apply_()
    per_call = min(batches, len(loader)) * loader.batch_size
    return model, loader, enforcer, cfg, per_call


def worker(args) -> None:
    """Serve `measure SECONDS` lines on stdin with one JSON line each on stdout."""
    import torch

    from sparsify.training.loop import train_epochs

    if args.worker_threads:
        torch.set_num_threads(args.worker_threads)
    if args.worker_interop:
        torch.set_num_interop_threads(args.worker_interop)
    model, loader, enforcer, cfg, per_call = build_workload(args.workload, args.batches)
    device = torch.device("cpu")

    def call() -> None:
        train_epochs(model, loader, enforcer=enforcer, cfg=cfg, epochs=1, device=device, limit=args.batches)

    call()  # warm-up
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads(),
                      "interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        seconds = float(line.split()[1])
        images, start = 0, time.perf_counter()
        while True:
            call()
            images += per_call
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        print(json.dumps({"images": images, "seconds": elapsed}), flush=True)


# ---------------------------------------------------------------- parent process


class Worker:
    def __init__(self, setting: dict, args) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        env.update(setting["env"])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", args.workload,
               "--batches", str(args.batches)]
        if setting["threads"]:
            cmd += ["--worker-threads", str(setting["threads"])]
        if setting["interop"]:
            cmd += ["--worker-interop", str(setting["interop"])]
        self.setting = setting
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.setting['name']!r} exited with status {self.proc.wait()}")
        return json.loads(line)

    def measure(self, seconds: float) -> float:
        self.proc.stdin.write(f"measure {seconds}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["images"] / answer["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def start_load(kind: str, limit: float, cpus: list[int]) -> subprocess.Popen | None:
    """One busy-loop process (pinned to the last allowed CPU for `load_pinned`); None for idle."""
    if kind == "idle":
        return None
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(limit)])
    if kind == "load_pinned":
        os.sched_setaffinity(proc.pid, {cpus[-1]})
    time.sleep(0.2)  # let it reach the loop
    return proc


def stop_load(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.kill()
        proc.wait()


def parent(args) -> None:
    from sparsify.threads import auto_threads, usable_cpus

    cpus = sorted(os.sched_getaffinity(0))
    cores = len(cpus)
    settings = settings_for(cores)
    conditions = ["idle", "load", "load_pinned"] if cores > 1 else ["idle", "load"]
    progress(f"workload {args.workload}; {cores} CPUs; {len(settings)} settings x {len(conditions)} conditions x "
             f"{args.repeats} repeats of {args.seconds} s")
    workers = []
    try:
        for setting in settings:
            workers.append(Worker(setting, args))
            progress(f"worker ready: {setting['name']} -> torch threads {workers[-1].info['torch_threads']}, "
                     f"interop {workers[-1].info['interop_threads']}")
        rates = {w.setting["name"]: {c: [] for c in conditions} for w in workers}
        for rep in range(args.repeats):
            order = workers[rep % len(workers):] + workers[: rep % len(workers)]
            for condition in conditions:
                load = start_load(condition, args.load_limit, cpus)
                try:
                    for w in order:
                        rates[w.setting["name"]][condition].append(w.measure(args.seconds))
                finally:
                    stop_load(load)
                progress(f"repeat {rep + 1}/{args.repeats} {condition}: " + ", ".join(
                    f"{name.split(' (')[0]} {r[condition][-1]:.0f}" for name, r in rates.items()) + " img/s")
        info = {w.setting["name"]: {"torch_threads": w.info["torch_threads"],
                                    "interop_threads": w.info["interop_threads"]} for w in workers}
        torch_version = workers[0].info["torch"]
    finally:
        for w in workers:
            w.close()

    baseline = settings[0]["name"]
    med = {name: {c: median(v) for c, v in r.items()} for name, r in rates.items()}
    auto = auto_threads(env={}, cpus=usable_cpus())
    auto_name = next(st["name"] for st in settings  # plain torch.set_num_threads(auto), nothing else changed
                     if not st["env"] and st["interop"] is None and info[st["name"]]["torch_threads"] == auto)
    loaded_over_idle = {name: {c: ratio(m[c], m["idle"], 3) for c in conditions if c != "idle"}
                        for name, m in med.items()}
    worst_auto = min(loaded_over_idle[auto_name].values())
    auto_over_default_loaded = min(ratio(med[auto_name][c], med[baseline][c], 3) for c in conditions if c != "idle")
    env = environment()
    env["torch"] = torch_version
    emit({
        "benchmark": "threads_load",
        "workload": args.workload,
        "cpus": cores,
        "seconds_per_measurement": args.seconds,
        "repeats": args.repeats,
        "settings": {s["name"]: {"env": s["env"], **info[s["name"]]} for s in settings},
        "images_per_s": {name: {c: summary(v, 1.0, 1) for c, v in r.items()} for name, r in rates.items()},
        "ratio_to_baseline_idle": {name: {c: ratio(m[c], med[baseline]["idle"], 3) for c in conditions}
                                   for name, m in med.items()},
        "ratio_to_baseline_same_condition": {name: {c: ratio(m[c], med[baseline][c], 3) for c in conditions}
                                             for name, m in med.items()},
        "loaded_over_idle": loaded_over_idle,
        "baseline": baseline,
        "auto": {"threads": auto, "setting": auto_name, "worst_loaded_over_idle": worst_auto,
                 "worst_loaded_over_default_loaded": auto_over_default_loaded},
        "target": {"auto_loaded_over_idle_min": TARGET_LOADED_OVER_IDLE, "auto_over_default_under_load_min": 1.0},
        "pass": bool(worst_auto >= TARGET_LOADED_OVER_IDLE and auto_over_default_loaded >= 1.0),
        "environment": env,
    })


def main() -> None:
    p = parser(__doc__.splitlines()[0], default_repeats=3)
    p.add_argument("--workload", choices=("quickstart", "resnet18"), default="quickstart")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum seconds per measurement (default 2)")
    p.add_argument("--batches", type=int, default=5, help="batches per train_epochs call (default 5)")
    p.add_argument("--load-limit", type=float, default=120.0,
                   help="a load process stops by itself after this many seconds (default 120)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one setting's process
    p.add_argument("--worker-threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-interop", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
