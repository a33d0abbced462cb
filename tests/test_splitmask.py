"""SplitMask: the split, each direction's loss, InfoNCE, global negatives under DDP, token targets, learning."""
import json

import pytest
import torch
import torch.nn.functional as F

from prepretrain_lit.presets import load_config
from prepretrain_lit.data import build_shards, shapes_source
from prepretrain_lit.splitmask import SplitMaskViT, gather_tokens, info_nce, split_patches
from prepretrain_lit.distributed import launch
from prepretrain_lit.trainer import train, train_worker
from prepretrain_lit.vit import ViT, load_trunk

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_num_heads=4,
             projection_dim=16)


def small(**kw) -> SplitMaskViT:
    torch.manual_seed(0)
    return SplitMaskViT(**{**SMALL, **kw})


@pytest.mark.parametrize("L, ratio", [(64, 0.5), (64, 0.25), (49, 0.5), (10, 0.7)])
def test_the_split_is_disjoint_and_covers_every_patch(L, ratio):
    noise = torch.rand(5, L)
    ids_a, ids_b = split_patches(noise, ratio)
    k = int(L * ratio)
    for n in range(5):
        a, b = set(ids_a[n, :k].tolist()), set(ids_b[n, :L - k].tolist())
        assert not a & b and a | b == set(range(L)) and len(a) == k
        assert a == set(torch.topk(noise[n], k, largest=False).indices.tolist())   # smallest noise is A


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("target", ["pixels", "kmeans"])
def test_each_direction_counts_only_the_other_subsets_patches(direction, target):
    model = small(target=target, kmeans_clusters=8)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 64)
    if target == "kmeans": model.fit_tokenizer(torch.randn(16, 3, 32, 32))
    _, parts = model(imgs, noise)
    ids = split_patches(noise, 0.5)[direction]
    restore = torch.argsort(ids, dim=1)
    with torch.no_grad():
        pred, _ = model.decode(model.forward_tokens(gather_tokens(model.patch_tokens(imgs), ids[:, :32])), restore)
        predicted = (restore >= 32).float()
        target_t = model.targets(imgs)
        own = pred + (1 - predicted).unsqueeze(-1) * torch.randn_like(pred) * 10
        other = pred + predicted.unsqueeze(-1) * torch.randn_like(pred) * 10
        name = ("inpaint_ab", "inpaint_ba")[direction]
        torch.testing.assert_close(model.inpaint_loss(pred, target_t, predicted), parts[name])
        torch.testing.assert_close(model.inpaint_loss(own, target_t, predicted), parts[name])
        assert not torch.isclose(model.inpaint_loss(other, target_t, predicted), parts[name])
    assert predicted.sum(1).tolist() == [32.0] * 3


def test_info_nce_against_a_direct_computation_and_its_minimum():
    torch.manual_seed(0)
    z_a, z_b = F.normalize(torch.randn(8, 5), dim=-1), F.normalize(torch.randn(8, 5), dim=-1)
    logits = z_a @ z_b.T / 0.5
    direct = 0.5 * (-(logits.diag() - logits.logsumexp(1)).mean() - (logits.diag() - logits.logsumexp(0)).mean())
    loss, accuracy = info_nce(z_a, z_b, 0.5)
    torch.testing.assert_close(loss, direct)
    separated = F.normalize(torch.eye(8), dim=-1)
    matched, acc = info_nce(separated, separated, 0.1)
    assert acc == 1.0 and matched < info_nce(separated, separated.roll(1, 0), 0.1)[0]
    assert matched < loss


def test_the_total_combines_both_directions_and_lambda():
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    loss, parts = small(infonce_weight=0.3)(imgs, noise)
    torch.testing.assert_close(loss, 0.5 * (parts["inpaint_ab"] + parts["inpaint_ba"]) + 0.3 * parts["infonce"])


def test_a_splitmask_trunk_loads_like_a_mae_trunk(tmp_path):
    model = small()
    torch.save({"model": model.state_dict()}, tmp_path / "model.pt")
    trunk = load_trunk(ViT(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4), tmp_path / "model.pt").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(trunk(x), model.eval().forward_features(x))


@pytest.mark.multiproc
@pytest.mark.slow
def test_negatives_gathered_across_two_ranks_equal_the_global_batch(tmp_path):
    base = ["data.dataset=synthetic", "model.depth=2", "train.log_every=1", "train.steps=2", "train.precision=fp32"]
    train("splitmask", load_config(preset="tiny", overrides=[*base, "data.batch_size=16"]), tmp_path / "one", progress=False)
    launch(train_worker, "splitmask", load_config(preset="tiny", overrides=[*base, "data.batch_size=8"]), str(tmp_path / "two"), nprocs=2)
    one = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert two == pytest.approx(one, rel=1e-5)      # per-rank negatives would give a different InfoNCE
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["model"]
    for name in a: torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["pixels", "kmeans"])
def test_a_few_steps_on_the_builtin_data_lower_the_loss(tmp_path, target):
    manifest = build_shards(shapes_source(400, size=32), tmp_path / "shapes", shard_size=100, progress=False)
    cfg = load_config(preset="tiny", overrides=[f"data.dataset={manifest}", "train.steps=30", "train.log_every=5",
                                                "optim.base_lr=2e-3", "data.num_workers=0", f"splitmask.target={target}",
                                                "splitmask.kmeans_clusters=16", "splitmask.kmeans_samples=64"])
    train("splitmask", cfg, tmp_path / "run", progress=False)
    curve = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1] < curve[0]
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    if target == "kmeans":
        assert state["centroids"].shape == (16, 48) and state["centroids"].abs().sum() > 0   # fitted, and saved


def test_each_part_is_logged(tmp_path):
    cfg = load_config(preset="tiny", overrides=["data.dataset=synthetic", "train.steps=2", "train.log_every=1",
                                                "splitmask.infonce_weight=0.5"])
    last = train("splitmask", cfg, tmp_path, progress=False)
    for name in ("inpaint_ab", "inpaint_ba", "infonce", "match_accuracy"): assert name in last
    assert last["loss"] == pytest.approx(0.5 * (last["inpaint_ab"] + last["inpaint_ba"]) + 0.5 * last["infonce"], rel=1e-5)
