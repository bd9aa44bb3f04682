from petlkit.backbones.registry import Built, backbone_names, build_model
from petlkit.backbones.text import TextClassifier, encoder_layout, load_encoder
from petlkit.backbones.vit import VisionTransformer, ViTConfig, vit
from petlkit.backbones.vit_weights import from_timm, load_timm_state_dict, load_vit

__all__ = [
    "Built",
    "TextClassifier",
    "ViTConfig",
    "VisionTransformer",
    "backbone_names",
    "build_model",
    "encoder_layout",
    "from_timm",
    "load_encoder",
    "load_timm_state_dict",
    "load_vit",
    "vit",
]
