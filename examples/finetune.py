"""Fine-tune a pretrained ViT on your own image folder, in Python instead of YAML (public API only).

    python examples/finetune.py path/to/images hf-hub:timm/vit_small_patch16_224.augreg_in21k_ft_in1k out_dir

path/to/images holds train/<class>/*.jpg and val/<class>/*.jpg. The result is a save_pretrained directory that
`vit.load_pretrained`, `vit predict` and `vit export` read.
"""
import sys

import lightning as L

import vit


def main(root: str, pretrained: str, out_dir: str, img_size: int = 224, epochs: int = 10) -> None:
    L.seed_everything(42)
    # Normalise the way the pretrained weights expect (their config says; ImageNet's if it does not).
    cfg = vit.load_pretrained(pretrained).pretrained_cfg
    data = vit.ImageDataModule("imagefolder", root=root, img_size=img_size, batch_size=32, augment="strong",
                               mean=cfg["mean"], std=cfg["std"])
    module = vit.ImageClassifier(vit.Backbone(pretrained=pretrained, img_size=img_size, layer_decay=0.65, drop_path_rate=0.1),
                                 num_classes=data.num_classes, class_names=data.class_names, lr=5e-4, mixup_alpha=0.8,
                                 cutmix_alpha=1.0, ema_decay=0.999)
    trainer = L.Trainer(max_epochs=epochs, precision="bf16-mixed", gradient_clip_val=1.0,
                        callbacks=[L.pytorch.callbacks.EarlyStopping("val/acc", mode="max", patience=5)])
    trainer.fit(module, datamodule=data)
    print(trainer.validate(module, datamodule=data)[0])  # EMA weights: copied in when training ends
    vit.save_pretrained(module.model, out_dir, class_names=data.class_names, mean=list(data.mean), std=list(data.std))
    print(f"saved to {out_dir}; try: vit predict IMAGE --checkpoint {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
