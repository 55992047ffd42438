"""VILA-style vision-language models (LongVILA): vision tower, projector, the VILA composition."""

from cupola.collections.vlm.models.projector import MLPDownsampleProjector
from cupola.collections.vlm.models.vila import VILA, VILA_FLAVORS, VLM_COMPONENTS, VILAConfig, vila_config
from cupola.collections.vlm.models.vision import VISION_FLAVORS, VisionConfig, VisionTower, vision_config

__all__ = [
    "VILA",
    "VILA_FLAVORS",
    "VISION_FLAVORS",
    "VLM_COMPONENTS",
    "MLPDownsampleProjector",
    "VILAConfig",
    "VisionConfig",
    "VisionTower",
    "vila_config",
    "vision_config",
]
