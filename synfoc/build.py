"""What a configuration builds: the students of a method at the configured sizes, the method that
trains them, and their optimizers. Training and :func:`synfoc.checkpoint.load_run` build students
here, so a saved run is rebuilt exactly as it was trained."""

from __future__ import annotations

import dataclasses
import importlib

import torch
from torch import nn

from synfoc.config import TrainConfig
from synfoc.method.registry import method_spec, models_of


def native_size(foundation: str) -> int | None:
    """The input side a foundation model was pretrained at (None for an unknown name)."""
    from synfoc.models.foundation import FOUNDATION_MODELS
    spec = FOUNDATION_MODELS.get(foundation)
    return spec.native_size if spec else None


def with_image_size(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the foundation input size resolved (``image_size: None`` means the model's
    native size), so that a run folder's config.yaml names the size it trained at."""
    if cfg.image_size is not None or native_size(cfg.foundation) is None:
        return cfg
    return dataclasses.replace(cfg, image_size=native_size(cfg.foundation))


def build_student(kind: str, cfg: TrainConfig, index) -> nn.Module:
    """The U-Net or the LoRA-tuned foundation model of ``cfg`` for the dataset's channels and classes."""
    from synfoc.models import build_foundation_model, build_unet
    if kind == "unet":
        return build_unet(index.channels, index.num_classes, cfg.unet_width)
    if kind == "foundation":
        return build_foundation_model(cfg.foundation, index.num_classes, lora_rank=cfg.lora_rank,
                                      image_size=cfg.image_size, checkpoint=cfg.checkpoint,
                                      grad_checkpointing=cfg.grad_checkpointing)
    raise ValueError(f"unknown student {kind!r}")


def build_students(cfg: TrainConfig, index) -> dict[str, nn.Module]:
    """Every student ``cfg.method`` trains, keyed "unet" / "foundation"."""
    return {kind: build_student(kind, cfg, index) for kind in models_of(cfg.method)}


def method_class(method: str) -> type:
    """The class that implements ``method`` (named in :data:`synfoc.method.registry.METHODS`)."""
    module, name = method_spec(method).implementation.split(":")
    return getattr(importlib.import_module(module), name)


def build_method(cfg: TrainConfig, students: dict[str, nn.Module], teachers: dict[str, nn.Module],
                 parts: list[tuple[int, ...]]):
    """The method ``cfg.method`` over its students and their EMA teachers."""
    return method_class(cfg.method).build(cfg, students, teachers, parts)


def make_optimizers(cfg: TrainConfig, students: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
    """SGD for the U-Net and AdamW for the foundation model, as PyTorch's fused single-kernel
    implementations (CPU and CUDA, the devices synfoc runs on): the same updates up to float
    rounding, one pass over the parameters (``benchmarks/kernels.py`` times both)."""
    opts = {}
    if "unet" in students:
        opts["unet"] = torch.optim.SGD(students["unet"].parameters(), lr=cfg.lr_unet, momentum=cfg.momentum_unet,
                                       weight_decay=cfg.weight_decay_unet, fused=True)
    if "foundation" in students:
        params = [p for p in students["foundation"].parameters() if p.requires_grad]
        opts["foundation"] = torch.optim.AdamW(params, lr=cfg.lr_foundation, betas=(0.9, 0.999),
                                               weight_decay=cfg.weight_decay_foundation, fused=True)
    return opts


def parameter_summary(models: dict[str, nn.Module]) -> str:
    lines = []
    for name, m in models.items():
        total = sum(p.numel() for p in m.parameters())
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        lines.append(f"  {name:<11} {total / 1e6:9.2f} M parameters, {trainable / 1e6:8.3f} M trainable")
    return "\n".join(lines)
