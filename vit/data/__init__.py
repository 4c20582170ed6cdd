"""Data: datasets, albumentations transforms and the Lightning data module."""
from .classification import ImageDataModule
from .images import BadImageError, load_image
from .transforms import eval_transform, train_transform

__all__ = ["BadImageError", "ImageDataModule", "eval_transform", "load_image", "train_transform"]
