"""One LightningModule per image task, each with its heads and metrics, all built on the same ``Backbone``
description (architecture + overrides + pretrained source + freezing + layer decay).

    classification.py   ImageClassifier
    detection.py        ObjectDetector (Faster R-CNN from torchvision) on pyramid.py, ViTDet's simple feature pyramid
    segmentation.py     Segmenter on heads.py: linear, multi-scale linear and DPT heads, sliding-window inference
"""
