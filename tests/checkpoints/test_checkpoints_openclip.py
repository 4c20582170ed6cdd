"""OpenAI CLIP / OpenCLIP image towers against open_clip itself: ``encode_image``, the pooled features before the
projection and every token after ``ln_post`` agree (<= 1e-4) in fp32, with every parameter random."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file

import vit
from vit.checkpoints import CheckpointError, detect_format, openclip

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

TOL = 1e-4
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
VISION = dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32)  # 2 heads: not a standard width


def _clip(quick_gelu: bool = False, **vision) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**{**VISION, **vision}), text_cfg=CLIPTextCfg(**TEXT),
                 quick_gelu=quick_gelu)
    return randomize_(model).eval()


def _x(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference(clip: CLIP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """open_clip's own outputs: the image embedding, the pooled features before the projection, all tokens
    after the final norm (native: ``ln_post``'s output, caught by a hook; timm: the trunk's forward_features)."""
    visual = clip.visual
    with torch.no_grad():
        if hasattr(visual, "trunk"):
            tokens = visual.trunk.forward_features(x)
            pooled = visual.trunk.forward_head(tokens, pre_logits=True)
        else:
            seen = []
            hook = visual.ln_post.register_forward_hook(lambda module, args, out: seen.append(out))
            try:
                unprojected = copy.deepcopy(visual)
                unprojected.proj = None  # what prune_intermediate_layers(prune_head=True) does
                pooled = unprojected(x)
            finally:
                hook.remove()
            tokens = seen[0]
        return {"logits": clip.encode_image(x), "pre_logits": pooled, "tokens": tokens}


def _assert_parity(model: vit.VisionTransformer, clip: CLIP, x: torch.Tensor) -> dict[str, float]:
    reference = _reference(clip, x)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        ours = {"logits": model(x), "pre_logits": model.forward_head(tokens, pre_logits=True), "tokens": tokens}
    differences = {}
    for what, theirs in reference.items():
        assert ours[what].shape == theirs.shape, f"{what}: ours {tuple(ours[what].shape)} vs {tuple(theirs.shape)}"
        assert theirs.std() > 1e-2, f"{what}: open_clip's values are (nearly) constant"
        differences[what] = (ours[what] - theirs).abs().max().item()
        assert differences[what] <= TOL, f"{what}: max abs difference {differences[what]:.3g} > {TOL}"
    return differences


# ---- native towers (OpenAI's and OpenCLIP's VisionTransformer) ------------------------------------------------
@pytest.mark.parametrize("container", ["pt", "safetensors"])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_clip_state_dict_gives_open_clip_outputs(tmp_path, quick_gelu, container, caplog):
    clip = _clip(quick_gelu)
    path = tmp_path / f"clip.{container}"
    (torch.save if container == "pt" else save_file)(clip.state_dict(), path)
    hints = {"num_heads": 2, **({"act_layer": "quick_gelu"} if quick_gelu else {})}  # neither is in the weights
    with caplog.at_level(logging.INFO, logger="vit.checkpoints.openclip"):
        model = vit.load_pretrained(path, model=hints)
    assert "text tower" in caplog.text and "token_embedding" in caplog.text
    assert model.config.act_layer == ("quick_gelu" if quick_gelu else "gelu")
    assert model.config.pre_norm and model.config.norm_eps == 1e-5 and model.num_classes == 32
    _assert_parity(model, clip, _x())
    cfg = model.pretrained_cfg
    assert cfg["format"] == "openclip" and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == pytest.approx(openclip.CLIP_MEAN) and cfg["std"] == pytest.approx(openclip.CLIP_STD)
    assert tuple(open_clip.OPENAI_DATASET_MEAN) == openclip.CLIP_MEAN  # the constants are open_clip's
    assert tuple(open_clip.OPENAI_DATASET_STD) == openclip.CLIP_STD


@pytest.mark.parametrize("variant, hints", [
    ({"ls_init_value": 0.1}, {}),  # LayerScale: ls_1/ls_2
    ({"pool_type": "avg"}, {"global_pool": "avg"}),  # mean of the patch tokens after ln_post
    ({"image_size": (32, 48)}, {"img_size": (32, 48)}),  # a non-square grid is not in the weights
])
def test_tower_variants(tmp_path, variant, hints):
    clip = _clip(**variant)
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    model = vit.load_pretrained(tmp_path / "clip.safetensors", model={"num_heads": 2, **hints})
    _assert_parity(model, clip, _x() if "image_size" not in variant else torch.randn(2, 3, 32, 48))


def test_image_tower_alone_and_wrapped(tmp_path):
    """``model.visual.state_dict()`` has no ``visual.`` prefix; a DDP training checkpoint nests ``module.``."""
    clip = _clip(quick_gelu=True)
    torch.save(clip.visual.state_dict(), tmp_path / "visual.pt")
    hints = {"num_heads": 2, "act_layer": "quick_gelu"}
    _assert_parity(vit.load_pretrained(tmp_path / "visual.pt", model=hints), clip, _x())
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")  # open_clip's training script writes this
    _assert_parity(vit.load_pretrained(tmp_path / "epoch_3.pt", model=hints), clip, _x())


def test_openai_torchscript_state_dict_says_quick_gelu():
    """OpenAI's .pt files are TorchScript; ``torch.jit.load(f).state_dict()`` adds three integer entries."""
    clip = _clip(quick_gelu=True)
    jit_state_dict = {**clip.state_dict(), "input_resolution": torch.tensor(32), "context_length": torch.tensor(8),
                      "vocab_size": torch.tensor(50)}
    assert openclip.hints(jit_state_dict) == {"norm_eps": 1e-5, "act_layer": "quick_gelu"}
    assert openclip.hints(clip.state_dict()) == {"norm_eps": 1e-5}  # OpenCLIP: its config decides
    assert not any(k in openclip.to_timm(jit_state_dict) for k in openclip.OPENAI_JIT_KEYS)
    model = vit.load_pretrained(jit_state_dict, model={"num_heads": 2})  # QuickGELU comes from the hints hook
    assert model.config.act_layer == "quick_gelu" and model.config.norm_eps == 1e-5
    _assert_parity(model, clip, _x())


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_config_tells_what_the_weights_cannot(tmp_path, quick_gelu):
    clip = _clip(quick_gelu, pool_type="avg")
    config = {"model_cfg": {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {**VISION, "pool_type": "avg"},
                            "text_cfg": TEXT},
              "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    hints, meta = openclip.read_config(config)
    assert meta == {"mean": [0.5] * 3, "std": [0.5] * 3}
    torch.save(clip.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    _assert_parity(vit.load_pretrained(tmp_path / "open_clip_pytorch_model.bin", model=hints), clip, _x())
    # an OpenCLIP hub repository's layout: the directory alone says it all (open_clip_config.json is read)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model = vit.load_pretrained(tmp_path)
    assert model.config.act_layer == ("quick_gelu" if quick_gelu else "gelu")
    assert model.pretrained_cfg["mean"] == [0.5] * 3
    _assert_parity(model, clip, _x())


def test_torchscript_archive_is_named_with_what_to_do(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-B-32.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive.*torch.jit.load.*state_dict"):
        vit.load_pretrained(tmp_path / "ViT-B-32.pt")


# ---- OpenCLIP towers built on timm ---------------------------------------------------------------------------
@pytest.mark.parametrize("pool, proj", [("avg", "linear"), ("token", "")])
def test_timm_tower_gives_open_clip_outputs(tmp_path, pool, proj):
    """``timm_proj='linear'``: trunk without head + ``head.proj``; ``''``: the trunk's own head projects."""
    torch.manual_seed(0)
    clip = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", image_size=224,
                                                       timm_pool=pool, timm_proj=proj), text_cfg=CLIPTextCfg(**TEXT))
    randomize_(clip, std=0.2).eval()  # twelve blocks: a smaller spread keeps the tokens O(1)
    save_file(clip.state_dict(), tmp_path / "clip.safetensors")
    config = {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": pool,
                                           "timm_proj": proj}}}
    hints = openclip.read_config(config)[0]
    model = vit.load_pretrained(tmp_path / "clip.safetensors", model=hints)
    assert model.global_pool == pool and model.num_classes == 32 and model.config.norm_eps == 1e-6
    _assert_parity(model, clip, _x(224))
    if pool == "avg":  # read_config only supplies the pooling; the rest comes from the weights
        _assert_parity(vit.load_pretrained(tmp_path / "clip.safetensors", model={"global_pool": "avg"}), clip,
                       _x(224))


