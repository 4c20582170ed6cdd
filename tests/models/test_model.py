import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference, randomize_

import vit
from vit.models.layers import Attention, ConvStemEmbed


@pytest.mark.parametrize("name,count", [
    ("vit_tiny_patch16_224", 5_717_416), ("vit_small_patch16_224", 22_050_664),
    ("vit_base_patch16_224", 86_567_656), ("vit_large_patch16_224", 304_326_632)])
def test_parameter_counts_match_papers(name, count):
    with torch.device("meta"):
        model = vit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_every_registered_model_matches_timm_parameter_count():
    checked = 0
    for name in vit.list_models():
        if name not in timm.list_models() or any(f in name for f in ("dinov2", "deit3_", "_clip_", "_siglip_")):
            continue  # the newer families: tests/models/test_registry.py, shape by shape
        with torch.device("meta"):
            ours = vit.create_model(name)
            theirs = timm.create_model(name, num_classes=ours.num_classes)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()), name
        checked += 1
    assert checked >= 20


# the ViT paper's sizes (Dosovitskiy et al. 2021, table 1; tiny and small from DeiT): (width, heads)
FAMILY_DIMS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16)}


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "huge"])
@pytest.mark.parametrize("patch", [8, 14, 16, 32])
def test_every_family_runs_at_small_size(size, patch):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    name = f"vit_{size}_patch{patch}_224"
    assert name in vit.list_models()
    # the family's width/heads, shrunk in depth and image size so the test stays fast
    small = dict(img_size=patch * 2, depth=1, num_classes=3)
    model = vit.create_model(name, **small).eval()
    x = torch.randn(2, 3, patch * 2, patch * 2, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 3)
    # the same model in timm: its own registered one where timm has the name, else its VisionTransformer with
    # the paper's width and heads; every parameter random (built on meta: no init to pay for), loaded into ours
    # by timm's names, the same outputs
    with torch.device("meta"):
        if name in timm.list_models():
            reference = timm.create_model(name, pretrained=False, **small)
        else:
            width, heads = FAMILY_DIMS[size]
            reference = TimmViT(patch_size=patch, embed_dim=width, num_heads=heads, **small)
    reference = randomize_(reference.to_empty(device="cpu")).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert_matches_reference(model, reference, x)


def test_registry_has_384_and_deit_variants():
    names = vit.list_models()
    for n in ("vit_base_patch16_384", "vit_large_patch32_384", "deit_small_patch16_224",
              "deit_base_distilled_patch16_224", "vit_huge_patch14_224"):
        assert n in names


def test_unknown_model_name_lists_close_names():
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        vit.create_model("vit_base_patch16_244")


def test_same_logits_as_timm_with_same_weights(tiny_kwargs):
    for seed, extra in enumerate(({}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"},
                                  {"qkv_bias": False})):
        kwargs = {**tiny_kwargs, **extra}
        # every parameter random: library defaults (LayerNorm 1/0, zero biases) hide swapped norms and biases
        theirs = randomize_(timm.models.VisionTransformer(**kwargs), seed=seed).eval()
        ours = vit.VisionTransformer(**kwargs).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        assert_matches_reference(ours, theirs, x)  # tokens, pre-logits features and logits


def test_forward_features_and_head_are_consistent(tiny_model):
    x = torch.randn(3, 3, 32, 32)
    tokens = tiny_model.forward_features(x)
    assert tokens.shape == (3, 1 + 16, 64)
    torch.testing.assert_close(tiny_model.forward_head(tokens), tiny_model(x))
    assert tiny_model.forward_head(tokens, pre_logits=True).shape == (3, 64)


def test_reset_classifier_and_features_only(tiny_model):
    tiny_model.reset_classifier(5)
    assert tiny_model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    tiny_model.reset_classifier(0)
    assert tiny_model(torch.randn(1, 3, 32, 32)).shape == (1, 64)


def test_reset_classifier_follows_the_model_dtype_and_device(tiny_model):
    tiny_model.to(torch.float64).reset_classifier(5)
    assert tiny_model.head.weight.dtype == torch.float64
    assert tiny_model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 5)


def test_no_weight_decay_names_embeddings_norms_and_biases(tiny_model):
    skip = tiny_model.no_weight_decay()
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "head.bias"} <= skip
    assert "blocks.0.attn.qkv.weight" not in skip and "head.weight" not in skip
    assert "patch_embed.proj.weight" not in skip


