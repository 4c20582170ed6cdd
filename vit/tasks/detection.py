"""ObjectDetector: the LightningModule that trains a ViTDet-style detector (ViT + simple feature pyramid +
torchvision's Faster R-CNN, RetinaNet or FCOS heads) and scores it with COCO mAP."""
from __future__ import annotations

import dataclasses
from typing import Literal

import lightning as L
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from ..utils.ranges import (
    Fraction,
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    plain,
    range_problems,
)
from .backbone import Backbone
from .common import TaskCheckpoints, TrainingFeatures, training_feature_problems
from .pyramid import SimpleFeaturePyramid, norm_and_bias_names

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the scalar results of MeanAveragePrecision, logged as <split>/<name>
# Faster R-CNN's label 0 is the background, so class k is its label k + 1; the dense detectors score every class
# with a sigmoid and mark the background by matching, so they take 0..K-1 as they are.
LABEL_OFFSET = {"faster_rcnn": 1, "retinanet": 0, "fcos": 0}
DETECTORS = tuple(LABEL_OFFSET)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")


class ObjectDetector(TaskCheckpoints, TrainingFeatures, L.LightningModule):
    """Train an object detector on a ViT: ViTDet's simple feature pyramid (``vit.tasks.pyramid``) under
    torchvision's Faster R-CNN (RPN with one anchor size per pyramid level, RoI align over the pyramid's maps),
    RetinaNet or FCOS (one-stage, over pyramid levels 3-7); AdamW with layer-wise LR decay, linear warm-up +
    cosine decay; COCO mAP (torchmetrics, pycocotools backend).

    Targets use labels 0..K-1 (``vit.data.detection``); Faster R-CNN reserves 0 for the background, so with it
    this module adds 1 going in and subtracts it coming out: predictions and metrics use the data's labels.
    Images are float tensors in [0, 1]: the detector normalises them itself, with the pretrained weights'
    mean/std (ImageNet's if they record none), resizes their longer side to ``image_size`` and pads each batch
    to the pyramid's coarsest stride.

    The ViT is built at ``image_size`` (a pretrained position table is resampled once, at load, so the usual
    input costs nothing extra) and with ``dynamic_img_size`` on, so a batch padded to another size (non-square
    images at evaluation) still runs, its position table resampled for that call.

    Args:
        backbone: the ViT (``arch``, ``pretrained``, ``freeze``, ``layer_decay``, ``grad_checkpointing``, ViTConfig
            overrides); see ``vit.tasks.backbone.Backbone``. Its patch strides must come out powers of two
            (patch 8, 16, 32): torchvision's RoI align assumes them (for a patch-14 checkpoint set
            ``patch_size: 16``, the kernel is resampled).
        num_classes: object classes, without the background (the CLI links it from data.num_classes).
        class_names: class names saved in checkpoints for prediction (the CLI links them from data.class_names).
        detector: torchvision's detector over the pyramid: "faster_rcnn" (two-stage; pyramid strides patch/4 to
            2 x patch + a pooled level for proposals), "retinanet" (focal loss, 9 anchors per cell) or "fcos"
            (anchor-free, centerness; ``out_channels`` a multiple of 32 for its GroupNorm); the two one-stage
            detectors read strides patch/2 to 8 x patch (levels 3-7 for patch 16, as ViTDet's RetinaNet).
        image_size: side of the square input (longer side resized to it); None = the backbone's img_size (with
            only ``pretrained`` given: the checkpoint's).
        out_channels: channels of the feature pyramid's maps.
        lr: peak AdamW learning rate, reached after the warm-up (scaled per layer by backbone.layer_decay).
        weight_decay: AdamW weight decay; never applied to position embeddings, tokens, norms and biases.
        warmup_epochs: epochs of linear learning-rate warm-up (fractions allowed; at most half of training).
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of lr.
        representation_size: width of the box head's two fully connected layers (Faster R-CNN).
        roi_batch_size: proposals sampled per image to train the box head (torchvision's box_batch_size_per_image;
            Faster R-CNN).
        score_thresh: detections scoring below this are dropped at inference.
        detections_per_img: most detections kept per image at inference.
        ema_decay: decay of an exponential moving average of the weights, used for validation, test and the
            checkpoints (the raw weights are kept for resuming); None = off.
        schedule: "epochs": warm-up + cosine over trainer.max_epochs; "budget": the cosine decays over the time
            trainer.max_time allows (less a reserve for the last validation), whatever the step rate; use it with
            trainer.max_epochs -1.
        nonfinite_loss: on a NaN/inf training loss, "error" stops the run naming the step, learning rate and each
            loss term; "skip" skips the batch (counted in train/nonfinite_skipped).

    Example:
        >>> module = ObjectDetector(Backbone(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        ...                         num_classes=3, out_channels=16, representation_size=32)
        >>> _ = module.eval(); [tuple(d["boxes"].shape[1:]) for d in module([torch.rand(3, 32, 24)])]
        [(4,)]
    """

    def __init__(self, backbone: Backbone = Backbone(), num_classes: int = 80, class_names: list[str] | None = None,
                 detector: Literal["faster_rcnn", "retinanet", "fcos"] = "faster_rcnn",
                 image_size: PositiveInt | None = None,
                 out_channels: PositiveInt = 256, lr: PositiveFloat = 1e-4, weight_decay: NonNegativeFloat = 0.1,
                 warmup_epochs: NonNegativeFloat = 1.0, min_lr_ratio: Fraction = 0.01,
                 representation_size: PositiveInt = 1024, roi_batch_size: PositiveInt = 512,
                 score_thresh: Fraction = 0.05, detections_per_img: PositiveInt = 100,
                 ema_decay: OpenUnitInterval | None = None, schedule: Literal["epochs", "budget"] = "epochs",
                 nonfinite_loss: Literal["error", "skip"] = "error"):
        super().__init__()
        (image_size, out_channels, lr, weight_decay, warmup_epochs, min_lr_ratio, representation_size, roi_batch_size,
         score_thresh, detections_per_img, ema_decay) = plain(
            image_size, out_channels, lr, weight_decay, warmup_epochs, min_lr_ratio, representation_size,
            roi_batch_size, score_thresh, detections_per_img, ema_decay)
        self.backbone = Backbone.from_value(backbone)
        backbone = self.backbone.as_dict()  # checkpoints hold plain values (read with weights_only=True)
        self.save_hyperparameters()
        _check_args(num_classes=num_classes, class_names=class_names, detector=detector, lr=lr,
                    weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr_ratio=min_lr_ratio,
                    score_thresh=score_thresh, ema_decay=ema_decay, schedule=schedule, nonfinite_loss=nonfinite_loss)
        self.class_names = list(class_names) if class_names is not None else None
        # Built (and pretrained weights read) here: a resumed .ckpt is restored after __init__ and must win.
        vit = dataclasses.replace(self.backbone, img_size=_image_size(self.backbone, image_size),
                                  dynamic_img_size=True).build(num_classes=0)
        if vit.img_size[0] != vit.img_size[1]:
            raise ValueError(f"model.image_size: required with a non-square backbone img_size {list(vit.img_size)}")
        self.image_size = vit.img_size[0]  # given, the backbone's, or (pretrained, neither given) the checkpoint's
        self.label_offset = LABEL_OFFSET[detector]
        if detector == "faster_rcnn":
            self.detector = build_faster_rcnn(SimpleFeaturePyramid(vit, out_channels=out_channels), num_classes,
                                              self.image_size, representation_size, score_thresh, detections_per_img,
                                              roi_batch_size)
        else:
            pyramid = SimpleFeaturePyramid(vit, out_channels=out_channels, scale_factors=(2.0, 1.0, 0.5),
                                           top_block="p6p7")
            self.detector = build_one_stage(detector, pyramid, num_classes, self.image_size, score_thresh,
                                            detections_per_img)
        # Lightning's model summary runs this once (in eval mode) through the model, so its FLOPs are counted
        self.example_input_array = {"images": [torch.zeros(3, self.image_size, self.image_size)]}
        # the classes seen by the metric are the data's 0..K-1 (predictions shifted back)
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections (eval mode) with the data's labels 0..K-1: ``boxes`` (N, 4) xyxy pixels of each input
        image, ``scores``, ``labels``."""
        return [{**d, "labels": d["labels"] - self.label_offset} for d in self.detector(list(images))]

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        # the detector's labels (LABEL_OFFSET): the one place targets are shifted
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
        losses = self.detector(list(images), targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            return self.nonfinite(loss, batch_idx, losses)
        batch_size = len(images)
        # Faster R-CNN: loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg; RetinaNet:
        # classification, bbox_regression; FCOS: those and bbox_ctrness
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_map.update(*_in_original_pixels(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx: int) -> None:
        self.test_map.update(*_in_original_pixels(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        images = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
        return self(images)

    def on_validation_epoch_end(self) -> None:
        self.epoch_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self.epoch_map(self.test_map, "test")

    def epoch_map(self, metric: MeanAveragePrecision, split: str) -> dict[str, float]:
        """Compute, log as ``<split>/map``, ``<split>/map_50`` ... and reset; returns the logged values."""
        results = metric.compute()
        metric.reset()
        values = {f"{split}/{key}": float(results[key]) for key in MAP_KEYS if key in results}
        if self._trainer is not None:
            for name, value in values.items():
                self.log(name, value, prog_bar=name == f"{split}/map", sync_dist=False)
        return values

    # ---- optimisation ----------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """The ViT's and the pyramid's no-decay names, and every bias and norm parameter of the heads."""
        names = {f"detector.backbone.{n}" for n in self.detector.backbone.no_weight_decay()}
        for part, child in self.detector.named_children():  # rpn + roi_heads, or head
            if part != "backbone":
                names |= {f"detector.{part}.{n}" for n in norm_and_bias_names(child)}
        return names

    def layer_ids(self) -> dict[str, int]:
        """Depth of every parameter for layer-wise LR decay: the ViT's layers, then the pyramid and the heads on top."""
        ids = {f"detector.backbone.{n}": i for n, i in self.detector.backbone.layer_ids().items()}
        top = max(ids.values(), default=0)
        return {n: ids.get(n, top) for n, _ in self.named_parameters()}

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint_backbone(self):
        return self.detector.backbone.vit


