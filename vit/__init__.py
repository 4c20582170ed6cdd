"""vit: a Vision Transformer toolkit — model, Lightning training, checkpoint import and fine-tuning."""
from .model import VisionTransformer
from .registry import create_model, list_models

__all__ = ["VisionTransformer", "create_model", "list_models"]
__version__ = "0.1.0"
