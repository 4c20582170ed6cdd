"""ViTConfig: one description of an architecture that the model, registry, module and checkpoints all speak."""
import dataclasses
import inspect

import pytest
import torch

import vit
from vit.models.config import TRAINING_FIELDS, ViTConfig, field_names
from vit.tasks.backbone import OVERRIDE_FIELDS, Backbone
from vit.tasks.classification import ImageClassifier


def test_model_is_built_from_a_config_and_keyword_fields_override_it():
    config = ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    model = vit.VisionTransformer(config, num_classes=3)
    assert model.config == config.replace(num_classes=3, fc_norm=False)  # fc_norm resolved by timm's rule
    assert len(model.blocks) == 2 and model.head.out_features == 3
    assert vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2).config.embed_dim == 64


def test_registry_is_a_table_of_configs_and_create_model_applies_overrides():
    config = vit.models.registry.model_config("vit_small_patch16_224")
    assert isinstance(config, ViTConfig) and (config.embed_dim, config.depth, config.num_heads) == (384, 12, 6)
    model = vit.create_model("vit_small_patch16_224", num_classes=7, depth=1)
    assert model.config == config.replace(num_classes=7, depth=1, fc_norm=False)


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    config = ViTConfig(img_size=(32, 48), patch_size=8, embed_dim=64, depth=2, num_heads=2, drop_rate=0.1)
    values = config.to_dict()
    assert values["img_size"] == [32, 48] and ViTConfig.from_dict(values) == config
    assert not set(TRAINING_FIELDS) & set(config.to_dict(training=False))
    with pytest.raises(TypeError, match="unknown ViTConfig field.*num_head\\b"):
        ViTConfig.from_dict({"num_head": 3})


def test_every_problem_is_reported_at_once_naming_each_field():
    with pytest.raises(ValueError) as error:
        ViTConfig(img_size=30, patch_size=8, embed_dim=63, num_heads=2, drop_rate=1.5, global_pool="max")
    text = str(error.value)
    for expected in ("img_size 30x30 is not divisible by patch_size 8", "embed_dim 63 is not divisible by num_heads 2",
                     "drop_rate: expected a rate in [0, 1)", "global_pool: expected one of"):
        assert expected in text


def test_reset_classifier_keeps_the_config_true():
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    model.reset_classifier(4, global_pool="avg")
    assert model.config.num_classes == 4 and model.config.global_pool == "avg"
    assert vit.VisionTransformer(model.config).state_dict().keys() == model.state_dict().keys()


def test_backbone_takes_every_architecture_field():
    fields = {f.name for f in dataclasses.fields(Backbone)}
    left_out = set(field_names()) - fields
    assert left_out == {"distilled", "num_classes"}, f"ViTConfig fields Backbone does not take: {left_out}"
    assert set(OVERRIDE_FIELDS) == set(field_names()) - {"distilled", "num_classes"}
    assert "num_classes" in inspect.signature(ImageClassifier.__init__).parameters  # the head is the task's
    module = ImageClassifier(Backbone(arch="vit_tiny_patch16_224", img_size=32, depth=1, norm_eps=1e-5),
                             num_classes=3)
    assert module.model.config.norm_eps == 1e-5 and module.model.config.embed_dim == 192
    assert module.model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
