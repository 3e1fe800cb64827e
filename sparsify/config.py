"""The run config: strict pydantic models of the YAML file plus `--set key=value` overrides.

This module must not import torch: `sparsify --help` and config errors stay fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pydantic import model_validator

from sparsify.errors import ConfigError, SparsifyError, path_problem, shown
from sparsify.configcheck import (check_lr_steps, default_pattern, describe_validation_error, home_path,
                                  validate_method_sections, validate_pattern)
from sparsify.recipes import resolve_config_path
from sparsify.yamlfile import apply_override, parse_yaml, read_text
from sparsify.registry import CRITERIA, DATASETS, METHODS, PATTERNS, load_plugins
from sparsify.threads import MAX_THREADS


MAX_NAME = 128  # run folder names: file systems allow 255 bytes, and the files inside add their own
MAX_LR = 10.0  # no optimizer here trains with a larger step; 1e308 or inf only turns weights into NaN
MAX_WEIGHT_DECAY = 1.0  # recipes use 1e-4 to 0.1; 1e308 overflows the optimizer's float32 arithmetic


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # .inf / .nan are refused


class ModelConfig(_Section):
    arch: str = "tiny_resnet"  # torchvision name, built-in name, or "pkg.module:factory"
    weights: Optional[str] = None  # weights enum name (DEFAULT, IMAGENET1K_V2), a local file, or null
    num_classes: Optional[int] = Field(default=None, ge=1)  # null: the dataset's class count
    input_size: Optional[int] = Field(default=None, ge=1, le=4096)  # null: the dataset's native size
    in_channels: Optional[int] = Field(default=None, ge=1)  # null: the dataset's channel count

    _home = field_validator("weights")(classmethod(lambda cls, value: home_path(value)))  # ~/w.pth as the shell


class DataConfig(_Section):
    dataset: str = "digits"  # a registered dataset: digits | fashion-mnist | cifar10 | cifar100 | imagefolder | fake
    root: Optional[str] = None  # imagefolder: root/train + root/val; fashion-mnist: the IDX folder
    batch_size: int = Field(default=64, ge=1)
    workers: int = Field(default=0, ge=0)
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # digits: share held out for validation
    fake_samples: int = Field(default=64, ge=1, le=10_000_000)  # fake: images per split
    limit_train_batches: Optional[int] = Field(default=None, ge=1)  # cap batches per epoch (smoke runs)
    limit_val_batches: Optional[int] = Field(default=None, ge=1)
    download: bool = False  # cifar10/cifar100: torchvision may download the files when missing
    verify_checksums: bool = True  # cifar10/cifar100: read only the official files (md5); false for files you trust
    prefetch: int = Field(default=2, ge=1)  # batches each worker loads ahead (workers > 0)
    decoder: Literal["auto", "pil", "torchvision"] = "auto"  # imagefolder: how image files are decoded
    auto_augment: Optional[Literal["imagenet", "rand", "trivial", "augmix"]] = None  # imagefolder train policy
    random_erase: float = Field(default=0.0, ge=0.0, le=1.0)  # imagefolder train: probability of erasing a patch
    mixup_alpha: float = Field(default=0.0, ge=0.0)  # > 0: MixUp on train batches (soft targets)
    cutmix_alpha: float = Field(default=0.0, ge=0.0)  # > 0: CutMix on train batches (soft targets)

    _home = field_validator("root")(classmethod(lambda cls, value: home_path(value)))  # ~/data as the shell

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        try:
            DATASETS.get(value)
        except SparsifyError as exc:
            raise ValueError(str(exc)) from None
        return value


class PermuteConfig(_Section):
    enabled: bool = False  # nm: search input-channel permutations before the first prune
    # the search's budget for the whole model: iterations (a batch of candidate swaps, or an escape); the
    # masks depend on the seed and this budget only (rounds/permute.py: DEFAULT_MAX_ITERATIONS, the same 2000)
    max_iterations: int = Field(default=2000, ge=1, le=100_000_000)
    time_limit: float = Field(default=120.0, gt=0.0)  # seconds, a safety only: a cut search is machine-dependent


class RewindConfig(_Section):
    """Lottery-ticket rewinding: after each prune the kept weights go back to this point."""

    to: Optional[Literal["init", "round0"]] = None  # init: weights at download | round0: after the dense training
    epoch: Optional[int] = Field(default=None, ge=1)  # or: weights after this many epochs of round 0's training

    @model_validator(mode="after")
    def _one_point(self) -> "RewindConfig":
        if (self.to is None) == (self.epoch is None):
            raise ValueError("rewind takes exactly one of {to: init}, {to: round0} or {epoch: E}")
        return self


class RegroupConfig(_Section):
    """Regroup (seed 002): after each unstructured prune, masks become unions of dense blocks."""

    enabled: bool = False  # regroup every pruned layer's mask after the prune
    clusters: int = Field(default=8, ge=1)  # row clusters per layer (the seed's cn)
    growth: float = Field(default=1.5, gt=0.0)  # block widens until > growth x every row's weights outside it (t1)
    split_rows: int = Field(default=32, ge=1)  # a cluster with more rows becomes two blocks (nn)
    min_rows: int = Field(default=16, ge=0)  # a cluster with at most this many rows is dropped (B2)


class SparsityConfig(_Section):
    pattern: Any = Field(default_factory=default_pattern)  # {type: <registered pattern>, ...its options}
    method: str = "static"  # a registered method: static (masks from prune rounds) | dsr | gumbel | gradual
    criterion: str = "variance"  # a registered criterion: variance | l1 | l2 | taylor | random
    target: float = Field(default=0.5, ge=0.0, lt=1.0)  # share of each layer's groups that end up zero
    step: float = Field(default=0.2, gt=0.0, le=1.0)  # share zeroed per round (see step_basis)
    step_basis: Literal["remaining", "target"] = "remaining"
    scope: Literal["layer", "global"] = "layer"  # global: one ranking over all eligible layers (unstructured:
    # target = share of the eligible weights; channel: share of the model's multiply-adds)
    criterion_batches: int = Field(default=8, ge=1)  # taylor: training batches whose gradients are accumulated
    recalibrate_bn: int = Field(default=20, ge=0)  # training batches that re-estimate BatchNorm after a prune; 0: off
    rewind: Optional[RewindConfig] = None  # null | {to: init} | {to: round0} | {epoch: E}
    regroup: RegroupConfig = Field(default_factory=RegroupConfig)  # unstructured: dense blocks after each prune
    keep_rows: bool = True  # no output block loses all its input blocks
    keep_cols: bool = True  # no input block is dropped by every output block
    balanced: bool = False  # every output block keeps the same share of its input blocks
    include_linear: bool = False  # Linear layers are eligible too
    exclude: list[str] = Field(default_factory=list)  # globs over parameter names, e.g. ["fc.*"]
    layers: dict[str, float] = Field(default_factory=dict)  # glob -> that layer's target; first matching glob wins
    allocation: Literal["uniform", "erk", "sensitivity"] = "uniform"  # targets of the layers without an override
    # (core/allocation.py); sensitivity reads runs/<name>/sensitivity.json (`sparsify sensitivity`)
    permute: PermuteConfig = Field(default_factory=PermuteConfig)  # nm: channel permutation before pruning

    # besides these keys, one section per registered method with options: sparsity.dsr, .gumbel, .gradual, ...
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    _pattern = field_validator("pattern", mode="plain")(classmethod(lambda cls, value: validate_pattern(value)))

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data: Any) -> Any:
        return validate_method_sections(data, known=list(cls.model_fields))

    @model_validator(mode="after")
    def _pattern_rules(self) -> "SparsityConfig":
        try:
            PATTERNS.get(self.pattern.type).apply_config_rules(self, self.model_fields_set)
        except SparsifyError as exc:
            raise ConfigError(str(exc)) from None
        return self

    @field_validator("layers")
    @classmethod
    def _layer_targets(cls, value: dict[str, float]) -> dict[str, float]:
        for glob, target in value.items():
            if not 0.0 <= target < 1.0:
                raise ValueError(f"target {target!r} for {shown(glob)} must be in [0, 1); 0.0 keeps the layer dense")
        return value

    @model_validator(mode="after")
    def _per_layer_rules(self) -> "SparsityConfig":
        if not self.layers and self.allocation == "uniform":
            return self
        keys = " and ".join(k for k, on in (("sparsity.layers", self.layers),
                                            (f"allocation: {self.allocation}", self.allocation != "uniform")) if on)
        if self.scope == "global":
            raise ConfigError(f"{keys}: per-layer targets, which scope 'global' (one ranking over all layers "
                              "towards one model-wide target) does not have; use scope: layer")
        if not METHODS.get(self.method).prune_rounds:
            raise ConfigError(f"{keys}: per-layer targets apply to prune rounds; method {self.method} "
                              "has none, so remove them or use method: static")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str, info: ValidationInfo) -> str:
        pattern_type = getattr(info.data.get("pattern"), "type", "block")
        try:
            method = METHODS.get(value)
        except SparsifyError as exc:
            raise ValueError(str(exc)) from None
        if pattern_type not in method.patterns:
            raise ValueError(f"method {value} works with pattern {' or '.join(method.patterns)}, not {pattern_type}; "
                             f"set sparsity.pattern.type to {method.patterns[0]}")
        return value

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        try:
            CRITERIA.get(value)
        except SparsifyError as exc:
            raise ValueError(str(exc)) from None
        return value


class ScheduleConfig(_Section):
    dense_epochs: int = Field(default=1, ge=0)
    epochs_per_round: int = Field(default=1, ge=0)
    final_epochs: int = Field(default=0, ge=0)
    max_rounds: int = Field(default=100, ge=1)  # safety cap for `sparsify run`


class EmaConfig(_Section):
    decay: float = Field(default=0.9999, gt=0.0, lt=1.0)  # per update: ema = decay * ema + (1 - decay) * weights
    every: int = Field(default=32, ge=1)  # optimizer steps between EMA updates


class DistillConfig(_Section):
    """Knowledge distillation: loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy."""

    teacher: str = Field(default="dense", min_length=1)  # dense: the run's last round-0 checkpoint | a checkpoint PATH
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)  # weight of the distillation term
    temperature: float = Field(default=4.0, gt=0.0)  # T: softens both distributions

    _home = field_validator("teacher")(classmethod(lambda cls, value: home_path(value)))  # ~/x.safetensors


class TrainConfig(_Section):
    epochs: int = Field(default=1, ge=1)  # per `sparsify train` unless --epochs is given
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.001, gt=0.0, le=MAX_LR)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0001, ge=0.0, le=MAX_WEIGHT_DECAY)
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"  # within one train stage
    lr_steps: list[int] = Field(default_factory=list)  # step schedule: epochs (of the stage) where lr *= lr_gamma
    lr_gamma: float = Field(default=0.1, gt=0.0)  # step schedule: factor at each of lr_steps
    warmup_epochs: float = Field(default=0.0, ge=0.0)  # linear warmup from lr/steps to lr over these epochs
    warmup_steps: Optional[int] = Field(default=None, ge=0)  # the same in optimizer steps (wins over warmup_epochs)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)  # cross-entropy label smoothing
    clip_grad_norm: Optional[float] = Field(default=None, gt=0.0)  # clip the global gradient norm; null: off
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast dtype; fp16 adds a GradScaler
    channels_last: bool = False  # NHWC memory format for model and images
    compile: bool = False  # torch.compile the model (slow first steps)
    ema: Optional[EmaConfig] = None  # exponential moving average of the weights; null: off
    distill: Optional[DistillConfig] = None  # knowledge distillation from a teacher model; null: off
    deterministic: bool = False  # deterministic kernels and seeded workers (bit-exact resume)
    save_every_steps: Optional[int] = Field(default=None, ge=1)  # write train-state every N steps; null: off
    save_every_minutes: Optional[float] = Field(default=10.0, gt=0.0)  # ... and/or every N minutes; null: off
    log_every: int = Field(default=50, ge=1)  # steps between rows of metrics.csv
    tensorboard: bool = False  # also log to runs/<name>/tensorboard (needs the tensorboard package)
    trainable: Literal["all", "mask"] = "all"  # mask: only the learned mask logits train (method gumbel)
    threads: Union[Literal["auto"], int] = "auto"  # torch CPU threads: auto (see sparsify.threads) | N >= 1

    @field_validator("threads", mode="plain")
    @classmethod
    def _threads(cls, value: Any) -> Union[str, int]:
        if value == "auto" or (type(value) is int and 1 <= value <= MAX_THREADS):
            return value
        raise ValueError(f"must be auto or an integer >= 1 and at most {MAX_THREADS} (torch CPU threads; those "
                         "beyond the CPUs only wait for each other), e.g. threads: 1")

    _lr_steps = field_validator("lr_steps")(classmethod(lambda cls, value: check_lr_steps(value)))

    @model_validator(mode="after")
    def _step_schedule_peak(self) -> "TrainConfig":
        """lr_gamma > 1 raises lr at each of lr_steps: the lr it reaches must stay within MAX_LR too."""
        if self.lr_schedule == "step" and self.lr_gamma > 1 and self.lr_steps:
            log_peak = math.log10(self.lr) + len(self.lr_steps) * math.log10(self.lr_gamma)
            if log_peak > math.log10(MAX_LR):
                raise ConfigError(f"config key 'train.lr_gamma': {self.lr_gamma:g} at each of train.lr_steps "
                                  f"{self.lr_steps} takes train.lr {self.lr:g} to 1e{log_peak:.0f}, above {MAX_LR:g}; "
                                  "use a decay (lr_gamma below 1)")
        return self


class ActivationsConfig(_Section):
    """Sparse activations (seed 001): spatial masks after chosen modules; no sites: off."""

    sites: list[str] = Field(default_factory=list)  # globs over module names, e.g. ["layer*.*.bn1"]
    kind: Literal["checkerboard", "static", "dynamic"] = "checkerboard"  # dynamic: a new random mask every forward
    quarters: int = Field(default=2, ge=1, le=4)  # q: positions kept of every 4 (density q/4)
    sparse_batchnorm: bool = True  # BatchNorm2d sites normalise only the kept positions
    dense_inference: bool = False  # evaluation: no mask, outputs scaled by the density


class RunConfig(_Section):
    name: str = "run"
    plugins: list[str] = Field(default_factory=list)  # modules that register patterns, methods, ... (imported first)
    seed: int = Field(default=0, ge=0, lt=2**63)  # torch takes 64-bit seeds
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runs_dir: str = "runs"  # the run folder is <runs_dir>/<name>
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig)  # sparse activations (off without sites)

    _home = field_validator("runs_dir")(classmethod(lambda cls, value: home_path(value)))  # ~/runs as the shell

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("name must be letters, digits, '.', '_' or '-' (it names a folder)")
        if len(value) > MAX_NAME:
            raise ValueError(f"name is {len(value)} characters; at most {MAX_NAME} (it names a folder)")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="after")
    def _method_rules(self) -> "RunConfig":
        try:
            METHODS.get(self.sparsity.method).check_config(self)
        except SparsifyError as exc:
            raise ConfigError(str(exc)) from None
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read the YAML file or shipped recipe (or start from defaults), apply overrides, validate strictly."""
    data: dict = {}
    if path is not None and str(path) == "":
        raise ConfigError("the config path is empty (-c ''); give -c PATH to a YAML file or a shipped recipe's "
                          "name, or leave -c out for the built-in defaults")
    if path is not None:
        path = resolve_config_path(home_path(str(path)))  # a file (~ expanded), or a shipped recipe's name
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} {path_problem(path)}; pass -c PATH to a YAML file "
                              "or a shipped recipe's name (`sparsify recipes` lists them)")
        data = parse_yaml(read_text(path), source=str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    plugins = data.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(m, str) for m in plugins)):
        raise ConfigError(f"config key 'plugins' must be a list of module names, e.g. [mypkg.patterns]; "
                          f"got {shown(plugins)}")
    load_plugins(plugins)  # before validation: their patterns, methods and criteria become valid names
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, RunConfig)) from None


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_hash(config: RunConfig) -> str:
    """sha256 of the resolved config's canonical JSON (first 16 hex digits)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
