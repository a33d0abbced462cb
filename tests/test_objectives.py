"""WSP, supervised and finetune objectives: targets and losses against direct computations, the trunk init
from a previous stage's checkpoint, and the layer-decay groups."""
import math

import pytest
import torch
import torch.nn.functional as F

from prepretrain_lit.schema import InitConfig, UserError
from prepretrain_lit.presets import load_config
from prepretrain_lit.mae import MaskedAutoencoderViT
from prepretrain_lit.objectives import (ClassificationObjective, ViTClassifier, hashtag_targets, soft_cross_entropy,
                                        wsp_loss)
from prepretrain_lit.vit import load_init
from prepretrain_lit.optim import build_optimizer, param_groups
from prepretrain_lit.vit import CheckpointMismatchError

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_wsp_targets_split_each_images_mass_over_its_tags():
    h = torch.tensor([[1., 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    targets, has_tag = hashtag_targets(h)
    assert torch.allclose(targets[0], torch.tensor([1 / 3, 1 / 3, 0, 1 / 3]))
    assert torch.equal(targets[1], torch.tensor([0., 1, 0, 0]))
    assert has_tag.tolist() == [True, True, False]


def test_wsp_loss_equals_a_loop_over_images_and_tags():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    h = (torch.rand(5, 7) < 0.3).float()
    h[2] = 0                                              # an image without any known hashtag
    expected, n = 0.0, 0
    for i in range(5):
        tags = h[i].nonzero().flatten().tolist()
        if not tags: continue
        logp = logits[i] - torch.logsumexp(logits[i], 0)
        expected += -sum(logp[t].item() for t in tags) / len(tags)
        n += 1
    assert math.isclose(wsp_loss(logits, h).item(), expected / n, rel_tol=1e-5)


def test_soft_cross_entropy_with_one_hot_is_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(labels, 4).float()), F.cross_entropy(logits, labels))


def test_supervised_objective_uses_label_smoothing():
    model = ViTClassifier(3, **TINY)
    obj = ClassificationObjective(model, "label", label_smoothing=0.2).eval()
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 0])}
    loss, logs = obj(batch)
    logits = model(batch["image"])
    smooth = 0.8 * F.one_hot(batch["label"], 3) + 0.2 / 3
    assert torch.allclose(loss, soft_cross_entropy(logits, smooth), atol=1e-6)
    top1 = (logits.argmax(1) == batch["label"]).float().mean() * 100
    assert math.isclose(logs["train_top1"].item(), top1.item(), rel_tol=1e-6)


def test_mixup_needs_an_even_batch():
    obj = ClassificationObjective(ViTClassifier(3, **TINY), "label", mixup=0.8, cutmix=1.0)
    with pytest.raises(UserError, match="even batch"):
        obj({"image": torch.randn(3, 3, 16, 16), "label": torch.tensor([0, 1, 2])})


def _save_mae(path, **kw):
    mae = MaskedAutoencoderViT(**TINY, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)
    torch.save({"model": mae.state_dict(), "epoch": 3}, path)
    return mae


