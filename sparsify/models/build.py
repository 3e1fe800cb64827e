"""Models by name: built-in small ResNets, torchvision classifiers, or a user factory.

Weights come from torchvision's own download API (cached under $TORCH_HOME/hub/checkpoints) or
from a local `.safetensors` / `.pth` file; nothing on the load path unpickles arbitrary objects.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsify.errors import ModelError
from sparsify.registry import MODELS


WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
# torchvision models with auxiliary heads (trained with them, evaluated on the main head):
# the heads and the Linear classifier inside each, replaced with the main one.
AUX_HEAD_ARCHS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}
AUX_CLASSIFIERS = {"inception_v3": ("AuxLogits.fc",), "googlenet": ("aux1.fc2", "aux2.fc2")}
# In train mode inception_v3's aux head pools a 17x17 map with a 5x5 kernel: 299 px at least.
MIN_TRAIN_INPUT_SIZE = {"inception_v3": 299}
FIXED_SIZE_PREFIXES = ("vit_", "maxvit")  # their image size is fixed when they are built
UNKNOWN_ARCH_HINT = (
    "use a torchvision classification model (e.g. resnet50, inception_v3, convnext_tiny), "
    "a built-in one (tiny_resnet, small_resnet) or pkg.module:factory"
)


def print_to_stderr(message: str) -> None:
    """Write one log line to stderr."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- built-in models


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for small images: 3x3 stem, no max-pool, stride 2 between stages, Linear `fc`."""

    def __init__(
        self, *, num_classes: int, in_channels: int, widths: tuple[int, ...], blocks: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        previous = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            stage = [BasicBlock(previous, width, stride=stride)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
            previous = width
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        init_small_resnet_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def init_small_resnet_(model: SmallResNet) -> None:
    """Kaiming-initialise the convs (BatchNorm and Linear keep PyTorch's defaults)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@MODELS.register("tiny_resnet")
def tiny_resnet(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet with stages of 16, 32, 64 channels, one basic block each (about 78k parameters)."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, widths=(16, 32, 64), blocks=1)


@MODELS.register("small_resnet")
def small_resnet(num_classes: int, in_channels: int) -> nn.Module:
    """ResNet with stages of 32, 64, 128 channels, two basic blocks each (about 0.7M parameters)."""
    return SmallResNet(
        num_classes=num_classes, in_channels=in_channels, widths=(32, 64, 128), blocks=2
    )


# ----------------------------------------------------------------------------- building


def torchvision_model_names() -> list[str]:
    """Names of torchvision's classification models (resnet50, inception_v3, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_arch(arch: str) -> bool:
    """True when `arch` names a torchvision classification model."""
    return arch in torchvision_model_names()


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    weights: str | None = None,
    log: Callable[[str], None] = print_to_stderr,
) -> nn.Module:
    """Build `arch` with `num_classes` outputs and load `weights` (a name, a file, or None)."""
    if arch in MODELS:
        model = MODELS.get(arch)(num_classes, in_channels)
    elif ":" in arch:
        model = call_factory(arch, num_classes=num_classes, in_channels=in_channels)
    elif is_torchvision_arch(arch):
        check_torchvision_channels(arch, in_channels)
        if weights is not None and not looks_like_file(weights):
            return build_pretrained_torchvision(arch, weights, num_classes=num_classes, log=log)
        model = build_torchvision(arch, num_classes=num_classes)
    else:
        raise ModelError(f"unknown model {arch!r}; {UNKNOWN_ARCH_HINT}")
    if weights is not None:
        if not looks_like_file(weights):
            raise ModelError(
                f"model.weights {weights!r} is not a file; {arch!r} has no named weights, so "
                f"give a path ending in {', '.join(WEIGHT_FILE_SUFFIXES)} or null"
            )
        load_weights_file(model, Path(weights), log=log)
    return model


def looks_like_file(weights: str) -> bool:
    """True when `weights` is meant as a path (a known suffix or a folder separator)."""
    return weights.endswith(WEIGHT_FILE_SUFFIXES) or "/" in weights or "\\" in weights


def call_factory(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Import `pkg.module:factory` and call it with num_classes (and in_channels if it takes it)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"unknown model {spec!r}; {UNKNOWN_ARCH_HINT}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"model {spec!r}: cannot import module {module_name!r} ({exc}); "
            "install it or add its folder to PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(
            f"model {spec!r}: module {module_name!r} has no callable {attr!r}; "
            "point to a function that returns an nn.Module"
        )
    kwargs = {"num_classes": num_classes}
    if accepts_keyword(factory, "in_channels"):
        kwargs["in_channels"] = in_channels
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the model"
        )
    return model


def accepts_keyword(func: Callable, name: str) -> bool:
    """True when `func` takes a keyword argument `name` (or **kwargs)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_torchvision_channels(arch: str, in_channels: int) -> None:
    """Refuse a channel count other than 3: torchvision stems take RGB input."""
    if in_channels != 3:
        raise ModelError(
            f"torchvision model {arch!r} takes 3 input channels, not model.in_channels={in_channels}; "
            "set model.in_channels: 3 (gray datasets are then repeated to 3 channels)"
        )


def torchvision_kwargs(arch: str, weights=None) -> dict:
    """Builder arguments that make the architecture match its pretrained weights' layout."""
    kwargs: dict = {}
    if arch in AUX_HEAD_ARCHS:
        # transform_input is a flag, not a tensor: set it the same way with or without weights,
        # so a model rebuilt from a checkpoint computes what the pretrained one computed; the
        # aux heads are always built, so both have the same state_dict keys.
        kwargs.update(transform_input=True, aux_logits=True)
        kwargs["init_weights"] = weights is None
    if weights is not None and arch.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if weights is not None and arch.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


def build_torchvision(arch: str, *, num_classes: int, weights=None) -> nn.Module:
    """Build a randomly initialised torchvision model laid out like `weights` (if given)."""
    import torchvision

    kwargs = torchvision_kwargs(arch, weights)
    if arch in MNASNET_ALPHAS:  # what torchvision's mnasnet builders do, with a class that loads safetensors
        return mnasnet_class()(MNASNET_ALPHAS[arch], num_classes=num_classes, **kwargs)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


# torchvision's MNASNet needs the `version` of its state dict's `_metadata` to load; safetensors
# files carry no `_metadata`, so the checkpoints of every stage would be refused.
MNASNET_ALPHAS = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}
MNASNET_V1_STEM_CHANNELS = 32  # version 1 (before torchvision 0.4) had a 32-channel stem for every alpha


def mnasnet_state_version(model: nn.Module, state: dict, prefix: str) -> int:
    """The MNASNet layout `state` was saved from, for a state dict that does not record it.

    Version 2 (the layout torchvision builds today, the one sparsify saves) unless the stem has
    version 1's 32 channels where this alpha's version 2 has others.
    """
    stem = state.get(f"{prefix}layers.0.weight")
    own = model.layers[0].weight
    if stem is not None and stem.shape[0] == MNASNET_V1_STEM_CHANNELS != own.shape[0]:
        return 1
    return 2


_MNASNET_CLASS = None


def mnasnet_class() -> type:
    """torchvision's MNASNet, loading state dicts without `_metadata` as the layout they hold."""
    global _MNASNET_CLASS
    if _MNASNET_CLASS is None:
        from torchvision.models import MNASNet

        class SafetensorsMNASNet(MNASNet):
            """MNASNet that reads its layout version from the tensors when the state dict has no
            `_metadata` (a safetensors file, or a dict rebuilt from one): torchvision's own
            `_load_from_state_dict` refuses such a state."""

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
                if local_metadata.get("version") is None:
                    version = mnasnet_state_version(self, state_dict, prefix)
                    local_metadata = {**local_metadata, "version": version}
                super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

        SafetensorsMNASNet.__qualname__ = "SafetensorsMNASNet"  # pickles as sparsify.models.SafetensorsMNASNet
        _MNASNET_CLASS = SafetensorsMNASNet
    return _MNASNET_CLASS


def __getattr__(name: str):
    """`SafetensorsMNASNet` on first use (torchvision is imported only when a model needs it)."""
    if name == "SafetensorsMNASNet":
        return mnasnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_for_shapes(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` for its structure and shapes only: on the meta device (no memory, no initialisation).

    Some builders need real tensor values (torchvision's RegNet computes its stage widths with
    tensors and `.tolist()`, which meta tensors cannot answer); those are built on the CPU instead.
    """
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        return build()


def resolve_weights(arch: str, name: str):
    """The torchvision weights enum member `name` of `arch` (DEFAULT, IMAGENET1K_V2, ...)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    key = name.removeprefix(enum.__name__ + ".").upper()
    if key not in enum.__members__:
        raise ModelError(
            f"unknown weights {name!r} for {arch}; choose one of: {', '.join(enum.__members__)} "
            "or a local .safetensors/.pth file"
        )
    return enum[key]


def build_pretrained_torchvision(
    arch: str, name: str, *, num_classes: int, log: Callable[[str], None]
) -> nn.Module:
    """Build `arch`, load torchvision weights `name` strictly, then fit the head to num_classes."""
    weights = resolve_weights(arch, name)
    weight_classes = len(weights.meta["categories"])
    model = build_torchvision(arch, num_classes=weight_classes, weights=weights)
    state = fetch_state_dict(arch, weights)
    if arch.startswith("densenet"):
        state = rename_densenet_keys(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"torchvision weights {weights!r} do not fit {arch}: {first_line(exc)}; "
            f"delete {cache_file(weights.url)} if it is not the file from {weights.url}"
        ) from None
    log(f"loaded {arch} weights {weights._name_} ({weight_classes} classes)")
    if num_classes != weight_classes:
        head_name, _ = replace_head_(model, num_classes)
        aux_names = replace_aux_classifiers_(model, arch, num_classes)
        heads = ", ".join([head_name, *aux_names])
        log(
            f"replaced head {heads} ({weight_classes} -> {num_classes} outputs) "
            "with freshly initialised layers"
        )
    return model


def cache_file(url: str) -> Path:
    """Where torch hub keeps (and first looks for) the file downloaded from `url`."""
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / Path(url.split("?")[0]).name


def fetch_state_dict(arch: str, weights) -> dict[str, torch.Tensor]:
    """Download (or read from the torch hub cache) the state dict of torchvision `weights`."""
    target = cache_file(weights.url)
    try:
        return weights.get_state_dict(progress=True, map_location="cpu", weights_only=True)
    except Exception as exc:  # urllib, OS and unpickling errors all mean the same to the user
        if target.is_file():
            raise ModelError(
                f"cannot read cached weights {target} for {arch} ({first_line(exc)}); "
                f"delete it to download again from {weights.url}"
            ) from None
        raise ModelError(
            f"cannot download {arch} weights {weights._name_} from {weights.url} "
            f"({first_line(exc)}); without network, copy that file to {target}"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception message (or its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rename_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map old DenseNet keys (`norm.1.weight`) to the current layout (`norm1.weight`)."""
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    renamed = {}
    for key, value in state.items():
        match = pattern.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def replace_aux_classifiers_(model: nn.Module, arch: str, num_classes: int) -> list[str]:
    """Swap the Linear classifiers of inception_v3/googlenet aux heads for `num_classes` outputs."""
    replaced = []
    for name in AUX_CLASSIFIERS.get(arch, ()):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue  # a model built without aux heads
        parent_name, _, attr = name.rpartition(".")
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        setattr(model.get_submodule(parent_name), attr, new)
        replaced.append(name)
    return replaced


def check_train_input_size(arch: str, input_size: int) -> None:
    """Refuse an input size too small for the architecture's training forward (aux heads)."""
    smallest = MIN_TRAIN_INPUT_SIZE.get(arch)
    if smallest is not None and input_size < smallest:
        raise ModelError(
            f"{arch} trains its auxiliary head only on inputs of at least {smallest} px, not "
            f"model.input_size={input_size}; set model.input_size: {smallest} or more"
        )


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The classifier head: the last Linear, else the last 1x1 Conv2d (squeezenet)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    return convs[-1] if convs else None


def replace_head_(model: nn.Module, num_classes: int) -> tuple[str, nn.Module]:
    """Swap the classifier head for a fresh layer with `num_classes` outputs."""
    found = find_head(model)
    if found is None:
        raise ModelError(
            f"cannot find a classifier head (Linear or 1x1 Conv2d) in {type(model).__name__}; "
            "set model.num_classes to the weights' class count"
        )
    name, old = found
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return name, new


# ----------------------------------------------------------------------------- local weight files


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or `.pth`/`.pt` (plain, or under state_dict/model)."""
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} does not exist; check model.weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelError(
                f"weights file {path} is not a valid safetensors file ({first_line(exc)}); "
                "re-export it with safetensors.torch.save_file"
            ) from None
    if path.suffix not in (".pth", ".pt"):
        raise ModelError(
            f"weights file {path} has suffix {path.suffix!r}; use .safetensors, .pth or .pt"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and corrupt archives alike
        raise ModelError(
            f"weights file {path} cannot be read as tensors ({first_line(exc)}); "
            "save model.state_dict() with torch.save, not the whole model"
        ) from None
    return unwrap_state_dict(data, path)


def unwrap_state_dict(data: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one stored under a "state_dict" or "model" entry."""
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(
            f"weights file {path} holds no state dict of tensors; save model.state_dict(), "
            "optionally under a 'state_dict' or 'model' key"
        )
    return data


def strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a `module.` or `model.` key prefix when that makes the keys match the model."""
    if expected & set(state):
        return state
    for prefix in ("module.", "model."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if expected & set(stripped):
            return stripped
    return state


def load_weights_file(model: nn.Module, path: Path, *, log: Callable[[str], None]) -> None:
    """Load a local state dict strictly, except a head whose shape differs is re-initialised."""
    own = model.state_dict()
    state = strip_prefix(read_weights_file(path), set(own))
    state = drop_absent_aux_keys(state, own)
    skipped = mismatched_head_keys(model, state, own)
    absent_aux = {k for k in own if k.startswith(aux_prefixes()) and k not in state}
    state = {k: v for k, v in state.items() if k not in skipped}
    check_keys(path, own, state, skipped | absent_aux)
    model.load_state_dict(state, strict=False)
    log(f"loaded weights from {path}")
    if skipped:
        log(f"re-initialised head {', '.join(sorted(skipped))}: its shape differs from the file's")
    if absent_aux:
        heads = sorted({k.split(".")[0] for k in absent_aux})
        log(f"auxiliary heads {', '.join(heads)} are not in the file: they start freshly initialised")


def aux_prefixes() -> tuple[str, ...]:
    """State-dict key prefixes of the inception_v3/googlenet auxiliary heads."""
    return tuple(f"{name}." for names in AUX_HEAD_ARCHS.values() for name in names)


def drop_absent_aux_keys(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Ignore inception_v3/googlenet auxiliary-head keys when the model has no such heads."""
    prefixes = aux_prefixes()
    if any(k.startswith(prefixes) for k in own):
        return state
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def mismatched_head_keys(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> set[str]:
    """Head parameter keys present in `state` with a shape other than the model's."""
    found = find_head(model)
    if found is None:
        return set()
    heads = [found[0], *(n for names in AUX_CLASSIFIERS.values() for n in names)]
    keys = {f"{head}.{kind}" for head in heads for kind in ("weight", "bias")}
    return {k for k in keys if k in state and k in own and state[k].shape != own[k].shape}


def check_keys(
    path: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], skipped: set[str]
) -> None:
    """Refuse missing, unexpected or mis-shaped keys, naming the first few."""
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        raise ModelError(
            f"weights file {path} does not fit the model ({'; '.join(problems)}); "
            "check model.arch and that the file holds this architecture's state_dict"
        )


# ----------------------------------------------------------------------------- defaults


def default_input_size(arch: str, *, weights: str | None = None) -> int | None:
    """The image size `arch` expects: its named weights' crop (DEFAULT's without), or None."""
    if arch in MODELS or ":" in arch or not is_torchvision_arch(arch):
        return None
    if arch.startswith(FIXED_SIZE_PREFIXES) and (weights is None or looks_like_file(weights)):
        return 224  # built without named weights, vit/maxvit take their builders' 224 px
    found = preset_weights(arch, weights)
    if found is None:
        return MIN_TRAIN_INPUT_SIZE.get(arch)
    crop = found.transforms().crop_size
    size = int(crop[0]) if isinstance(crop, (list, tuple)) else int(crop)
    return max(size, MIN_TRAIN_INPUT_SIZE.get(arch, 0))


def preset_weights(arch: str, weights: str | None):
    """The torchvision weights whose transforms describe `arch`'s input: named, else DEFAULT."""
    import torchvision

    if weights is not None and not looks_like_file(weights):
        return resolve_weights(arch, weights)
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        return None


def image_preset(arch: str, *, weights: str | None, input_size: int):
    """The eval resize/crop, mean, std and interpolation of `arch`'s weights at `input_size`.

    None for models without torchvision weights (the data side then uses ImageNet's defaults).
    With an input size other than the weights' crop, the resize keeps the weights' ratio.
    """
    from sparsify.data.presets import ImagePreset

    if arch in MODELS or ":" in arch or not is_torchvision_arch(arch):
        return None
    found = preset_weights(arch, weights)
    if found is None:
        return None
    tf = found.transforms()
    crop = int(tf.crop_size[0]) if isinstance(tf.crop_size, (list, tuple)) else int(tf.crop_size)
    resize = int(tf.resize_size[0]) if isinstance(tf.resize_size, (list, tuple)) else int(tf.resize_size)
    return ImagePreset(
        crop_size=input_size,
        resize_size=round(resize * input_size / crop),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation=tf.interpolation.value,
    )


def default_in_channels(arch: str) -> int | None:
    """The input channel count `arch` requires (3 for torchvision models), or None if free."""
    if arch in MODELS or ":" in arch:
        return None
    return 3 if is_torchvision_arch(arch) else None


