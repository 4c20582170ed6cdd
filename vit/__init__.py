"""vit: a Vision Transformer toolkit — model, Lightning training, checkpoint import and fine-tuning."""
from .checkpoints import CheckpointError, export_state_dict, load_pretrained, save_pretrained
from .model import VisionTransformer
from .registry import create_model, list_models

__all__ = ["VisionTransformer", "create_model", "list_models", "load_pretrained", "save_pretrained",
           "export_state_dict", "CheckpointError"]
__version__ = "0.1.0"