def build_faster_rcnn(pyramid: SimpleFeaturePyramid, num_classes: int, image_size: int,
                      representation_size: int = 1024, score_thresh: float = 0.05,
                      detections_per_img: int = 100, roi_batch_size: int = 512) -> FasterRCNN:
    """torchvision's Faster R-CNN over a simple feature pyramid: everything about levels read from its spec
    (anchor sizes 8 x stride, one per level, three aspect ratios; RoI align over the non-extra maps; batches padded
    to the coarsest stride), normalisation with the ViT's pretrained mean/std. ``num_classes`` excludes the
    background."""
    spec = pyramid.spec
    common = _transform_args(pyramid, image_size)
    anchors = AnchorGenerator(sizes=tuple((int(8 * s),) for s in spec.strides),
                              aspect_ratios=((0.5, 1.0, 2.0),) * len(spec.names))
    roi_pool = MultiScaleRoIAlign(featmap_names=list(spec.roi_names), output_size=7, sampling_ratio=2)
    return FasterRCNN(pyramid, num_classes=None, **common, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                      box_head=TwoMLPHead(spec.channels * 7 * 7, representation_size),
                      box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
                      box_score_thresh=score_thresh, box_detections_per_img=detections_per_img,
                      box_batch_size_per_image=roi_batch_size)