def test_mae_checkpoint_loads_into_wsp_by_path(tmp_path):
    mae = _save_mae(tmp_path / "model.pt")
    for pool in (False, True):
        clf = load_init(ViTClassifier(24, global_pool=pool, **TINY), InitConfig(str(tmp_path / "model.pt")))
        for name in ("patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "cls_token"):
            assert torch.equal(clf.state_dict()[name], mae.state_dict()[name]), name
        assert clf.head.weight.abs().max() < 1e-2                  # the new head keeps its own small init


def test_wsp_objective_from_config_loads_the_mae_trunk(tmp_path, shapes_manifest):
    mae = _save_mae(tmp_path / "model.pt")
    cfg = load_config(preset="tiny", stage="wsp", overrides=[
        f"data.dataset={shapes_manifest}", f"init.checkpoint={tmp_path / 'model.pt'}", "model.img_size=16",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2"])
    from prepretrain_lit.registry import objective_factory
    obj = objective_factory("wsp")(cfg)
    assert obj.target == "hashtags" and obj.model.num_classes == 24        # the shapes hashtag vocabulary
    assert torch.equal(obj.model.blocks[0].mlp.fc1.weight, mae.blocks[0].mlp.fc1.weight)


def test_a_checkpoint_that_does_not_fit_names_the_sizes_its_run_recorded(tmp_path):
    from prepretrain_lit.presets import save_config
    from prepretrain_lit.vit import vit_from_config
    trained = load_config(preset="tiny")                                  # the run that wrote model.pt: width 64
    torch.save(vit_from_config(trained.model).state_dict(), tmp_path / "model.pt")
    save_config(trained, tmp_path / "config.yaml")
    with pytest.raises(CheckpointMismatchError) as e:
        load_init(ViTClassifier(5, **{**TINY, "embed_dim": 48}), InitConfig(str(tmp_path / "model.pt")))
    assert "records preset 'tiny'" in str(e.value) and "use --preset tiny" in str(e.value)
    assert "--set model.embed_dim=64" in str(e.value)
    (tmp_path / "config.yaml").unlink()                                   # a file from elsewhere: a plain hint
    with pytest.raises(CheckpointMismatchError, match="No config.yaml beside it"):
        load_init(ViTClassifier(5, **{**TINY, "embed_dim": 48}), InitConfig(str(tmp_path / "model.pt")))


def test_wrong_width_checkpoint_is_refused_with_the_keys(tmp_path):
    _save_mae(tmp_path / "model.pt")
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys, e.g. cls_token"):
        load_init(ViTClassifier(5, **{**TINY, "embed_dim": 48}), InitConfig(str(tmp_path / "model.pt")))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_init(ViTClassifier(5, **TINY), InitConfig(str(tmp_path / "nope.pt")))


def test_avg_pool_trunk_gives_its_fc_norm_to_a_cls_model(tmp_path):
    avg = ViTClassifier(5, global_pool=True, **TINY)
    torch.nn.init.normal_(avg.fc_norm.weight)
    torch.save({"model": avg.state_dict()}, tmp_path / "wsp.pt")
    cls = load_init(ViTClassifier(5, global_pool=False, **TINY), InitConfig(str(tmp_path / "wsp.pt")))
    assert torch.equal(cls.norm.weight, avg.fc_norm.weight)


def test_layer_decay_scales_follow_depth():
    obj = ClassificationObjective(ViTClassifier(3, **{**TINY, "depth": 3}))
    scales = {}
    for g in param_groups(obj, 0.05, layer_decay=0.75):
        for p in g["params"]:
            name = next(n for n, q in obj.named_parameters() if q is p)
            scales[name] = g["lr_scale"]
    assert math.isclose(scales["model.cls_token"], 0.75 ** 4)
    assert [round(scales[f"model.blocks.{i}.norm1.weight"], 6) for i in range(3)] == \
        [round(0.75 ** 3, 6), round(0.75 ** 2, 6), 0.75]
    assert scales["model.head.bias"] == 1.0


def test_finetune_recipe_builds_adamw_with_layer_scaled_rates():
    cfg = load_config(preset="tiny", stage="finetune")
    obj = ClassificationObjective(ViTClassifier(3, **TINY))
    opt = build_optimizer(obj, cfg, peak_lr=1e-3, device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    rates = sorted({round(g["lr"], 10) for g in opt.param_groups})
    assert rates[0] == round(1e-3 * 0.65 ** 3, 10) and rates[-1] == 1e-3


def test_lars_adapts_matrices_only():
    from timm.optim import Lars
    cfg = load_config(preset="tiny", stage="linear_probe")
    obj = ClassificationObjective(ViTClassifier(3, **TINY))
    opt = build_optimizer(obj, cfg, peak_lr=0.1, device=torch.device("cpu"))
    assert isinstance(opt, Lars)
    for g in opt.param_groups:
        assert g["always_adapt"] == all(p.ndim > 1 for p in g["params"])
