"""The original releases of DINOv2 (facebookresearch hub ``.pth``), DeiT III (facebookresearch/deit ``models_v2``)
and SigLIP (big_vision ``.npz``) load with timm's outputs (<= 1e-4, tokens and pooled features).

No original file can be downloaded here, so each test builds one: a random tiny timm model of the family, written
in the original layout by a small converter below (written from the original repositories' modules). The
converters are checked themselves: ``_original_forward`` is the originals' forward written from their code
(DINOv2 ``prepare_tokens_with_masks``/``Block``/``SwiGLUFFN``, DeiT III ``vit_models``/``Layer_scale_init_Block``)
and must give timm's tokens from the converted weights. The SigLIP file is written by our exporter and read
by timm's own ``.npz`` reader, which checks the writer against timm.
"""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, randomize_

import vit
from vit.checkpoints import architecture_of, deit3, detect_format, dinov2

TOL = 1e-4
TINY = dict(embed_dim=64, depth=2, num_heads=2)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _timm(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model(name, pretrained=False, **{**TINY, **kwargs})).eval()


def _x(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


# ---- the originals' forward, from their code --------------------------------------------------------------------
def _original_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int, family: str) -> torch.Tensor:
    """Tokens after the final norm, computed from an original-layout state dict the way the original model does."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    batch, dim = tokens.shape[0], tokens.shape[-1]
    cls = sd["cls_token"].expand(batch, -1, -1)
    if family == "dinov2":  # cat(cls, patches) + pos (the class row included), then the registers after cls
        tokens = torch.cat([cls, tokens], dim=1) + sd["pos_embed"]
        if "register_tokens" in sd:
            tokens = torch.cat([tokens[:, :1], sd["register_tokens"].expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    else:  # DeiT III: positions on the patches, then cat(cls, patches)
        tokens = torch.cat([cls, tokens + sd["pos_embed"]], dim=1)
    norm = lambda t, name: F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)
    linear = lambda t, name: F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        gamma1, gamma2 = ((sd[b + "ls1.gamma"], sd[b + "ls2.gamma"]) if family == "dinov2"
                          else (sd[b + "gamma_1"], sd[b + "gamma_2"]))
        h = norm(tokens, b + "norm1")
        q, k, v = linear(h, b + "attn.qkv").reshape(batch, -1, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        tokens = tokens + gamma1 * linear(h, b + "attn.proj")
        h = norm(tokens, b + "norm2")
        if b + "mlp.w12.weight" in sd:  # DINOv2 SwiGLUFFN: silu(first half) * second half
            x1, x2 = linear(h, b + "mlp.w12").chunk(2, dim=-1)
            h = linear(F.silu(x1) * x2, b + "mlp.w3")
        else:
            h = linear(F.gelu(linear(h, b + "mlp.fc1")), b + "mlp.fc2")
        tokens = tokens + gamma2 * h
    return norm(tokens, "norm")


# ---- DINOv2 -----------------------------------------------------------------------------------------------------
DINOV2 = {  # name: (registers, SwiGLU)
    "vit_small_patch14_dinov2": (False, False),
    "vit_small_patch14_reg4_dinov2": (True, False),
    "vit_giant_patch14_dinov2": (False, True),
    "vit_giant_patch14_reg4_dinov2": (True, True),
}
DINOV2_SIZE = 56  # a 4x4 grid: 16 rows with or without the 5 prefix rows is never also a square


def _dinov2_model(name: str, num_classes: int = 0) -> torch.nn.Module:
    # giant's mlp_ratio 2.66667 * 2 gives an odd hidden width at dim 64; 4 keeps both SwiGLU halves whole
    extra = dict(mlp_ratio=4.0) if DINOV2[name][1] else {}
    return _timm(name, img_size=DINOV2_SIZE, num_classes=num_classes, **extra)


def _to_dinov2_original(model: torch.nn.Module, swiglu: bool) -> dict[str, torch.Tensor]:
    """A timm DINOv2 model's weights in the facebookresearch layout (``DinoVisionTransformer``, block_chunks=0).

    timm folds the class token's position into ``cls_token`` in the register models; the original keeps a class
    row in ``pos_embed``. A random split of timm's class token into (class token, class position) makes the
    loader's folding visible.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    out = {"mask_token": torch.randn(1, sd["cls_token"].shape[-1], generator=generator)}
    if "reg_token" in sd:
        class_position = torch.randn(sd["cls_token"].shape, generator=generator) * 0.5
        out["cls_token"] = sd.pop("cls_token") - class_position
        out["pos_embed"] = torch.cat([class_position, sd.pop("pos_embed")], dim=1)
        out["register_tokens"] = sd.pop("reg_token")
    for key, value in sd.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    return out


