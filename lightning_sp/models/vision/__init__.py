"""Vision backbones, keyed by exact name (model.vision.backbone): ``clip`` (HF CLIP) and ``timm`` (SigLIP, DINOv2,
any timm ViT). The contract is in base.py."""

from lightning_sp.models.vision.base import (
    VISION_BACKBONES,
    VisionBackbone,
    backbone_class,
    build_vision,
    image_stats,
    register_vision,
    sincos_2d,
    write_sincos_positions,
)
from lightning_sp.models.vision.clip import CLIPVision
from lightning_sp.models.vision.timm_vit import TimmViT

__all__ = [
    "VISION_BACKBONES",
    "CLIPVision",
    "TimmViT",
    "VisionBackbone",
    "backbone_class",
    "build_vision",
    "image_stats",
    "register_vision",
    "sincos_2d",
    "write_sincos_positions",
]
