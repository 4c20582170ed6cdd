"""vit: a Vision Transformer toolkit — model, Lightning training, checkpoint import and fine-tuning."""
from .checkpoints import CheckpointError, export_state_dict, load_pretrained, save_pretrained
from .config import ViTConfig
from .factory import create_model
from .model import VisionTransformer
from .registry import list_models

__all__ = ["VisionTransformer", "ViTConfig", "create_model", "list_models", "load_pretrained", "save_pretrained",
           "export_state_dict", "CheckpointError", "ImageClassifier", "ImageDataModule"]


def __getattr__(name: str):
    # Lightning-side classes load on first use, so `import vit` for the model alone stays light.
    if name == "ImageClassifier":
        from .module import ImageClassifier
        return ImageClassifier
    if name == "ImageDataModule":
        from .data import ImageDataModule
        return ImageDataModule
    raise AttributeError(f"module 'vit' has no attribute {name!r}")
__version__ = "0.1.0"
