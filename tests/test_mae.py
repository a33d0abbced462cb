"""MAE: masking, patches, the loss against a direct computation, official names and checkpoints, learning."""
import pytest
import torch

from prepretrain_lit.schema import MAEConfig
from prepretrain_lit.presets import get_preset
from prepretrain_lit.mae import (MaskedAutoencoderViT, load_mae_checkpoint, mae_from_config, mae_vit_2b_patch14,
                                 mae_vit_6_5b_patch14, mae_vit_base_patch16, patchify, random_masking, reconstruct,
                                 unpatchify)
from prepretrain_lit.vit import CheckpointMismatchError

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


def small_mae(**kw) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return mae_vit_base_patch16(**{**SMALL, **kw})


# -- masking -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L, ratio", [(196, 0.75), (256, 0.75), (64, 0.6), (49, 0.5), (10, 0.9)])
def test_masking_keeps_exactly_int_L_times_1_minus_ratio(L, ratio):
    x = torch.randn(5, L, 3)
    kept, mask, ids_restore = random_masking(x, ratio)
    K = int(L * (1 - ratio))
    assert kept.shape == (5, K, 3)
    assert torch.all(mask.sum(1) == L - K) and set(mask.unique().tolist()) <= {0.0, 1.0}
    for n in range(5):  # mask is in the original order: the kept tokens are exactly those with mask 0
        kept_rows = {tuple(r) for r in kept[n].tolist()}
        assert kept_rows == {tuple(x[n, i].tolist()) for i in range(L) if mask[n, i] == 0}


def test_ids_restore_inverts_ids_shuffle_and_noise_decides():
    noise = torch.rand(4, 50)
    x = torch.randn(4, 50, 2)
    kept, mask, ids_restore = random_masking(x, 0.7, noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(50).expand(4, 50))
    smallest = torch.topk(noise, 15, largest=False).indices
    assert torch.equal(mask.gather(1, smallest), torch.zeros(4, 15))          # smallest noise is kept
    again = random_masking(x, 0.7, noise.clone())
    assert all(torch.equal(a, b) for a, b in zip((kept, mask, ids_restore), again))


def test_noise_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"noise must have shape \(N, L\) = \(2, 8\)"):
        random_masking(torch.randn(2, 8, 4), 0.5, torch.rand(2, 9))