def build_one_stage(kind: str, pyramid: SimpleFeaturePyramid, num_classes: int, image_size: int,
                    score_thresh: float = 0.05, detections_per_img: int = 100) -> RetinaNet | FCOS:
    """torchvision's RetinaNet (``kind="retinanet"``: anchors 4 x stride at three scales and three aspect ratios
    per level, as torchvision's COCO model) or FCOS (one anchor of the stride's size per cell, which sets FCOS's
    size ranges) over every level of ``pyramid``; normalisation and padding as ``build_faster_rcnn``.
    ``num_classes`` excludes the background (these heads need no background class)."""
    spec = pyramid.spec
    common = _transform_args(pyramid, image_size)
    if kind == "retinanet":
        anchors = AnchorGenerator(sizes=tuple(tuple(int(4 * s * 2 ** (i / 3)) for i in range(3)) for s in spec.strides),
                                  aspect_ratios=((0.5, 1.0, 2.0),) * len(spec.names))
        head = RetinaNetHead(spec.channels, anchors.num_anchors_per_location()[0], num_classes)
        return RetinaNet(pyramid, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                         detections_per_img=detections_per_img, **common)
    if spec.channels % 32:
        raise ValueError(f"model.out_channels: FCOS's head normalises with GroupNorm(32, channels): expected a "
                         f"multiple of 32, got {spec.channels}")
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in spec.strides), aspect_ratios=((1.0,),) * len(spec.names))
    head = FCOSHead(spec.channels, anchors.num_anchors_per_location()[0], num_classes)
    return FCOS(pyramid, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                detections_per_img=detections_per_img, **common)


