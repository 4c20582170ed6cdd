"""ViTDet windowed attention: off by default, equal to global attention when a window covers the grid, equal to
global attention under the window mask otherwise, no new parameters, and its config checked where it enters."""
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_

import vit
from vit.models.layers import window_attention, window_mask
from vit.tasks.backbone import Backbone

SMALL = dict(img_size=(40, 56), patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
ARCH = {k: v for k, v in SMALL.items() if k != "num_classes"}


def _pair(window_size: int, global_attn_indexes=(), **fields) -> tuple[vit.VisionTransformer, vit.VisionTransformer]:
    """A global model and a windowed one (otherwise the same ``fields``) with the same random weights."""
    base = randomize_(vit.VisionTransformer(**{**SMALL, **fields}), std=0.3).eval()
    windowed = vit.VisionTransformer(**{**SMALL, **fields}, window_size=window_size,
                                     global_attn_indexes=global_attn_indexes).eval()
    windowed.load_state_dict(base.state_dict(), strict=True)
    return base, windowed


def test_window_size_zero_is_timms_global_model_exactly():
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                             num_classes=4)).eval()
    ours = vit.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4).eval()
    assert ours.config.window_size == 0 and ours.config.global_attn_indexes == ()
    assert all(block.attn.window_size == 0 for block in ours.blocks)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours.forward_features(x), reference.forward_features(x))


@pytest.mark.parametrize("fields", [dict(), dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
@pytest.mark.parametrize("size, window", [((56, 56), 7), ((40, 56), 7), ((40, 56), 9)])  # exact, padded, padded
def test_a_window_covering_the_whole_grid_is_global_attention(fields, size, window):
    base, windowed = _pair(**fields, img_size=size, window_size=window)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    assert all(block.attn.window_size == window for block in windowed.blocks)
    with torch.no_grad():
        assert torch.allclose(windowed.forward_features(x), base.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("prefix, grid, window", [(0, (5, 7), 4), (1, (5, 7), 3), (2, (4, 4), 2), (5, (3, 9), 2),
                                                  (1, (1, 6), 4)])
def test_windowed_attention_is_global_attention_under_the_window_mask(prefix, grid, window):
    """Patch tokens see their window and the prefix tokens (padding never); prefix tokens see everything."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 2, prefix + grid[0] * grid[1], 8, generator=generator).unbind(0)
    mask = window_mask(grid, window, prefix)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(window_attention(q, k, v, grid, window, prefix), expected, atol=1e-5)
    # the mask itself: a patch sees exactly the patches of its window (rows // window, cols // window)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    cell = (rows.flatten() // window) * 100 + cols.flatten() // window
    assert torch.equal(mask[prefix:, prefix:], cell[:, None] == cell[None, :])
    assert mask[:prefix].all() and mask[:, :prefix].all()


def test_windowed_blocks_differ_from_global_ones_and_global_indexes_stay_global():
    base, windowed = _pair(window_size=2, global_attn_indexes=[1])
    assert [b.attn.window_size for b in windowed.blocks] == [2, 0, 2]
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(windowed(x), base(x), atol=1e-3)
        # attention maps: zero outside each patch's window in a windowed block, dense in the global one
        maps = windowed.attention_maps(x)
    mask = window_mask((5, 7), 2, 1)
    assert maps[0][0, 0][~mask].abs().max() == 0 and (maps[1][0, 0] > 0).all()
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, 2, 36))


@pytest.mark.parametrize("size", [(40, 56), (24, 72), (64, 64)])
def test_output_shapes_for_grids_that_are_not_a_multiple_of_the_window(size):
    model = vit.VisionTransformer(**{**SMALL, "img_size": size, "window_size": 3, "global_attn_indexes": (2,),
                                     "reg_tokens": 1}).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2)
    grid = (size[0] // 8, size[1] // 8)
    assert final.shape == (2, 2 + grid[0] * grid[1], 32)
    assert [tuple(m.shape) for m in maps] == [(2, 32, *grid)] * 2
    assert model(x).shape == (2, 5)


def test_windowed_attention_trains_with_grad_checkpointing_and_dynamic_sizes():
    model = vit.VisionTransformer(**{**SMALL, "window_size": 2, "dynamic_img_size": True, "drop_path_rate": 0.1})
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 48, 40)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_windowed_attention_adds_no_parameters():
    with torch.device("meta"):
        plain = vit.create_model("vit_small_patch16_224", img_size=512)
        windowed = vit.create_model("vit_small_patch16_224", img_size=512, window_size=14,
                                    global_attn_indexes=(2, 5, 8, 11))
    assert {k: v.shape for k, v in windowed.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert sum(p.numel() for p in windowed.parameters()) == sum(p.numel() for p in plain.parameters())


def test_window_settings_survive_save_and_load(tmp_path):
    _, windowed = _pair(window_size=3, global_attn_indexes=[0, 2])
    vit.save_pretrained(windowed, tmp_path / "windowed")
    loaded = vit.load_pretrained(tmp_path / "windowed").eval()
    assert loaded.config.window_size == 3 and loaded.config.global_attn_indexes == (0, 2)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), windowed(x))
    config = windowed.config
    assert vit.ViTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("fields, message", [
    (dict(window_size=-1), "window_size: expected an integer >= 0"),
    (dict(window_size=2.5), "window_size: expected an integer >= 0"),
    (dict(window_size=4, global_attn_indexes=[3]), r"global_attn_indexes: expected distinct block indices in 0\.\.2"),
    (dict(window_size=4, global_attn_indexes=[-1]), "global_attn_indexes"),
    (dict(window_size=4, global_attn_indexes=[1, 1]), "global_attn_indexes"),
    (dict(window_size=4, attn_layer="lsa"), "window_size: windowed attention needs attn_layer 'mha'"),
])
def test_bad_window_settings_name_the_key(fields, message):
    with pytest.raises(ValueError, match=message):
        vit.ViTConfig(**{**SMALL, **fields})
    with pytest.raises(ValueError, match=message):  # the same through a task's backbone description
        Backbone(**{**ARCH, **fields}).build()


def test_a_backbone_description_turns_windows_on():
    model = Backbone(arch="vit_tiny_patch16_224", img_size=64, depth=3, window_size=2,
                     global_attn_indexes=[2]).build(num_classes=0)
    assert [b.attn.window_size for b in model.blocks] == [2, 2, 0]
