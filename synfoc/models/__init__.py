"""Models: the U-Net and the foundation models (LiteMedSAM, MedSAM, SAM ViT) with LoRA."""

from synfoc.models.foundation import build_foundation_model, list_foundation_models
from synfoc.models.unet import UNet, build_unet

__all__ = ["UNet", "build_unet", "build_foundation_model", "list_foundation_models"]
