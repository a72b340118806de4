"""timm models by name: aliases users type, creation at an input size and class count, safe checkpoint loading."""

from __future__ import annotations

import difflib
import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config

from edgekd.errors import EdgekdError, first_line
from edgekd.types import Preprocess

log = logging.getLogger(__name__)

# Short names people type, mapped to the timm architecture they mean.
MODEL_ALIASES: dict[str, str] = {
    "vit_base": "vit_base_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "convnext_tiny": "convnext_tiny",
    "convnext_small": "convnext_small",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "mobilenetv3_large": "mobilenetv3_large_100",
    "mobilenetv3_small": "mobilenetv3_small_100",
    "regnety_016": "regnety_016",
}


def alias_help() -> str:
    return ", ".join(MODEL_ALIASES)


@lru_cache(maxsize=1)
def _known_models() -> frozenset[str]:
    return frozenset(timm.list_models())


def resolve_model_name(name: str) -> str:
    """An alias or timm name -> a timm architecture name; an unknown name gets the closest timm names."""
    cleaned = name.strip()
    if cleaned in MODEL_ALIASES:
        return MODEL_ALIASES[cleaned]
    architecture = cleaned.split(".")[0]  # timm accepts "arch.pretrained_tag"
    if architecture in _known_models():
        return cleaned
    close = difflib.get_close_matches(architecture, sorted(_known_models() | set(MODEL_ALIASES)), n=5, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else "; `timm.list_models('PATTERN*')` lists timm's names"
    raise EdgekdError(f"unknown model {name!r}{hint}")


def fixed_input_size(model_name: str) -> bool:
    # Transformers fix their input size at construction (position embeddings); CNNs take any size.
    cfg = timm.get_pretrained_cfg(model_name.split(".")[0], allow_unregistered=True)
    return bool(cfg and getattr(cfg, "fixed_input_size", False))


def create_model(model_name: str, num_classes: int, image_size: tuple[int, int] | None = None,
                 pretrained: bool = False, in_chans: int = 3) -> torch.nn.Module:
    """Create a timm model for this task's classes and, for fixed-size models, its input size.

    `pretrained`: with timm's published ImageNet weights (from the local Hugging Face cache, else the hub); when
    `num_classes` differs from the pretrained head's, the new head starts at zero (zero_new_head). Unavailable
    weights are an error naming --teacher-checkpoint; students check `locate_pretrained` first and fall back.
    """
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans}
    if image_size is not None and fixed_input_size(model_name):
        kwargs["img_size"] = image_size
    if pretrained:
        located = require_pretrained(model_name)
        kwargs["pretrained_cfg_overlay"] = {"file": located.file} if located.file else {}
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (AssertionError, ValueError, RuntimeError) as error:
        size = f" at input size {image_size[0]}x{image_size[1]}" if image_size else ""
        hint = "pick another --input-size" if image_size else "check the model name and its weights"
        raise EdgekdError(f"cannot build {model_name}{size}: {first_line(error)}; {hint}") from error
    if pretrained and num_classes != model.pretrained_cfg.get("num_classes", num_classes):
        zero_new_head(model)  # timm made a new head for these classes on the pretrained features
    return model


def require_pretrained(model_name: str) -> PretrainedWeights:
    """fetch_pretrained, or the error that says what to pass instead when the weights cannot be had here."""
    located = fetch_pretrained(model_name)
    if located is None:
        raise EdgekdError(f"pretrained weights for {model_name} are not cached and the Hugging Face hub is "
                          "unreachable; pass --teacher-checkpoint PATH (a .safetensors or .pth state_dict) or "
                          "--random-init")
    return located


@dataclass(frozen=True)
class PretrainedWeights:
    """Where timm's published weights for a model will come from."""

    hub_id: str  # e.g. "timm/tf_efficientnet_lite0.in1k"
    file: str | None  # a file in the local Hugging Face cache; None: timm downloads from the hub