def test_grad_checkpointing_gives_same_loss_and_grads(tiny_kwargs):
    torch.manual_seed(0)
    model = vit.VisionTransformer(**tiny_kwargs)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_a = torch.nn.functional.cross_entropy(model(x), y)
    loss_a.backward()
    grads_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    loss_b = torch.nn.functional.cross_entropy(model(x), y)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for a, p in zip(grads_a, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_initialisation_follows_reference(tiny_kwargs):
    torch.manual_seed(0)
    model = vit.VisionTransformer(**{**tiny_kwargs, "embed_dim": 256, "num_heads": 4})
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(model.blocks[0].mlp.fc1.bias == 0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.003


def test_attention_maps_match_fused_attention(tiny_model):
    x = torch.randn(2, 17, 64)
    attn: Attention = tiny_model.blocks[0].attn
    weights = attn.attention_map(x)
    assert weights.shape == (2, 2, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 17))
    _, _, v = attn._qkv(x)
    manual = attn.proj((weights @ v).transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(manual, attn(x), atol=1e-5, rtol=1e-5)
    assert len(tiny_model.attention_maps(torch.randn(1, 3, 32, 32))) == 2


def test_distilled_model_matches_timm_deit():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=7)
    theirs = randomize_(timm.models.deit.VisionTransformerDistilled(**kwargs)).eval()  # every parameter random
    ours = vit.VisionTransformer(distilled=True, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert_matches_reference(ours, theirs, x)  # tokens, pre-logits (both tokens' mean) and logits
    # the two heads differ once random: the logits are their mean, not either one alone
    with torch.no_grad():
        tokens = ours.forward_features(x)
        cls_only, dist_only = ours.head(tokens[:, 0]), ours.head_dist(tokens[:, 1])
        assert (cls_only - dist_only).abs().max() > 0.1
        torch.testing.assert_close(ours(x), (cls_only + dist_only) / 2)


def test_wrong_input_size_names_expected_and_got(tiny_model):
    with pytest.raises(ValueError, match=r"expects 32x32 images, got 48x48.*dynamic_img_size"):
        tiny_model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model(torch.randn(1, 1, 32, 32))


def test_dynamic_img_size_resamples_position_embeddings(tiny_kwargs):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    model = vit.VisionTransformer(**tiny_kwargs, dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 10)
    # timm's dynamic_img_size model with the same random weights: the same outputs at 48x64 (a 6x8 grid from 4x4)
    reference = randomize_(TimmViT(**tiny_kwargs, dynamic_img_size=True)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    assert_matches_reference(model, reference, x)
    # ... and at the native size, where nothing is resampled
    assert_matches_reference(model, reference, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("bad,match", [
    (dict(img_size=30), "not divisible by patch_size"),
    (dict(embed_dim=63), "not divisible by num_heads"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(global_pool="max"), "global_pool"),
    (dict(class_token=False), "needs class_token"),
    (dict(patch_drop_rate=1.0), "patch_drop_rate"),
    (dict(patch_drop_rate=0.5, window_size=2), "whole patch grid"),
])
def test_invalid_configuration_is_named(tiny_kwargs, bad, match):
    with pytest.raises(ValueError, match=match):
        vit.VisionTransformer(**{**tiny_kwargs, **bad})


# ---- the options of today's families, each against timm's own VisionTransformer with the same arguments ----
def _family_cases():
    from functools import partial

    from timm.layers import SwiGLUPacked
    ln5 = partial(torch.nn.LayerNorm, eps=1e-5)
    return {  # name: (timm arguments, ours)
        "layerscale (DINOv2)": (dict(init_values=1e-5), dict(init_values=1e-5)),
        "registers, no_embed_class (DINOv2 reg4)": (dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
                                                    dict(init_values=1e-5, reg_tokens=4, no_embed_class=True)),
        "no_embed_class (DeiT III)": (dict(init_values=1e-6, no_embed_class=True),
                                      dict(init_values=1e-6, no_embed_class=True)),
        "pre_norm (CLIP)": (dict(pre_norm=True, norm_layer=ln5), dict(pre_norm=True, norm_eps=1e-5)),
        "quick_gelu (OpenAI CLIP)": (dict(pre_norm=True, act_layer="quick_gelu"),
                                     dict(pre_norm=True, act_layer="quick_gelu")),
        "map pool, gelu_tanh (SigLIP)": (dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
                                         dict(class_token=False, global_pool="map", act_layer="gelu_tanh")),
        "swiglu (DINOv2 giant)": (dict(init_values=1e-5, mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=6),
                                  dict(init_values=1e-5, mlp_layer="swiglu", act_layer="silu", mlp_ratio=6)),
        "no final norm": (dict(final_norm=False, global_pool="avg"), dict(final_norm=False, global_pool="avg")),
        "no pooling": (dict(global_pool="", num_classes=0), dict(global_pool="", num_classes=0)),
    }


@pytest.mark.parametrize("case", list(_family_cases()))
def test_family_options_match_timm_outputs_and_parameter_names(case):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    timm_args, ours_args = _family_cases()[case]
    base = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    reference = TimmViT(**{**base, **timm_args}).eval()
    for p in reference.parameters():  # every parameter random: LayerScale gammas and zero heads included
        p.data.normal_(0, 0.3)
    ours = vit.VisionTransformer(**{**base, **ours_args}).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # timm's names, one to one
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)
        for got, want in zip(ours.forward_intermediates(x, indices=[0, -1], norm=True)[1],
                             reference.forward_intermediates(x, indices=[0, -1], norm=True)[1]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_register_tokens_stay_out_of_pooling_and_intermediates():
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, reg_tokens=4,
                                  global_pool="avg", num_classes=0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = model.blocks(model._embed(x))
        torch.testing.assert_close(model(x), model.fc_norm(tokens[:, 1 + 4:].mean(1)))
        maps = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert maps[0].shape == (1, 16, 64)  # patch tokens only: no class or register token


def test_new_options_take_no_weight_decay_and_sit_in_timm_layer_groups():
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, reg_tokens=2,
                                  init_values=1e-5, class_token=False, global_pool="map", pre_norm=True)
    skip = model.no_weight_decay()
    assert {"reg_token", "attn_pool.latent", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "norm_pre.weight"} <= skip
    ids = model.layer_ids()
    assert ids["reg_token"] == ids["norm_pre.weight"] == 0 and ids["attn_pool.latent"] == ids["head.weight"] == 3


def test_forward_intermediates_checks_its_arguments(tiny_model):
    with pytest.raises(ValueError, match="output_fmt"):
        tiny_model.forward_intermediates(torch.zeros(1, 3, 32, 32), output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices"):
        tiny_model.forward_intermediates(torch.zeros(1, 3, 32, 32), indices=5)


# ---- small-dataset options: Shifted Patch Tokenization and Locality Self-Attention (Lee et al. 2021) ----------
def test_shifted_patch_tokens_see_half_a_patch_of_their_neighbours():
    from vit.models.layers import PatchEmbed, ShiftedPatchEmbed
    torch.manual_seed(0)
    spt, conv = ShiftedPatchEmbed(16, 4, 3, 32).eval(), PatchEmbed(16, 4, 3, 32).eval()
    x = torch.randn(1, 3, 16, 16)
    nudged = x.clone()
    nudged[..., 5, 5] += 1.0  # a pixel of patch (1, 1), 1-2 px from patch (0, 0)'s corner
    with torch.no_grad():
        changed = lambda layer: (layer(nudged) - layer(x)).abs().amax(-1)[0]  # per token
        assert changed(spt)[0] > 0 and changed(conv)[0] == 0  # patch (0, 0) sees it only through the shifts
        assert changed(spt)[15] == 0  # a far patch does not
    # the reference: the image and its four diagonal half-patch shifts, stacked on channels, cut into patches
    shifts = [torch.nn.functional.pad(x, pad)[..., t:t + 16, l:l + 16] for pad, t, l in
              (((2, 0, 2, 0), 0, 0), ((0, 2, 2, 0), 0, 2), ((2, 0, 0, 2), 2, 0), ((0, 2, 0, 2), 2, 2))]
    stacked = torch.cat([x, *shifts], dim=1)
    patches = stacked.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(1, 16, -1)
    with torch.no_grad():
        torch.testing.assert_close(spt(x), spt.proj(spt.norm(patches)))
    assert torch.equal(shifts[0][..., 2:, 2:], x[..., :14, :14])  # content moved down-right by half a patch
    assert torch.equal(shifts[3][..., :14, :14], x[..., 2:, 2:])  # ... and up-left


def test_locality_self_attention_masks_the_diagonal_and_learns_its_temperature():
    from vit.models.layers import Attention
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, locality=True).eval()
    with torch.no_grad():
        attn.scale.fill_(0.7)
    x = torch.randn(2, 5, 32)
    q, k, v = attn._qkv(x)
    logits = 0.7 * q @ k.transpose(-2, -1)
    weights = logits.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
        assert attn.attention_map(x).diagonal(dim1=-2, dim2=-1).abs().max() == 0
    attn(x).sum().backward()
    assert attn.scale.grad is not None and attn.scale.grad != 0


def test_small_dataset_options_train_save_and_load():
    model = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                                  embed_layer="spt", attn_layer="lsa").eval()
    assert {"blocks.0.attn.scale", "patch_embed.norm.weight"} <= model.no_weight_decay()
    loaded = vit.load_pretrained(model.state_dict(), model={"num_heads": 2})  # read from the weights alone
    assert (loaded.config.embed_layer, loaded.config.attn_layer) == ("spt", "lsa")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="embed_layer"):
        vit.ViTConfig(embed_layer="shifted")


def test_conv_stem_tokens_see_their_neighbourhood_and_load_back_from_the_weights():
    torch.manual_seed(0)
    stem = ConvStemEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=32).eval()
    assert [tuple(b.conv.weight.shape) for b in stem.stem] == [(16, 3, 3, 3), (32, 16, 3, 3)]
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        base = stem(x)
        assert base.shape == (1, 16, 32)
        nudged = x.clone()
        nudged[..., 3, 3] += 1.0  # last pixel of patch (0, 0): patch (1, 1)'s stacked 3x3 convolutions reach it
        changed = (stem(nudged) - base).abs().amax(-1).reshape(4, 4)
    assert changed[0, 0] > 0 and changed[1, 1] > 0
    assert changed[3, 3] == 0 and changed[0, 3] == 0  # far patches do not see it

    model = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                  embed_layer="conv_stem", attn_layer="lsa")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # BatchNorm's running statistics move away from their initial values
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 5, (8,))).backward()
        optimizer.step()
    model.eval()
    loaded = vit.load_pretrained(model.state_dict(), model={"num_heads": 2}).eval()  # BatchNorm: eval statistics
    assert (loaded.config.embed_layer, loaded.config.patch_size, loaded.config.embed_dim) == ("conv_stem", 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # trains under bf16 autocast too
        model.train()(torch.randn(4, 3, 16, 16)).float().sum().backward()
    with pytest.raises(ValueError, match="embed_layer 'conv_stem'.*power of 2"):
        vit.ViTConfig(img_size=24, patch_size=6, embed_layer="conv_stem")
    with pytest.raises(ValueError, match="embed_dim must be divisible by patch_size / 2 = 8"):
        vit.ViTConfig(img_size=32, patch_size=16, embed_dim=36, num_heads=2, embed_layer="conv_stem")
    with pytest.raises(ValueError, match="pre_norm"):
        vit.ViTConfig(patch_size=16, embed_layer="conv_stem", pre_norm=True)


def test_patch_dropout_keeps_a_random_subset_of_patches_while_training_only(tiny_kwargs):
    torch.manual_seed(0)
    model = vit.VisionTransformer(**{**tiny_kwargs, "reg_tokens": 2, "patch_drop_rate": 0.5})
    full = vit.VisionTransformer(**{**tiny_kwargs, "reg_tokens": 2})
    full.load_state_dict(model.state_dict())  # the rate is not a weight: the same checkpoint either way
    x = torch.randn(2, 3, 32, 32)
    model.eval(), full.eval()
    torch.testing.assert_close(model(x), full(x), rtol=0, atol=0)  # evaluation sees every token
    model.train()
    tokens = model._embed(x)  # (B, 3 prefix + 16 patches, D)
    kept = model._drop_patches(tokens)
    assert kept.shape == (2, 3 + 8, 64)  # timm's count: int(16 x 0.5)
    torch.testing.assert_close(kept[:, :3], tokens[:, :3])  # class and register tokens always stay
    for b in range(2):  # each kept token is one of the image's own patches, none twice
        match = (kept[b, 3:, None] == tokens[b, None, 3:]).all(-1)
        assert match.sum(1).tolist() == [1] * 8 and match.any(0).sum() == 8
    chosen = [set((kept[b, 3:, None] == tokens[b, None, 3:]).all(-1).nonzero()[:, 1].tolist()) for b in range(2)]
    assert chosen[0] != chosen[1]  # a subset per image, not one per batch
    assert model.forward_features(x).shape == (2, 3 + 8, 64)
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