@pytest.mark.parametrize("name", list(DINOV2))
def test_dinov2_original_loads_with_timms_outputs(name, tmp_path):
    registers, swiglu = DINOV2[name]
    reference = _dinov2_model(name)
    original = _to_dinov2_original(reference, swiglu)
    assert ("register_tokens" in original) == registers and ("blocks.0.mlp.w12.weight" in original) == swiglu
    x = _x(DINOV2_SIZE)
    with torch.no_grad():  # the converter is right: the original's math on its weights gives timm's tokens
        assert _max_difference(_original_forward(original, x, 2, "dinov2"), reference.forward_features(x)) <= TOL
    torch.save(original, tmp_path / "dinov2_pretrain.pth")
    assert detect_format(original) == ("dinov2", "")
    model = vit.load_pretrained(tmp_path / "dinov2_pretrain.pth", model={"num_heads": 2})
    assert_matches_reference(model, reference, x, TOL)
    config = model.config
    assert (config.reg_tokens, config.no_embed_class) == ((4, True) if registers else (0, False))
    assert config.mlp_layer == ("swiglu" if swiglu else "mlp") and config.act_layer == ("silu" if swiglu else "gelu")
    assert config.init_values is not None and config.norm_eps == 1e-6 and config.num_classes == 0
    cfg = model.pretrained_cfg
    assert cfg["format"] == "dinov2"
    assert cfg["mean"] == pytest.approx(IMAGENET[0]) and cfg["std"] == pytest.approx(IMAGENET[1])


def test_dinov2_wrapped_and_chunked_blocks_load(tmp_path):
    """DDP-wrapped keys, and training checkpoints built with block_chunks (blocks.CHUNK.INDEX.)."""
    reference = _dinov2_model("vit_small_patch14_reg4_dinov2")
    original = _to_dinov2_original(reference, swiglu=False)
    chunked = {k.replace(f"blocks.{k.split('.')[1]}.", f"blocks.{int(k.split('.')[1]) // 2}.{k.split('.')[1]}.")
               if k.startswith("blocks.") else k: v for k, v in original.items()}
    assert "blocks.0.1.norm1.weight" in chunked
    wrapped = {f"module.{k}": v for k, v in chunked.items()}
    assert detect_format(wrapped) == ("dinov2", "module.")
    model = vit.load_pretrained(wrapped, model={"num_heads": 2})
    assert_matches_reference(model, reference, _x(DINOV2_SIZE), TOL)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_dinov2_export_is_the_original_layout(name):
    swiglu = DINOV2[name][1]
    reference = _dinov2_model(name)
    model = vit.load_pretrained(_to_dinov2_original(reference, swiglu), model={"num_heads": 2})
    exported = dinov2.from_timm(model.state_dict(), architecture_of(model))
    assert set(exported) == set(_to_dinov2_original(reference, swiglu))
    x = _x(DINOV2_SIZE)
    with torch.no_grad():
        assert _max_difference(_original_forward(exported, x, 2, "dinov2"), model.forward_features(x)) <= TOL
    assert_matches_reference(vit.load_pretrained(exported, model={"num_heads": 2}), reference, x, TOL)
    with pytest.raises(vit.CheckpointError, match="head"):
        dinov2.from_timm(_dinov2_model(name, num_classes=3).state_dict(), {})


def test_layerscale_and_registers_are_never_dropped_silently_by_the_npz_export():
    model = vit.load_pretrained(_to_dinov2_original(_dinov2_model("vit_small_patch14_reg4_dinov2"), False),
                                model={"num_heads": 2})
    with pytest.raises(vit.CheckpointError, match="ls1.gamma.*reg_token|reg_token.*ls1.gamma"):
        vit.export_state_dict(model, "npz", big_vision=True)