# ---- detection and export ----------------------------------------------------------------------------------------
def test_detection():
    clip = _clip()
    assert detect_format(clip.state_dict()) == ("openclip", "")
    assert detect_format(clip.visual.state_dict()) == ("openclip", "")
    assert detect_format({f"module.{k}": v for k, v in clip.state_dict().items()}) == ("openclip", "module.")
    assert detect_format({"visual.trunk.patch_embed.proj.weight": None}) == ("openclip", "")
    # a ResNet's conv1 (timm's, or OpenAI's RN50 image tower) is not a CLIP ViT
    with pytest.raises(CheckpointError):
        detect_format({"visual.conv1.weight": None, "visual.layer1.0.conv1.weight": None})
    assert detect_format(vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                               pre_norm=True).state_dict())[0] == "timm"


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_export_round_trip_into_open_clip(quick_gelu):
    clip = _clip(quick_gelu, ls_init_value=0.1)
    model = vit.load_pretrained(clip.state_dict(), model={"num_heads": 2, "act_layer":
                                                          "quick_gelu" if quick_gelu else "gelu"})
    exported = openclip.from_timm(model.state_dict(), model.config.to_dict())
    fresh = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**VISION, ls_init_value=0.1), text_cfg=CLIPTextCfg(**TEXT),
                 quick_gelu=quick_gelu).eval()
    result = fresh.load_state_dict(exported, strict=False)
    assert not result.unexpected_keys and all(not k.startswith("visual.") for k in result.missing_keys)
    _assert_parity(model, fresh, _x())
    visual_only = openclip.from_timm(model.state_dict(), model.config.to_dict(), prefix="")
    fresh.visual.load_state_dict(visual_only)  # strict: every key of the tower, nothing else


def test_export_refuses_what_the_tower_cannot_hold():
    plain = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(CheckpointError, match="pre_norm"):
        openclip.from_timm(plain.state_dict(), plain.config.to_dict())
    clip_like = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4,
                                      pre_norm=True)
    with torch.no_grad():
        clip_like.head.bias.fill_(0.5)
    with pytest.raises(CheckpointError, match="bias"):
        openclip.from_timm(clip_like.state_dict(), clip_like.config.to_dict())
