"""Models by name: built-in small ResNets, torchvision classifiers, timm models (`timm/<name>`), or a
user factory.

Weights come from torchvision's own download API (cached under $TORCH_HOME/hub/checkpoints), from
timm's Hugging Face repositories (cached under $HF_HOME/hub), or from a local `.safetensors` /
`.pth` file; nothing on the load path unpickles arbitrary objects.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsify.console import write_line
from sparsify.errors import ModelError
from sparsify.models.tvmodels import (
    FIXED_SIZE_PREFIXES,
    MIN_TRAIN_INPUT_SIZE,
    build_pretrained_torchvision,
    build_torchvision,
    check_torchvision_channels,
    is_torchvision_arch,
    resolve_weights,
)
from sparsify.models.timmmodels import (
    build_pretrained_timm,
    build_timm,
    is_timm_arch,
    timm_data_config,
    timm_input_size,
)
from sparsify.models.weights import WEIGHT_FILE_SUFFIXES, load_weights_file
from sparsify.registry import MODELS

UNKNOWN_ARCH_HINT = (
    "use a torchvision classification model (e.g. resnet50, inception_v3, convnext_tiny), "
    "a timm model as timm/<name> (e.g. timm/resnet50d), a built-in one (tiny_resnet, small_resnet) or pkg.module:factory"
)


def print_to_stderr(message: str) -> None:
    """Write one log line to stderr."""
    write_line(message, sys.stderr)


# ----------------------------------------------------------------------------- built-in models


# ----------------------------------------------------------------------------- building


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
    elif is_timm_arch(arch):
        if weights is not None and not looks_like_file(weights):
            return build_pretrained_timm(arch, weights, num_classes=num_classes, in_channels=in_channels, log=log)
        model = build_timm(arch, num_classes=num_classes, in_channels=in_channels)
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


def named_weights(weights: str | None) -> str | None:
    """`weights` when it names pretrained weights, None for a file or no weights."""
    return None if weights is None or looks_like_file(weights) else weights


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
    if not accepts_keyword(factory, "num_classes"):
        raise ModelError(f"model {spec!r}: the factory takes no num_classes argument; give it the signature "
                         "factory(num_classes, in_channels=3) -> nn.Module")
    kwargs = {"num_classes": num_classes}
    if accepts_keyword(factory, "in_channels"):
        kwargs["in_channels"] = in_channels
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the model"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {spec!r} has no trainable parameters; the factory must return the network "
                         "with its layers (nn.Conv2d, nn.Linear, ...)")
    return model


def accepts_keyword(func: Callable, name: str) -> bool:
    """True when `func` takes a keyword argument `name` (or **kwargs)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# ----------------------------------------------------------------------------- local weight files


# ----------------------------------------------------------------------------- defaults


def default_input_size(arch: str, *, weights: str | None = None) -> int | None:
    """The image size `arch` expects: its named weights' crop (DEFAULT's without), or None."""
    if is_timm_arch(arch):
        return timm_input_size(arch, named_weights(weights))
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
    from sparsify.data.presets import ImagePreset, timm_preset

    if is_timm_arch(arch):
        config = timm_data_config(arch, named_weights(weights))
        return timm_preset(config, input_size) if config else None
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
    """The input channel count `arch` starts from (3 for torchvision and timm models), or None if free."""
    if is_timm_arch(arch):
        return 3
    if arch in MODELS or ":" in arch:
        return None
    return 3 if is_torchvision_arch(arch) else None




PROBE_SIZES = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 299, 384, 512)


def input_size_problem(arch: str, *, num_classes: int, in_channels: int, input_size: int) -> str | None:
    """Why `arch` cannot take images of `input_size` (a forward on the meta device: no memory, no
    compute), with the smallest size that works where one of PROBE_SIZES does; None when it can
    (or when the meta device cannot run the model, which then is not judged here)."""
    from sparsify.models.tvmodels import build_for_shapes

    model = build_for_shapes(lambda: build_model(arch, num_classes=num_classes, in_channels=in_channels,
                                                 weights=None, log=lambda _: None)).to("meta").eval()
    problem = meta_forward_problem(model, in_channels, input_size)
    if problem is None:
        return None
    works = [size for size in PROBE_SIZES if meta_forward_problem(model, in_channels, size) is None]
    hint = f"the smallest size that works is {works[0]}" if works else "no size from 8 to 512 works"
    return f"model {arch!r} cannot take {input_size} px images ({problem}); {hint}: set model.input_size"


def meta_forward_problem(model: nn.Module, in_channels: int, size: int) -> str | None:
    """The first line of the error a forward of two images of `size` px raises on the meta device."""
    try:
        with torch.no_grad():
            model(torch.empty(2, in_channels, size, size, device="meta"))
    except (RuntimeError, ValueError, AssertionError) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None if "meta" in text.lower() else text
    except NotImplementedError:
        return None
    return None
