"""torchvision classifiers: build by name, pretrained weights through torchvision's cache, heads, MNASNet loading."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsify.errors import ModelError, first_line

# torchvision models with auxiliary heads (trained with them, evaluated on the main head):
# the heads and the Linear classifier inside each, replaced with the main one.
AUX_HEAD_ARCHS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}
AUX_CLASSIFIERS = {"inception_v3": ("AuxLogits.fc",), "googlenet": ("aux1.fc2", "aux2.fc2")}
# In train mode inception_v3's aux head pools a 17x17 map with a 5x5 kernel: 299 px at least.
MIN_TRAIN_INPUT_SIZE = {"inception_v3": 299}
FIXED_SIZE_PREFIXES = ("vit_", "maxvit")  # their image size is fixed when they are built


def torchvision_model_names() -> list[str]:
    """Names of torchvision's classification models (resnet50, inception_v3, ...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_arch(arch: str) -> bool:
    """True when `arch` names a torchvision classification model."""
    return arch in torchvision_model_names()


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

        SafetensorsMNASNet.__qualname__ = "SafetensorsMNASNet"  # found as sparsify.models.tvmodels.SafetensorsMNASNet
        _MNASNET_CLASS = SafetensorsMNASNet
    return _MNASNET_CLASS


def __getattr__(name: str):
    """`SafetensorsMNASNet` on first use (torchvision is imported only when a model needs it)."""
    if name == "SafetensorsMNASNet":
        return mnasnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Tensor methods that fill a tensor with random values in place (what initialisers end in).
RANDOM_FILLS = frozenset(getattr(torch.Tensor, name) for name in (
    "normal_", "uniform_", "bernoulli_", "cauchy_", "exponential_", "geometric_", "log_normal_", "random_"))


class SkipInitialisers(torch.overrides.TorchFunctionMode):
    """`torch.nn.init`'s functions and random fills return their tensor untouched: meta tensors hold no
    values, and filling them would only load torch's Python decompositions (seconds on the first call)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or func in RANDOM_FILLS:
            return args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        return func(*args, **kwargs)


def build_for_shapes(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` for its structure and shapes only: on the meta device (no memory, no initialisation).

    Some builders need real tensor values (torchvision's RegNet computes its stage widths with
    tensors and `.tolist()`, which meta tensors cannot answer); those are built on the CPU instead.
    """
    try:
        with torch.device("meta"), SkipInitialisers():
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
