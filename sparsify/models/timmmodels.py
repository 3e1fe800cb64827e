"""timm models (`model.arch: timm/<name>`): build by name, pretrained weights from the Hugging Face
cache (downloaded there when the hub can be reached), and timm's own preprocessing config.

timm is an optional dependency (`pip install 'sparsify-cnn[timm]'`), imported only when a
`timm/` model is asked for.
"""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from torch import nn

from sparsify.errors import ModelError
from sparsify.models.tvmodels import cache_file, first_line

TIMM_PREFIX = "timm/"
INSTALL_HINT = "pip install 'sparsify-cnn[timm]'"
HUB_PROBE_SECONDS = 5.0
FILE_HINT = "set model.weights to a local .safetensors/.pth file"


def is_timm_arch(arch: str) -> bool:
    """True when `arch` names a timm model (`timm/<name>`)."""
    return arch.startswith(TIMM_PREFIX)


def import_timm(arch: str):
    """The timm module, or one line naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise ModelError(f"model.arch {arch!r} needs the timm package, which is not installed: {INSTALL_HINT}") \
            from None
    return timm


def timm_name(arch: str) -> str:
    """The timm model name of `timm/<name>`, checked against timm's list (close matches when unknown)."""
    timm = import_timm(arch)
    name = arch[len(TIMM_PREFIX):]
    if "." in name:
        base, _, tag = name.partition(".")
        raise ModelError(f"model.arch {arch!r}: give the pretrained tag in model.weights, not in the name "
                         f"(model.arch: timm/{base}, model.weights: {tag})")
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(TIMM_PREFIX + n for n in close)}" if close else \
            "timm.list_models() lists them"
        raise ModelError(f"unknown timm model {arch!r}; {hint}")
    return name


def build_timm(arch: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """A randomly initialised timm model (the checkpoint's layout: no auxiliary heads, timm's defaults)."""
    timm = import_timm(arch)
    return timm.create_model(timm_name(arch), pretrained=False, num_classes=num_classes, in_chans=in_channels)


def pretrained_cfg(arch: str, weights: str | None):
    """timm's pretrained config of `weights` (DEFAULT, a tag such as a1_in1k, or name.tag); for None the
    DEFAULT weights' config (their preprocessing describes the model), or None when timm has none."""
    timm = import_timm(arch)
    name = timm_name(arch)
    default = timm.models.get_pretrained_cfg(name)
    if weights is None or weights.upper() == "DEFAULT":
        if default is None and weights is not None:
            raise ModelError(f"timm model {arch!r} has no pretrained weights; set model.weights: null or a local "
                             ".safetensors/.pth file")
        return default
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{name}.*") if n.partition(".")[0] == name]
    tag = weights.removeprefix(f"{name}.")
    if tag not in tags:
        choices = ", ".join(["DEFAULT", *tags]) if tags else "none (use null)"
        raise ModelError(f"unknown weights {weights!r} for {arch}; choose one of: {choices}, or a local "
                         ".safetensors/.pth file")
    return timm.models.get_pretrained_cfg(f"{name}.{tag}")


def build_pretrained_timm(arch: str, weights: str, *, num_classes: int, in_channels: int,
                          log: Callable[[str], None]) -> nn.Module:
    """Build `arch` with timm's pretrained `weights` (read from the cache, downloaded when missing); timm
    fits the head to num_classes and the stem to in_channels as it does for its own pretrained models."""
    timm = import_timm(arch)
    cfg = pretrained_cfg(arch, weights)
    path = weights_file(arch, cfg)
    try:
        model = timm.create_model(f"{cfg.architecture}.{cfg.tag}", pretrained=True, num_classes=num_classes,
                                  in_chans=in_channels, pretrained_cfg_overlay={"file": str(path)})
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise ModelError(f"timm weights {cfg.architecture}.{cfg.tag} in {path} do not fit {arch} ({first_line(exc)}); "
                         "delete that file to download it again") from None
    log(f"loaded {arch} weights {cfg.tag} from {path} ({cfg.num_classes} classes)")
    if num_classes != cfg.num_classes:
        log(f"replaced head {cfg.classifier} ({cfg.num_classes} -> {num_classes} outputs) with freshly "
            "initialised layers")
    if in_channels != cfg.input_size[0]:
        log(f"timm adapted the stem's pretrained weights from {cfg.input_size[0]} to {in_channels} input channels")
    return model


def weights_file(arch: str, cfg) -> Path:
    """The local file of timm weights `cfg`: from the Hugging Face cache (or timm's torch hub cache for
    the few weights with only a URL), downloaded there first when missing and the hub can be reached."""
    if cfg.hf_hub_id:
        return hub_weights_file(arch, cfg)
    if cfg.url:
        target = cache_file(cfg.url)
        if not target.is_file():
            download_url(arch, cfg.url, target)
        return target
    raise ModelError(f"timm weights {cfg.architecture}.{cfg.tag} name no file to load; {FILE_HINT}")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (read when called)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache_home, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_filenames(cfg) -> list[str]:
    """The files a timm hub repository may hold its weights in, safetensors first (as timm tries them)."""
    name = cfg.hf_hub_filename or "pytorch_model.bin"
    if name.endswith(".safetensors"):
        return [name]
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    return [safe.get(name, name.removesuffix(".bin") + ".safetensors"), name]


def hub_weights_file(arch: str, cfg) -> Path:
    """The cached hub file of `cfg`'s weights, downloading it when missing."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    cache = hub_cache_dir()
    names = hub_filenames(cfg)
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    problem = hub_unreachable()
    if problem:
        raise ModelError(f"timm weights {cfg.hf_hub_id} are not in the Hugging Face cache and the hub cannot be "
                         f"reached ({problem}); timm looks in {cache} (HF_HOME/hub, default ~/.cache/huggingface/hub): "
                         f"run this once with network to download them there, or {FILE_HINT}")
    return download_hub_file(repo, revision or None, names, cache)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (offline mode, no route), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{endpoint.hostname}:{port}: {exc.strerror or first_line(exc)}"
    return None


def download_hub_file(repo: str, revision: str | None, names: list[str], cache: Path) -> Path:
    """Download the first of `names` that the hub repository has into the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache))
        except LocalEntryNotFoundError as exc:  # the connection failed on the way
            raise ModelError(f"cannot download timm weights {repo} ({first_line(exc)}); {FILE_HINT}") from None
        except EntryNotFoundError:
            continue
        except Exception as exc:  # HTTP, OS and hub errors mean the same to the user
            raise ModelError(f"cannot download timm weights {repo}/{name} ({first_line(exc)}); {FILE_HINT}") from None
    raise ModelError(f"the hub repository {repo} has none of {', '.join(names)}; {FILE_HINT}")


def download_url(arch: str, url: str, target: Path) -> None:
    """Download weights that timm names only by URL into the torch hub cache."""
    from torch.hub import download_url_to_file

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # urllib and OS errors alike
        raise ModelError(f"cannot download {arch} weights from {url} ({first_line(exc)}); without network, copy "
                         f"that file to {target}") from None


def timm_data_config(arch: str, weights: str | None) -> dict | None:
    """timm's preprocessing (timm.data.resolve_data_config) of named `weights` (DEFAULT's for None):
    input_size, interpolation, mean, std, crop_pct, crop_mode. None when timm has no pretrained config."""
    cfg = pretrained_cfg(arch, weights)
    if cfg is None:
        return None
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=cfg.to_dict())


def timm_input_size(arch: str, weights: str | None) -> int | None:
    """The image size of timm's preprocessing config (its height), or None."""
    config = timm_data_config(arch, weights)
    return int(config["input_size"][1]) if config else None
