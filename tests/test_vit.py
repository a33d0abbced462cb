"""ViT trunks: positions, MAE's init, timm/MAWS compatibility, sizes, checkpoint I/O and its errors."""
import argparse
import math

import numpy as np
import pytest
import timm
import torch

from prepretrain_lit.schema import ModelConfig, UserError
from prepretrain_lit.presets import get_preset
from prepretrain_lit.mae import mae_vit_base_patch16
from prepretrain_lit.vit import (VIT_SIZES, CheckpointMismatchError, ViT, load_state_dict_file, load_trunk, save_trunk,
                                 sincos_pos_embed_2d, trunk_state_dict, vit_base_patch16, vit_from_config,
                                 vit_huge_patch14, vit_large_patch16)

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)


def test_sincos_against_the_formula_position_by_position():
    D, grid = 16, 3
    pe = sincos_pos_embed_2d(D, grid, cls_token=True)
    assert torch.equal(pe[0], torch.zeros(D))
    for row in range(grid):
        for col in range(grid):
            expected = []
            for t in (col, row):  # first half encodes the column, second the row (as MAE's meshgrid does)
                freqs = [1 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
                expected += [math.sin(t * w) for w in freqs] + [math.cos(t * w) for w in freqs]
            np.testing.assert_allclose(pe[1 + row * grid + col].numpy(), expected, atol=1e-6)


def test_sincos_needs_a_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


def test_mae_initialisation():
    torch.manual_seed(0)
    vit = ViT(img_size=64, patch_size=8, embed_dim=384, depth=2, num_heads=6)
    assert not vit.pos_embed.requires_grad and vit.cls_token.requires_grad
    assert torch.equal(vit.pos_embed[0], sincos_pos_embed_2d(384, 8, cls_token=True))
    assert abs(vit.cls_token.std().item() - 0.02) < 0.006
    w = vit.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))         # Xavier-uniform on the (D, p*p*C) view
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    qkv = vit.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= math.sqrt(6 / sum(qkv.weight.shape)) and torch.all(qkv.bias == 0)
    assert torch.all(vit.norm.weight == 1) and torch.all(vit.blocks[1].norm2.bias == 0)
    assert vit.norm.eps == 1e-6


def test_attention_is_timms_fused_sdpa():
    vit = ViT(**SMALL)
    assert all(block.attn.fused_attn for block in vit.blocks)


@pytest.mark.parametrize("ours, timm_name", [(vit_base_patch16, "vit_base_patch16_224"),
                                             (vit_large_patch16, "vit_large_patch16_224"),
                                             (vit_huge_patch14, "vit_huge_patch14_224")])
def test_state_dict_matches_timm_vit_names_and_shapes(ours, timm_name):
    with torch.device("meta"):
        mine = ours().state_dict()
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_timm_weights_load_into_the_trunk_and_agree():
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **SMALL).eval()
    ours = load_trunk(ViT(**SMALL), theirs.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x))


def test_a_mae_checkpoint_feeds_the_trunk(tmp_path):
    mae = mae_vit_base_patch16(**SMALL, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    torch.save({"model": mae.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pth")
    trunk = load_trunk(ViT(**SMALL), tmp_path / "ckpt.pth").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(trunk(x), mae.eval().forward_features(x))


def test_safetensors_export_is_a_plain_state_dict(tmp_path):
    vit = ViT(**SMALL)
    path = save_trunk(vit, tmp_path / "out" / "trunk.safetensors", metadata={"arch": "x"})
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **SMALL)
    fresh.load_state_dict(load_state_dict_file(path), strict=True)  # a plain load_state_dict accepts it
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f: assert f.metadata()["arch"] == "x"


def test_mismatch_error_lists_everything_wrong():
    sd = trunk_state_dict(ViT(**SMALL).state_dict())
    del sd["cls_token"], sd["blocks.1.mlp.fc2.bias"]
    sd["head.weight"] = torch.zeros(10, 64)          # a head is dropped, not an error
    sd["extra.thing"] = torch.zeros(1)
    sd["norm.bias"] = torch.zeros(65)
    with pytest.raises(CheckpointMismatchError) as e:
        load_trunk(ViT(**SMALL), sd)
    msg = str(e.value)
    assert "missing keys (2): blocks.1.mlp.fc2.bias, cls_token" in msg
    assert "unexpected keys (1): extra.thing" in msg and "head.weight" not in msg
    assert "norm.bias: file (65,) vs model (64,)" in msg


def test_other_resolution_needs_interpolation():
    sd = ViT(**SMALL).state_dict()                                     # 8x8 grid
    with pytest.raises(CheckpointMismatchError, match="pos_embed: file"):
        load_trunk(ViT(**{**SMALL, "img_size": 48}), sd)
    bigger = load_trunk(ViT(**{**SMALL, "img_size": 48}), sd, interpolate_pos_embed=True)
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert torch.equal(bigger.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_text("some text")
    with pytest.raises(UserError, match="not a checkpoint"):
        load_state_dict_file(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "nodict.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        load_state_dict_file(tmp_path / "nodict.pth")


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "callback": print}, tmp_path / "code.pth")
    with pytest.raises(UserError, match="only weights are read") as e:
        load_state_dict_file(tmp_path / "code.pth")
    assert "weights_only=False" not in str(e.value)    # not torch's advice to run the file's code


def test_trunk_from_config_matches_the_analytic_count():
    for name in ("tiny", "vit_b16"):
        m = get_preset(name).model
        with torch.device("meta"):
            vit = vit_from_config(m)
        assert sum(p.numel() for p in vit.parameters()) == m.encoder_params()


def test_sizes_table():
    assert VIT_SIZES["2b"] == dict(embed_dim=2560, depth=24, num_heads=32)
    assert VIT_SIZES["6.5b"] == dict(embed_dim=4096, depth=32, num_heads=32)


def test_drop_path_rises_linearly_with_depth():
    vit = ViT(**{**SMALL, "depth": 3}, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(ModelConfig().drop_path_rate, float)


def test_a_timm_trunk_loads_into_a_mae_encoder_and_keeps_the_decoder():
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **SMALL).eval()
    mae = mae_vit_base_patch16(**SMALL, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    decoder_before = mae.decoder_pred.weight.clone()
    load_trunk(mae, theirs.state_dict()).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(mae.forward_features(x), theirs.forward_features(x))
    assert torch.equal(mae.decoder_pred.weight, decoder_before)
    bad = theirs.state_dict()
    del bad["blocks.0.norm1.weight"]
    with pytest.raises(CheckpointMismatchError, match="missing keys \\(1\\): blocks.0.norm1.weight"):
        load_trunk(mae, bad)