def locate_pretrained(model_name: str) -> PretrainedWeights | None:
    """timm's published weights for `model_name` (an architecture, optionally ".tag"), if they can be had now:
    from the local Hugging Face cache (read first, so a cached run is the same online and offline), else from the
    hub when it is reachable. None when timm publishes none or they are neither cached nor downloadable."""
    cfg = timm.get_pretrained_cfg(model_name, allow_unregistered=True)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = _cached_hub_file(hub_id, filename)
        if cached is not None:
            return PretrainedWeights(hub_id, cached)
    return PretrainedWeights(hub_id, None) if _hub_online() else None


def fetch_pretrained(model_name: str) -> PretrainedWeights | None:
    """locate_pretrained, with weights that come from the hub downloaded into the local cache first, so that they
    are identified by the file's content whether or not this run downloaded them (cache and resume keys)."""
    located = locate_pretrained(model_name)
    if located is None or located.file is not None:
        return located
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = located.hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return PretrainedWeights(located.hub_id, hf_hub_download(repo, filename, revision=revision or None,
                                                                     cache_dir=hub_cache_dir()))
        except EntryNotFoundError:
            continue
    return None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def _cached_hub_file(hub_id: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    cached = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision or None)
    return cached if isinstance(cached, str) else None


@lru_cache(maxsize=1)
def _hub_online(timeout: float = 3.0) -> bool:
    """Whether the hub can be reached (asked once per process). timm's own download retries for ~45 s offline
    before failing; checking once saves the user that wait."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def preprocess_for(model: torch.nn.Module, image_size: tuple[int, int] | None = None) -> Preprocess:
    """The model's own timm data config, at `image_size` when given (recorded: budgets depend on it)."""
    cfg = resolve_model_data_config(model)
    channels = int(cfg["input_size"][0])
    size = image_size or (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return Preprocess(input_size=(channels, size[0], size[1]), mean=mean, std=std,
                      interpolation=str(cfg.get("interpolation", "bilinear")),
                      crop_pct=float(cfg.get("crop_pct", 1.0)), crop_mode=str(cfg.get("crop_mode", "center")))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint from elsewhere safely: safetensors, or torch.load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to parse means the file is not a usable checkpoint
        # torch's own message advises weights_only=False, which runs the file's code: not passed on
        if "Unsupported global" in str(error):
            raise EdgekdError(f"checkpoint {path} holds pickled Python objects (a whole model or a training state), "
                              "which edgekd does not unpickle; save the weights alone: "
                              "torch.save(model.state_dict(), 'weights.pth') or safetensors") from error
        # torch's own words name its internals ("pop from empty list", "101", a miniz error): said in plain terms
        log.debug("torch.load(%s): %r", path, error)
        reason = "empty or cut short" if isinstance(error, EOFError) else \
            "a damaged archive (cut short or corrupted)" if "PytorchStreamReader" in str(error) else \
            "not a file torch.save wrote"
        raise EdgekdError(f"cannot read checkpoint {path}: {reason}; "
                          "give a state_dict saved as .safetensors or with torch.save") from error
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):  # common wrappers (timm train.py, others)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            others = [other for other in ("state_dict_ema", "model_ema") if other != key and other in state]
            if others:  # timm's train.py keeps both: say which one this is
                log.info("checkpoint %s: using its %r weights (it also holds %s; save those alone to use them)",
                         path, key, " and ".join(repr(other) for other in others))
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgekdError(f"checkpoint {path} is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def zero_new_head(model: torch.nn.Module) -> None:
    """Start a new classifier on pretrained features at zero (BiT's fine-tuning recipe): its first predictions are
    uniform, so the first steps train the head instead of pushing large random-logit gradients into the backbone.
    timm's EfficientNet init draws a 10-class head from +-0.32, whose logits over 1,280 features put the first
    epoch's loss high: fitting a real Lite2 with edgekd's recipe, the first epoch's loss was 1.29 zeroed and 1.94
    with timm's head, and top-1 87.05% against 86.40% (benchmarks/results/real_weights_fashion_mnist.md)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = classifier if isinstance(classifier, (tuple, list)) else (classifier,)  # distilled DeiT: two heads
    zeroed = False
    for head in heads:
        for name in ("weight", "bias"):
            tensor = getattr(head, name, None)
            if isinstance(tensor, torch.Tensor):
                with torch.no_grad():
                    tensor.zero_()
                zeroed = True
    if not zeroed:
        log.warning("%s: no classifier weights found to start at zero; it keeps timm's random init",
                    type(model).__name__)


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the model's classification head (timm names it in pretrained_cfg)."""
    head = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    heads = head if isinstance(head, (list, tuple)) else [head]
    return [k for k in model.state_dict() if any(k.startswith(h + ".") for h in heads)]


def strip_wrapper_prefix(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model saved through a wrapper has its keys under the wrapper's attribute ("model." in a Lightning module,
    "_orig_mod." after torch.compile, "backbone.", "student."): the one prefix whose removal makes the most keys the
    model's own is removed, when that beats the keys as they are. Keys outside it (a training wrapper's other
    parts: a loss's buffers, an EMA copy, a teacher) are left out, and the log says how many."""
    def fits(key: str, value: torch.Tensor) -> bool:  # by name and shape: a teacher's keys are often a student's
        return key in own and tuple(own[key].shape) == tuple(value.shape)

    as_they_are = sum(fits(key, value) for key, value in state.items())
    if as_they_are == len(state):
        return state
    prefixes: Counter[str] = Counter()
    for key, value in state.items():
        for position, character in enumerate(key):
            if character == "." and fits(key[position + 1:], value):
                prefixes[key[:position + 1]] += 1
    if not prefixes:
        return state
    (prefix, matching), *others = prefixes.most_common(2)
    if matching <= as_they_are or matching < len(own) / 2:  # no whole model under it: another model's checkpoint
        return state  # (a resnet's "layer1.0.bn1.weight" is an efficientnet's "bn1.weight"), for load_weights to say
    if others and others[0][1] == matching:  # two whole copies (a model and its EMA, a teacher and its student)
        raise EdgekdError(f"the checkpoint holds the model twice, under {prefix!r} and {others[0][0]!r}; save the "
                          f"one you mean alone: {{k.removeprefix(PREFIX): v for k, v in state.items() if "
                          "k.startswith(PREFIX)}")
    kept = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    log.info("checkpoint keys under %r are the model's (a wrapper's); %d other key(s) left out", prefix,
             len(state) - len(kept))
    return kept


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 allow_head_mismatch: bool) -> bool:
    """Load `state` into `model`; returns True when the head was left new (at zero, see zero_new_head) because its
    shape differed.

    Any other missing key, unexpected key or shape difference is a clear error naming the keys.
    """
    state, head_mismatch = fitted_state(model, state, source, allow_head_mismatch=allow_head_mismatch)
    model.load_state_dict(state, strict=False)
    if head_mismatch:
        zero_new_head(model)  # a new head on the checkpoint's features
    return head_mismatch


def fitted_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, *,
                 allow_head_mismatch: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """load_weights' checks without loading (so a model on the meta device can be checked): the state as it will
    load, and whether the head is left new. Any other missing key, unexpected key or shape difference is an error."""
    own = model.state_dict()
    state = strip_wrapper_prefix(state, own)
    head = set(classifier_keys(model))
    head_mismatch = any(k in state and state[k].shape != own[k].shape for k in head) or \
        (head and not any(k in state for k in head))
    if head_mismatch and allow_head_mismatch:
        state = {k: v for k, v in state.items() if k not in head}
    missing = [k for k in own if k not in state and not (head_mismatch and k in head)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape(s) differ (checkpoint vs model), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if any("pos_embed" in shape for shape in shapes):
            parts.append("a transformer's position embeddings fix its input size: pass the --input-size it was "
                         "trained at")
        raise EdgekdError(f"checkpoint {source} does not fit {model.__class__.__name__} "
                          f"({getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}): {'; '.join(parts)}")
    return state, bool(head_mismatch)