# ---- DeiT III ---------------------------------------------------------------------------------------------------
def _to_deit3_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm DeiT III model's weights in facebookresearch/deit ``models_v2`` layout (LayerScale on the block)."""
    return {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v.detach().clone()
            for k, v in model.state_dict().items()}


def test_deit3_original_loads_with_timms_outputs(tmp_path):
    reference = _timm("deit3_small_patch16_224", img_size=32, num_classes=10)
    original = _to_deit3_original(reference)
    assert "blocks.1.gamma_2" in original and original["pos_embed"].shape[1] == 4  # patches only
    x = _x(32)
    with torch.no_grad():
        tokens = _original_forward(original, x, 2, "deit3")
        assert _max_difference(tokens, reference.forward_features(x)) <= TOL
        logits = F.linear(tokens[:, 0], original["head.weight"], original["head.bias"])
        assert _max_difference(logits, reference(x)) <= TOL
    torch.save({"model": original}, tmp_path / "deit_3_small_224_1k.pth")  # as the released files nest it
    model = vit.load_pretrained(tmp_path / "deit_3_small_224_1k.pth", model={"num_heads": 2})
    assert_matches_reference(model, reference, x, TOL)
    assert model.config.no_embed_class and model.config.init_values is not None and model.num_classes == 10
    cfg = model.pretrained_cfg
    assert cfg["format"] == "deit3"
    assert cfg["mean"] == pytest.approx(IMAGENET[0]) and cfg["std"] == pytest.approx(IMAGENET[1])
    exported = deit3.from_timm(model.state_dict(), architecture_of(model))
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)


# ---- SigLIP (big_vision .npz) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, big_vision, num_classes", [("params/img/", True, 0), ("params/img/", True, 8),
                                                             ("", False, 8)])
def test_siglip_npz_matches_timms_own_reader(tmp_path, prefix, big_vision, num_classes):
    from timm.models.vision_transformer import _load_weights
    reference = _timm("vit_base_patch16_siglip_224", img_size=32, num_classes=num_classes)
    assert reference.cls_token is None and reference.global_pool == "map"
    ours = vit.load_pretrained(reference.state_dict(), model={"num_heads": 2})
    arrays = vit.export_state_dict(ours, "npz", big_vision=big_vision)
    assert "MAPHead_0/probe" in arrays and "cls" not in arrays
    assert ("pos_embedding" in arrays) == big_vision
    path = tmp_path / "siglip.npz"
    np.savez(path, **{prefix + k: v for k, v in arrays.items()})

    fresh = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, num_classes=num_classes,
                              **TINY).eval()
    _load_weights(fresh, str(path))  # timm's own reader: our writer is right
    x = _x(32)
    assert_matches_reference(fresh, reference, x, TOL)

    model = vit.load_pretrained(path)  # heads read off the query kernel; no class token; MAP pooling
    assert model.config.global_pool == "map" and not model.config.class_token and model.num_classes == num_classes
    assert_matches_reference(model, reference, x, TOL)
    assert model.pretrained_cfg["format"] == "npz" and model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
    assert model.pretrained_cfg["std"] == [0.5, 0.5, 0.5]


def test_original_files_of_every_width_know_their_heads():
    """DINOv2 giant (1536 wide) and DeiT III medium (512) are outside the standard-width table: the format's own
    rule (64-wide heads; DeiT III huge: 16 of 80) tells their heads, where a bare timm file would be refused."""
    from vit.checkpoints import deit3, dinov2
    assert dinov2.hints({"patch_embed.proj.weight": torch.zeros(1536, 3, 14, 14)}) == {"num_heads": 24}
    assert deit3.hints({"patch_embed.proj.weight": torch.zeros(512, 3, 16, 16)}) == {"num_heads": 8}
    assert deit3.hints({"patch_embed.proj.weight": torch.zeros(1280, 3, 14, 14)}) == {"num_heads": 16}
    torch.manual_seed(0)
    reference = vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=128, depth=1, num_heads=2,
                                      init_values=1e-6, no_embed_class=True).eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.5)
    original = vit.export_state_dict(reference, "deit3")
    assert "blocks.0.gamma_1" in original
    loaded = vit.load_pretrained(original)  # no hints: 128 wide -> 2 heads of 64
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), atol=1e-5, rtol=0)
