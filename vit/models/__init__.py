"""The model: ``ViTConfig`` (the one description of an architecture) -> ``VisionTransformer``, its layers, the
registry of named architectures and position-embedding resampling. Plain ``nn.Module``s: no Lightning, no I/O."""
from .config import ViTConfig
from .image_text import ImageTextModel
from .registry import list_models, model_config
from .text import TextConfig, TextTransformer
from .vision import VisionTransformer

__all__ = ["ViTConfig", "VisionTransformer", "list_models", "model_config", "TextConfig", "TextTransformer",
           "ImageTextModel"]