def test_mask_ratio_that_hides_nothing_or_everything_is_refused():
    model = small_mae()
    for ratio in (0.0, 0.999):
        with pytest.raises(ValueError, match="at least one visible and one hidden patch"):
            model(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


# -- patches -----------------------------------------------------------------------------------------------

def test_patchify_pixel_order_and_round_trip():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    x = patchify(imgs, 2)
    assert x.shape == (2, 16, 12)
    for n, h, w, i, j, c in [(0, 0, 0, 0, 0, 0), (1, 3, 2, 1, 0, 2), (0, 1, 3, 0, 1, 1)]:
        assert x[n, h * 4 + w, (i * 2 + j) * 3 + c] == imgs[n, c, h * 2 + i, w * 2 + j]
    assert torch.equal(unpatchify(x, 2), imgs)
    gray = torch.randn(3, 1, 12, 12)
    assert torch.equal(unpatchify(patchify(gray, 4), 4, in_chans=1), gray)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(torch.randn(1, 3, 10, 10), 4)


# -- the loss ----------------------------------------------------------------------------------------------

def direct_loss(imgs, pred, mask, p, norm_pix):
    "The MAE loss written out patch by patch, as in the paper."
    N, C, H, W = imgs.shape
    total, count = 0.0, 0
    for n in range(N):
        for h in range(H // p):
            for w in range(W // p):
                i = h * (W // p) + w
                if mask[n, i] == 0: continue
                t = imgs[n, :, h * p:(h + 1) * p, w * p:(w + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    mean = t.sum() / t.numel()
                    var = ((t - mean) ** 2).sum() / (t.numel() - 1)
                    t = (t - mean) / (var + 1e-6).sqrt()
                total += ((pred[n, i].double() - t) ** 2).mean().item()
                count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_equals_the_direct_computation(norm_pix):
    model = small_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32) * 2 + 1
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, torch.rand(2, 64))
    assert loss.item() == pytest.approx(direct_loss(imgs, pred, mask, 4, norm_pix), rel=1e-5)


def test_norm_pix_changes_the_target():
    imgs, noise = torch.randn(2, 3, 32, 32) * 3 + 2, torch.rand(2, 64)
    with torch.no_grad():
        plain, pred, mask = small_mae(norm_pix_loss=False)(imgs, 0.75, noise)
        normed = small_mae(norm_pix_loss=True).forward_loss(imgs, pred, mask)
    assert not torch.isclose(plain, normed)


def test_visible_predictions_do_not_change_the_loss():
    model = small_mae(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75)
        other = torch.where(mask.bool().unsqueeze(-1), pred, torch.randn_like(pred) * 100)
        assert torch.equal(model.forward_loss(imgs, other, mask), loss)
        hidden_changed = torch.where(mask.bool().unsqueeze(-1), pred + 1, pred)
        assert model.forward_loss(imgs, hidden_changed, mask) > loss


@pytest.mark.parametrize("ratio, visible", [(0.75, 16), (0.5, 32), (0.9, 6)])
def test_encoder_sees_visible_count_plus_one(ratio, visible):
    model = small_mae()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(torch.randn(2, 3, 32, 32), mask_ratio=ratio)
    assert seen == [visible + 1] * len(model.blocks)


# -- official layout and checkpoints -----------------------------------------------------------------------

BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
         "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
OFFICIAL_KEYS = (["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                  "patch_embed.proj.bias"] + [f"blocks.0.{k}" for k in BLOCK] + ["norm.weight", "norm.bias",
                  "decoder_embed.weight", "decoder_embed.bias"] + [f"decoder_blocks.0.{k}" for k in BLOCK] +
                 ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"])


def test_parameter_names_are_the_official_ones():
    model = small_mae(depth=1)
    assert list(model.state_dict()) == OFFICIAL_KEYS
    sd = model.state_dict()
    assert sd["decoder_pred.weight"].shape == (4 * 4 * 3, 32) and sd["mask_token"].shape == (1, 1, 32)
    assert sd["decoder_pos_embed"].shape == (1, 65, 32) and not model.decoder_pos_embed.requires_grad


def test_official_checkpoint_round_trips_strictly(tmp_path):
    source = small_mae()
    torch.save({"model": source.state_dict()}, tmp_path / "mae_pretrain.pth")
    torch.manual_seed(123)
    target = mae_vit_base_patch16(**SMALL)
    load_mae_checkpoint(target, tmp_path / "mae_pretrain.pth")
    for (k, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), k


def test_malformed_checkpoint_gives_the_clear_error(tmp_path):
    sd = small_mae().state_dict()
    del sd["decoder_norm.weight"]
    sd["decoder_pred.weight"] = sd["decoder_pred.weight"][:10]
    sd["decoder.extra"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_mae_checkpoint(small_mae(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert str(tmp_path / "bad.pth") in msg and "missing keys (1): decoder_norm.weight" in msg
    assert "unexpected keys (1): decoder.extra" in msg and "decoder_pred.weight: file (10, 32) vs model (48, 32)" in msg


def test_giant_models_build_on_meta_without_memory():
    for factory, low, high in ((mae_vit_2b_patch14, 1.85e9, 1.95e9), (mae_vit_6_5b_patch14, 6.3e9, 6.6e9)):
        with torch.device("meta"):
            model = factory()
        assert all(p.is_meta for p in model.parameters())
        encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token")))
        assert low < encoder < high


def test_model_from_config():
    cfg = get_preset("tiny")
    model = mae_from_config(cfg.model, MAEConfig(norm_pix_loss=False))
    assert model.norm_pix_loss is False and len(model.decoder_blocks) == cfg.model.decoder_depth
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token"))) \
        == cfg.model.encoder_params()


# -- learning and pictures ---------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss():
    model = small_mae(norm_pix_loss=True)
    torch.manual_seed(1)
    base = torch.rand(1, 3, 8, 8)
    imgs = torch.nn.functional.interpolate(base, size=32).repeat(8, 1, 1, 1) + 0.05 * torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    with torch.no_grad(): before = model(imgs, 0.75, noise)[0].item()
    for _ in range(30):
        loss = model(imgs, 0.75)[0]
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): after = model(imgs, 0.75, noise)[0].item()
    assert after < 0.7 * before


def test_reconstruction_parts():
    model = small_mae(norm_pix_loss=True).train()
    imgs = torch.randn(2, 3, 32, 32)
    parts = reconstruct(model, imgs, 0.75, torch.rand(2, 64))
    visible = 1 - parts["mask"]
    assert model.training                                                       # mode restored
    assert torch.equal(parts["pasted"] * visible, imgs * visible)              # visible pixels untouched
    assert torch.equal(parts["masked"] * parts["mask"], torch.zeros_like(imgs))
    assert parts["mask"].mean().item() == pytest.approx(0.75)


def test_figure_has_four_columns_per_image():
    import matplotlib
    matplotlib.use("Agg")
    from prepretrain_lit.mae import show_reconstructions
    fig = show_reconstructions(small_mae(), torch.randn(3, 3, 32, 32), max_images=2)
    assert len(fig.axes) == 8 and fig.axes[3].get_title() == "reconstruction + visible"


def test_activation_checkpointing_gives_the_same_gradients():
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    grads = []
    for checkpointed in (False, True):
        model = small_mae()
        model.set_grad_checkpointing(checkpointed)
        model(imgs, 0.75, noise)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_no_weight_decay_names_the_tokens():
    assert small_mae().no_weight_decay() == {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