def _transform_args(pyramid: SimpleFeaturePyramid, image_size: int) -> dict:
    """What torchvision's ``GeneralizedRCNNTransform`` needs, the same for every detector: resize the longer side to
    ``image_size``, normalise with the ViT's pretrained mean/std, pad to the pyramid's coarsest stride."""
    spec = pyramid.spec
    if not spec.power_of_two:
        raise ValueError(f"model.backbone.patch_size {spec.patch_size} gives pyramid strides {list(spec.strides)}, "
                         f"but torchvision's detectors assume powers of two; use patch size 8, 16 or 32 (a "
                         f"checkpoint's patch kernel is resampled: set model.backbone.patch_size: 16)")
    cfg = getattr(pyramid.vit, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD
    return dict(min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std),
                size_divisible=spec.size_divisibility)


def _in_original_pixels(predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]):
    """(predictions, targets) for the mAP metric in each image's own pixels, where COCO's small/medium/large
    areas are defined: predictions on the resized input divided by its ``scale``, the boxes before the transform.
    Targets without ``scale`` (data that did not record it) are measured on the input as they are."""
    preds, truths = [], []
    for pred, target in zip(predictions, targets):
        if "scale" in target:
            pred = {**pred, "boxes": pred["boxes"] / target["scale"].to(pred["boxes"])}
            target = {"boxes": target["original_boxes"], "labels": target["original_labels"]}
        preds.append(pred)
        truths.append({"boxes": target["boxes"], "labels": target["labels"]})
    return preds, truths


def _image_size(backbone: Backbone, image_size: int | None) -> int | None:
    """The img_size to build the ViT at: the given one, or the backbone's (None: a checkpoint's own)."""
    if image_size is None:
        return None if backbone.pretrained and backbone.img_size is None else backbone.img_size or \
            backbone.config().img_size
    size = backbone.config().image_hw
    if backbone.img_size is not None and tuple(size) != (image_size, image_size):
        raise ValueError(f"model.image_size {image_size} differs from model.backbone.img_size {backbone.img_size}; "
                         f"set one of them")
    return image_size


def _check_args(*, num_classes, class_names, detector, lr, weight_decay, warmup_epochs, min_lr_ratio,
                score_thresh, ema_decay, schedule, nonfinite_loss) -> None:
    problems = range_problems("model", {"lr": (PositiveFloat, lr), "weight_decay": (NonNegativeFloat, weight_decay),
                                        "warmup_epochs": (NonNegativeFloat, warmup_epochs),
                                        "min_lr_ratio": (Fraction, min_lr_ratio),
                                        "score_thresh": (Fraction, score_thresh)})
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        problems.append(f"model.num_classes: expected a positive integer (object classes, without the "
                        f"background), got {num_classes!r}")
    elif class_names is not None and len(class_names) != num_classes:
        problems.append(f"model.class_names has {len(class_names)} names but model.num_classes is {num_classes}")
    problems += training_feature_problems(schedule=schedule, ema_decay=ema_decay, nonfinite_loss=nonfinite_loss)
    if detector not in DETECTORS:
        problems.append(f"model.detector: expected one of {', '.join(DETECTORS)}, got {detector!r}")
    if problems:
        raise ValueError("invalid detector configuration:\n  " + "\n  ".join(problems))

