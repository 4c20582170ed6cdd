"""vit: a Vision Transformer toolkit for image tasks: the model, checkpoint import, Lightning training, frozen
features and deployment.

Layers (imports flow down only; ``tests/test_imports.py`` keeps it so):

    commands/, training/cli.py   the `vit` command and `python train.py`
    tasks/, features/, deploy/, training/   LightningModules per task, frozen-feature work, runners and export
    data/, checkpoints/          the image pipeline and datamodules; weights from every source
    models/                      ViTConfig -> VisionTransformer (plain nn.Modules, no Lightning, no I/O)
    utils/                       atomic files, value ranges
"""
from .checkpoints import CheckpointError, export_state_dict, load_pretrained, save_pretrained
from .checkpoints.factory import create_model
from .checkpoints.image_text import export_image_text, load_image_text, save_image_text
from .models.config import ViTConfig
from .models.image_text import ImageTextModel
from .models.text import TextConfig, TextTransformer
from .models.registry import list_models
from .models.vision import VisionTransformer

__all__ = ["VisionTransformer", "ViTConfig", "create_model", "list_models", "load_pretrained", "save_pretrained",
           "export_state_dict", "CheckpointError", "ImageClassifier", "ImageDataModule", "Backbone", "create_runner",
           "ObjectDetector", "DetectionDataModule", "Segmenter", "SegmentationDataModule"]
__all__ += ["load_image_text", "export_image_text", "save_image_text", "ImageTextModel", "TextTransformer",
            "TextConfig", "zeroshot_classifier"]

# Lightning- and runtime-side names load on first use, so `import vit` for the model alone stays light.
_LAZY = {"ImageClassifier": "vit.tasks.classification", "Backbone": "vit.tasks.backbone",
         "ImageDataModule": "vit.data", "create_runner": "vit.deploy.runners",
         "ObjectDetector": "vit.tasks.detection", "DetectionDataModule": "vit.data.detection",
         "Segmenter": "vit.tasks.segmentation", "SegmentationDataModule": "vit.data.segmentation"}
_LAZY.update({"zeroshot_classifier": "vit.features.zeroshot"})
__all__ += ["ImageTextModule", "ImageTextDataModule"]
_LAZY.update({"ImageTextModule": "vit.tasks.image_text", "ImageTextDataModule": "vit.data.image_text"})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vit' has no attribute {name!r}")


__version__ = "0.1.0"
