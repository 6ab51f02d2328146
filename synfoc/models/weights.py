"""Weight files of the foundation models: base checkpoints in, trainable parts out.

* Base checkpoints (``.pth``, official segment_anything key format, e.g. ``medsam_vit_b.pth`` or
  ``sam_vit_b_01ec64.pth``; the bundled LiteMedSAM file) are read with ``torch.load(...,
  weights_only=True)`` and checked key by key against the model before anything is loaded.
* Only the trainable part (LoRA factors, the mask decoder, the prompt encoder's ``no_mask_embed``) is
  saved, as safetensors, together with the identity of the base model it belongs to, so that it can
  never be loaded onto another base silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "check_state_dict",
    "file_sha256",
    "load_state_dict_file",
    "load_trainable",
    "read_trainable_metadata",
    "save_trainable",
]

# Metadata keys that must agree between a trainable-weights file and the model it is loaded onto.
IDENTITY_KEYS = ("base_model", "base_sha256", "num_classes", "lora_rank")


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict safely (``weights_only=True``) on the CPU.

    Accepts a flat ``{name: tensor}`` dict or one wrapped under ``"model"`` / ``"state_dict"``.
    Raises ``ValueError`` naming the file when it is missing, truncated, corrupt or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        # mmap avoids holding a second full copy of large checkpoints (ViT-H is 2.5 GB) in memory.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped; retry plainly
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}"
            ) from None
    if isinstance(checkpoint, Mapping):
        for wrapper in ("model", "state_dict"):
            if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()
    ):
        raise ValueError(f"{path} does not contain a state dict (a mapping of names to tensors)")
    return dict(checkpoint)


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    path: str | Path,
) -> None:
    """Raise ``ValueError`` naming ``path`` and the first key that is missing, unexpected or misshaped.

    Keys are checked in the model's order, so the first reported mismatch is the earliest layer that
    differs (e.g. ``image_encoder.pos_embed`` when ViT-L weights are given for a ViT-B model).
    """
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{path} does not fit this model: key '{key}' is missing from the file")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(
                f"{path} does not fit this model: '{key}' has shape {tuple(state[key].shape)} in the "
                f"file but the model expects {tuple(shape)}"
            )
    for key in state:
        if key not in expected:
            raise ValueError(f"{path} does not fit this model: unexpected key '{key}' in the file")


def _identity(model: nn.Module) -> dict[str, str]:
    """The base-model identity a trainable-weights file records (all values as strings)."""
    return {
        "base_model": str(model.name),
        "base_sha256": str(model.base_sha256),
        "num_classes": str(model.num_classes),
        "image_size": str(model.image_size),
        "lora_rank": str(model.lora_rank),
    }


def save_trainable(model: nn.Module, path: str | Path, metadata: Mapping[str, object] | None = None) -> Path:
    """Save only the trainable tensors of a foundation model as safetensors.

    The file's metadata records ``base_model``, ``base_sha256``, ``num_classes``, ``image_size`` and
    ``lora_rank``; extra ``metadata`` entries (e.g. the iteration) are stored too, as strings (non-string
    values JSON-encoded), but cannot override the identity keys.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    extra = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()}
    identity = _identity(model)
    clashes = sorted(set(extra) & set(identity))
    if clashes:
        raise ValueError(f"metadata may not override the base-model identity keys: {clashes}")
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.trainable_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={**extra, **identity})
    return path


def read_trainable_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a trainable-weights file (``ValueError`` if it is not a readable safetensors file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load_trainable(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load trainable weights saved by :func:`save_trainable` into ``model`` (in place).

    Refuses (``ValueError``) when the file was made for another base model, base checkpoint (SHA-256),
    number of classes or LoRA rank, or when its tensors do not match the model's trainable tensors.
    The image size may differ: LoRA and the decoder do not depend on it.

    Returns:
        The file's metadata.
    """
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_trainable_metadata(path)
    expected = _identity(model)
    for key in IDENTITY_KEYS:
        if metadata.get(key) != expected[key]:
            raise ValueError(
                f"{path} was saved for a different base model: {key} is {metadata.get(key)!r} in the file "
                f"but {expected[key]!r} for this model"
            )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    targets = model.trainable_state_dict()
    check_state_dict(tensors, {name: tensor.shape for name, tensor in targets.items()}, path)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(tensors[name])
    return metadata
