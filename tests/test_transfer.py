"""Transfer evaluations: the results schema, accuracy, the linear probe, low-shot splits, feature caching, and
each evaluation loading a WSP checkpoint by path and writing results.json."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prepretrain_lit.schema import UserError
from prepretrain_lit.presets import load_config
from prepretrain_lit.objectives import ViTClassifier
from prepretrain_lit.trainer import Trainer
from prepretrain_lit.knn import FeatureSet, topk_correct
from prepretrain_lit.transfer import (FeatureBatches, evaluate, feature_cache_path, lowshot_evaluate, lowshot_indices,
                                      checked_results, summarize_records, write_results)
from prepretrain_lit.objectives import LinearProbe, LinearProbeObjective

TINY_MODEL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def blobs(n=400, classes=4, dim=16, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g) * 3
    return FeatureSet(centres[labels] + spread * torch.randn(n, dim, generator=g), labels, "blobs")


def test_summary_is_mean_and_sample_std_per_metric_and_shots():
    recs = [{"metric": "top1", "value": v, "seed": s, "shots": 1} for s, v in enumerate([10., 20., 30., 40.])]
    recs += [{"metric": "top1", "value": 50., "seed": 0, "shots": None}]
    s = summarize_records(recs)
    assert s["top1@1shot"] == {"mean": 25.0, "std": float(np.std([10, 20, 30, 40], ddof=1)), "n": 4}
    assert s["top1"] == {"mean": 50.0, "std": 0.0, "n": 1}


def test_results_file_has_the_shared_schema(tmp_path):
    path = write_results(tmp_path, "linear_probe", "digits-test", [{"metric": "top1", "value": 91.5, "step": 7}],
                         init="runs/x/model.pt", train_dataset="digits-train", cfg=load_config(preset="tiny"))
    doc = json.loads(path.read_text())
    assert set(doc) == {"schema_version", "kind", "dataset", "train_dataset", "init", "config_hash", "records", "summary"}
    assert doc["records"] == [{"metric": "top1", "value": 91.5, "seed": None, "shots": None, "step": 7}]
    with pytest.raises(ValueError, match="kind must be one of"):
        write_results(tmp_path, "probe", "x", [])


def test_topk_counts():
    scores = torch.tensor([[0., 1, 2, 3, 4, 5, 6], [6., 5, 4, 3, 2, 1, 0], [1., .5, .2, 9, .1, .05, 0]])
    assert topk_correct(scores, torch.tensor([6, 5, 0])) == {1: 1, 5: 2}   # the 2nd image's label ranks 6th
    assert topk_correct(scores, torch.tensor([6, 2, 3])) == {1: 2, 5: 3}


def test_linear_probe_separates_separable_features():
    fs = blobs()
    cfg = load_config(preset="tiny", stage="linear_probe", overrides=["train.steps=60", "data.batch_size=64",
                                                                      "optim.base_lr=1.0", "train.log_every=20"])
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        probe = LinearProbeObjective(LinearProbe(16, 4))
        Trainer(cfg, probe, FeatureBatches(fs, 64), d, progress=False).fit()
    with torch.no_grad(): acc = (probe.model.eval()(fs.features).argmax(1) == fs.labels).float().mean().item()
    assert acc >= 0.99


def test_linear_probe_has_no_affine_norm():
    probe = LinearProbe(8, 3)
    assert not probe.bn.affine and [n for n, _ in probe.named_parameters()] == ["head.weight", "head.bias"]


def test_feature_batches_resume_exactly():
    fs = blobs(n=100)
    a = FeatureBatches(fs, 16, seed=3).batches(0)
    first = [next(a)["label"] for _ in range(9)]         # crosses an epoch (6 batches per epoch)
    resumed = FeatureBatches(fs, 16, seed=3).batches(4)
    assert all(torch.equal(first[i], next(resumed)["label"]) for i in range(4, 9))


def test_lowshot_splits_have_exactly_k_per_class_and_differ_by_seed():
    labels = np.repeat(np.arange(10), 30)
    for k in (1, 5, 10):
        splits = [lowshot_indices(labels, k, seed) for seed in range(5)]
        for idx in splits:
            assert np.bincount(labels[idx], minlength=10).tolist() == [k] * 10
            assert len(set(idx.tolist())) == len(idx)
        assert len({tuple(s) for s in splits}) == 5


def test_lowshot_refuses_too_few_examples():
    with pytest.raises(UserError, match="fewer than 10 shots"):
        lowshot_indices(np.array([0] * 20 + [1] * 3), 10, 0)


def test_lowshot_records_per_shot_and_seed_and_learns():
    train, test = blobs(seed=0), blobs(seed=0, n=200)
    recs = lowshot_evaluate(train, test, shots=(1, 10), splits=2)
    assert [(r["shots"], r["seed"]) for r in recs] == [(1, 0), (1, 1), (10, 0), (10, 1)]
    assert all(r["value"] > 90 for r in recs if r["shots"] == 10)


def test_feature_cache_is_keyed_by_trunk_and_dataset(tmp_path):
    ckpt = tmp_path / "wsp" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    cfg = load_config(preset="tiny", overrides=[f"init.checkpoint={ckpt}"])
    p = feature_cache_path(cfg, "a/digits-train.yaml", tmp_path / "eval")
    assert p.parent == ckpt.parent / "features"                       # beside the trunk, shared by its probes
    assert p == feature_cache_path(load_config(preset="tiny", overrides=[f"init.checkpoint={ckpt}", "seed=5"]),
                                   "a/digits-train.yaml", tmp_path / "other")      # seeds and folders share it
    assert p != feature_cache_path(cfg, "a/digits-test.yaml", tmp_path / "eval")
    assert p != feature_cache_path(load_config(preset="tiny", overrides=[f"init.checkpoint={ckpt}", "probe.pool=avg"]),
                                   "a/digits-train.yaml", tmp_path / "eval")


def _wsp_checkpoint(tmp_path, num_tags=24):
    torch.manual_seed(0)
    wsp = ViTClassifier(num_tags, global_pool=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "wsp" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": wsp.state_dict()}, path)
    return path


@pytest.mark.parametrize("kind, stage, extra", [
    ("lowshot", "lowshot", ["probe.shots=[1,2]", "probe.splits=2"]),
    ("knn", "knn", ["probe.knn_k=5", "probe.knn_temperature=0.1"]),
    ("linear_probe", "linear_probe", ["train.steps=10", "data.batch_size=64"]),
    ("finetune", "finetune", ["train.steps=4", "data.batch_size=16", "eval.batch_size=128"]),
])
def test_each_evaluation_loads_a_wsp_checkpoint_and_writes_results(tmp_path, digits_manifests, kind, stage, extra):
    train_m, test_m = digits_manifests
    ckpt = _wsp_checkpoint(tmp_path)
    cfg = load_config(preset="tiny", stage=stage, overrides=TINY_MODEL + extra + [
        f"init.checkpoint={ckpt}", f"data.dataset={train_m}", f"eval.dataset={test_m}", "data.num_workers=0",
        "eval.num_workers=0", "train.log_every=2", "train.checkpoint_every=100"])
    out = tmp_path / kind
    doc = evaluate(kind, cfg, out, progress=False)
    assert checked_results(out) == doc and doc["kind"] == kind and doc["init"] == str(ckpt)
    assert doc["dataset"] == "digits-test" and doc["train_dataset"] == "digits-train"
    assert all(0 <= r["value"] <= 100 for r in doc["records"])
    if kind == "lowshot":
        assert sorted(doc["summary"]) == ["top1@1shot", "top1@2shot"] and len(doc["records"]) == 4
    else:
        assert {r["metric"] for r in doc["records"]} == {"top1", "top5"}
    if kind == "finetune": assert "baselines" not in doc             # no frozen features: no pixel arm
    else:                                                            # the same protocol on the raw pixels, its own arm
        pixels = doc["baselines"]["pixels"]
        assert sorted(pixels["summary"]) == sorted(doc["summary"]) and len(pixels["records"]) == len(doc["records"])
        top1 = [r["value"] for r in pixels["records"] if r["metric"] == "top1"]
        assert min(top1) > {"lowshot": 40, "knn": 85, "linear_probe": 60}[kind], top1   # digits' pixels are strong
        if kind == "knn": assert all(r["seed"] is None for r in pixels["records"])    # nothing seeds it
    mtime = (out / "results.json").stat().st_mtime_ns
    assert evaluate(kind, cfg, out, progress=False) == doc                     # done: returned, not recomputed
    assert (out / "results.json").stat().st_mtime_ns == mtime


def test_evaluation_input_errors_come_before_compute(tmp_path, digits_manifests):
    train_m, test_m = digits_manifests
    base = [f"data.dataset={train_m}"]
    with pytest.raises(UserError, match="eval.dataset is not set"):
        evaluate("lowshot", load_config(preset="tiny", stage="lowshot", overrides=base), tmp_path / "a")
    with pytest.raises(UserError, match="no such file"):
        evaluate("lowshot", load_config(preset="tiny", stage="lowshot", overrides=base + [
            f"eval.dataset={test_m}", f"init.checkpoint={tmp_path / 'missing.pt'}"]), tmp_path / "b")
    with pytest.raises(UserError, match="unknown evaluation 'probe'"):
        evaluate("probe", load_config(preset="tiny"), tmp_path / "c")
    with pytest.raises(UserError, match="needs stage 'finetune'"):
        evaluate("finetune", load_config(preset="tiny", stage="wsp"), tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- at cluster size ---------------------------------------------------------------------------------------------
def test_distributed_feature_extraction_equals_one_process(tmp_path, digits_manifests):
    "Two gloo processes, each extracting its shards' share, gather into exactly the one-process features (key order)."
    from prepretrain_lit.distributed import launch
    from prepretrain_lit.transfer import cached_features, extract_to_cache, features_worker, load_features
    test = digits_manifests[1]
    cfg = load_config(preset="tiny", overrides=[*TINY_MODEL, "train.device=cpu", "eval.batch_size=64"])
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    extract_to_cache(cfg, str(test), one, progress=False)
    launch(features_worker, cfg, str(test), str(two), nprocs=2)
    a, b = load_features(one), load_features(two)
    assert len(a) == 450 and torch.equal(a.labels, b.labels)
    assert torch.allclose(a.features, b.features, atol=1e-6)
    assert not list(tmp_path.glob("*.part-*"))                       # the shares were joined and removed
    with pytest.raises(ValueError, match="two shares"):
        from prepretrain_lit.knn import gather_features
        gather_features([FeatureSet(a.features[:2], a.labels[:2], "x", ["k1", "k2"])] * 2)


def test_feature_batches_draw_one_permutation_per_epoch(monkeypatch):
    "No O(N) work per step: the epoch's permutation is drawn once, and the batches are those of a fresh draw."
    fs = blobs(n=400)
    expected = [b["label"].clone() for _, b in zip(range(50), FeatureBatches(fs, 16).batches(0))]
    calls = []
    real = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = [b["label"] for _, b in zip(range(50), FeatureBatches(fs, 16).batches(0))]   # 25 steps an epoch: 2 epochs
    assert len(calls) == 2 and all(torch.equal(x, y) for x, y in zip(got, expected))


# --- weighted k-NN (DINO) ----------------------------------------------------------------------------------------

def test_knn_matches_a_hand_computed_case():
    from prepretrain_lit.knn import knn_scores
    # test point (1, 0); neighbours (1, 0) class 0 (cos 1), (0.6, 0.8) class 1 (cos 0.6), (0, 1) class 1 (cos 0)
    train = FeatureSet(torch.tensor([[3.0, 0.0], [0.6, 0.8], [0.0, 2.0]]), torch.tensor([0, 1, 1]), "tr")
    test = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), "te")
    T = 0.5
    scores = knn_scores(train, test, k=3, temperature=T) * np.exp(1 / T)      # the code drops exp(1/T) per row
    expected = [np.exp(1 / T), np.exp(0.6 / T) + np.exp(0.0 / T)]            # 7.389 vs 3.320 + 1
    assert torch.allclose(scores, torch.tensor([expected], dtype=torch.float32), rtol=1e-5)
    # k = 2 drops the (0, 1) neighbour: class 1 keeps the one vote exp(0.6 / T)
    assert knn_scores(train, test, k=2, temperature=10.0)[0, 1] * np.exp(0.1) == pytest.approx(np.exp(0.06), rel=1e-5)
    # at a large T the weights are ~1: class 1's two votes beat class 0's one
    assert knn_scores(train, test, k=3, temperature=1e4).argmax(1).tolist() == [1]


@pytest.mark.parametrize("k, T", [(1, 0.07), (5, 0.07), (20, 0.1), (7, 1.0)])
def test_knn_agrees_with_sklearn_on_the_same_features(k, T):
    """scikit-learn's KNeighborsClassifier with cosine distance d = 1 - cos and weights exp((1 - d) / T) is the
    same classifier: on continuous random features (no ties in distance) the predictions agree exactly."""
    from sklearn.neighbors import KNeighborsClassifier
    from prepretrain_lit.knn import knn_evaluate, knn_scores
    train, test = blobs(n=300, classes=5, seed=1, spread=2.0), blobs(n=200, classes=5, seed=2, spread=2.0)
    ours = knn_scores(train, test, k=k, temperature=T).argmax(1).numpy()
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / T)).fit(train.features.numpy(), train.labels.numpy())
    theirs = clf.predict(test.features.numpy())
    assert (ours == theirs).all()
    acc = 100.0 * float((theirs == test.labels.numpy()).mean())
    assert knn_evaluate(train, test, k=k, temperature=T)[0]["value"] == pytest.approx(acc)


def test_knn_with_a_large_temperature_is_uniform_majority_vote():
    "T -> infinity: every weight is ~1, so the k-NN is scikit-learn's uniform-weight majority (odd k, 2 classes: no ties)."
    from sklearn.neighbors import KNeighborsClassifier
    from prepretrain_lit.knn import knn_scores
    train, test = blobs(n=200, classes=2, seed=3, spread=3.0), blobs(n=100, classes=2, seed=4, spread=3.0)
    ours = knn_scores(train, test, k=9, temperature=1e6).argmax(1).numpy()
    theirs = KNeighborsClassifier(n_neighbors=9, metric="cosine", algorithm="brute").fit(
        train.features.numpy(), train.labels.numpy()).predict(test.features.numpy())
    assert (ours == theirs).all()


def test_light_transform_never_mirrors_and_is_chosen_by_data_transform():
    "data.transform=light: a crop and normalise only; a digit is never flipped (a mirrored 2 is not a 2)."
    from PIL import Image
    from prepretrain_lit.schema import ConfigError
    from prepretrain_lit.decode import TRANSFORMS
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = 255                                                         # left half white
    t = TRANSFORMS["light"](32, scale=(1.0, 1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        x = t(Image.fromarray(img))
        assert x.shape == (3, 32, 32) and x[:, :, :8].mean() > x[:, :, -8:].mean()
    assert load_config(preset="tiny", stage="finetune", overrides=["data.transform=light"]).data.transform == "light"
    with pytest.raises(ConfigError, match="unknown data.transform 'heavy'"):
        load_config(preset="tiny", overrides=["data.transform=heavy"])


def count_manifest_loads(monkeypatch) -> dict:
    """Count `load_manifest` calls by manifest path, wherever they are made: its own module's name (looked up there by
    the functions that import it when called, as the k-NN chapter's `labelled_manifest` does) and the names data and
    the loader import."""
    import collections
    import prepretrain_lit.data as data
    import prepretrain_lit.loader as loader
    import prepretrain_lit.manifest as manifest
    counts, real = collections.Counter(), manifest.load_manifest
    def counting(path, *args, **kwargs):
        counts[str(Path(path).resolve())] += 1
        return real(path, *args, **kwargs)
    for module in (manifest, data, loader):
        if hasattr(module, "load_manifest"): monkeypatch.setattr(module, "load_manifest", counting)
    return counts


def test_one_zeroshot_evaluation_loads_its_test_manifest_once(tmp_path, monkeypatch):
    "The zero-shot evaluation loaded its test manifest five times (check, eval_manifest twice, loader, results)."
    import warnings
    from prepretrain_lit.data import build_shards, shapes_source
    train_m = build_shards(shapes_source(32, size=16), tmp_path / "train", shard_size=32, progress=False)
    test_m = build_shards(shapes_source(16, seed=1, size=16), tmp_path / "test", shard_size=16, progress=False)
    cfg = load_config(preset="tiny", stage="lit", overrides=TINY_MODEL + [
        "lit.embed_dim=16", "lit.text_width=16", "lit.text_layers=1", "lit.text_heads=2", "lit.context_length=16",
        f"data.dataset={train_m}", f"eval.dataset={test_m}", "data.num_workers=0", "eval.num_workers=0",
        "data.batch_size=8", "train.steps=1", "train.checkpoint_every=1", "train.log_every=1"])
    counts = count_manifest_loads(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the random locked tower
        evaluate("zeroshot", cfg, tmp_path / "run", progress=False)
    assert counts == {str(test_m.resolve()): 1, str(train_m.resolve()): 1}, counts   # the trainer's loader: 1


def test_one_finetune_evaluation_loads_each_manifest_once_in_the_evaluation(tmp_path, digits_manifests, monkeypatch):
    """The evaluation loads its test and training manifests once and passes them down (it loaded the test set 3 times,
    the training set 5); the trainer's stage, which may run in other processes, reads the training set for itself:
    the head's size (the objective) and the loader."""
    train_m, test_m = digits_manifests
    cfg = load_config(preset="tiny", stage="finetune", overrides=TINY_MODEL + [
        f"data.dataset={train_m}", f"eval.dataset={test_m}", "data.num_workers=0", "eval.num_workers=0",
        "data.batch_size=16", "eval.batch_size=256", "train.steps=1", "train.checkpoint_every=1", "train.log_every=1"])
    counts = count_manifest_loads(monkeypatch)
    evaluate("finetune", cfg, tmp_path / "run", progress=False)
    assert counts == {str(test_m.resolve()): 1, str(train_m.resolve()): 3}, counts


@pytest.mark.multiproc
def test_the_linear_probe_trains_in_two_processes_with_its_data_builder(tmp_path, digits_manifests):
    "`train_stage(..., nprocs=2, data=probe_data)`: the data builder is sent to the launched processes (it pickles)."
    train_m, test_m = digits_manifests
    ckpt = _wsp_checkpoint(tmp_path)
    cfg = load_config(preset="tiny", stage="linear_probe", overrides=TINY_MODEL + [
        f"init.checkpoint={ckpt}", f"data.dataset={train_m}", f"eval.dataset={test_m}", "data.num_workers=0",
        "eval.num_workers=0", "train.steps=4", "data.batch_size=32", "train.log_every=2", "train.checkpoint_every=4"])
    doc = evaluate("linear_probe", cfg, tmp_path / "probe", progress=False, nprocs=2)
    assert {r["metric"] for r in doc["records"]} == {"top1", "top5"}
    assert json.loads((tmp_path / "probe" / "status.json").read_text())["state"] == "complete"


def test_pixel_features_are_the_normalised_image_area_averaged(digits_manifests):
    "The raw-pixel arm's vector is the evaluation image itself, averaged over s x s blocks when larger than `size`."
    from prepretrain_lit.knn import eval_loader
    from prepretrain_lit.transfer import pixel_features
    test = str(digits_manifests[1])
    full, small = pixel_features(test, 16, size=32), pixel_features(test, 16, size=4)
    assert full.features.shape == (450, 3 * 16 * 16) and small.features.shape == (450, 3 * 4 * 4)
    images = torch.cat([b["image"] for b in eval_loader(test, 16, 450, 0)])          # one batch, key order as read
    keys = [k for b in eval_loader(test, 16, 450, 0) for k in b["key"]]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    blocks = images[order].reshape(450, 3, 4, 4, 4, 4).mean(dim=(3, 5))               # 4x4 blocks by hand
    assert torch.allclose(full.features, images[order].flatten(1))
    assert torch.allclose(small.features, blocks.flatten(1), atol=1e-6)


def test_probe_pixels_zero_turns_the_pixel_arm_off(tmp_path, digits_manifests):
    train_m, test_m = digits_manifests
    cfg = load_config(preset="tiny", stage="knn", overrides=TINY_MODEL + [
        "probe.knn_k=5", "probe.pixels=0", f"data.dataset={train_m}", f"eval.dataset={test_m}"])
    assert "baselines" not in evaluate("knn", cfg, tmp_path / "knn", progress=False)
    with pytest.raises(Exception, match="probe.pixels=-1"):
        load_config(preset="tiny", stage="knn", overrides=["probe.pixels=-1"]).check()


def test_a_manifest_rebuilt_in_place_is_another_feature_cache_key(tmp_path):
    "Features cached for one build of a manifest are never read for another build at the same path (other images)."
    import os
    ckpt = _wsp_checkpoint(tmp_path)
    cfg = load_config(preset="tiny", overrides=[f"init.checkpoint={ckpt}"])
    manifest = tmp_path / "data" / "set.yaml"
    manifest.parent.mkdir(); manifest.write_text("name: set\n")
    before = feature_cache_path(cfg, str(manifest), tmp_path / "eval")
    assert before == feature_cache_path(cfg, str(manifest), tmp_path / "eval")
    manifest.write_text("name: set\nnum_samples: 3\n")                 # rebuilt: new contents and time
    os.utime(manifest, ns=(1, 1))
    assert feature_cache_path(cfg, str(manifest), tmp_path / "eval") != before


def test_shape_id_is_a_judge_raw_pixels_do_not_pass(tmp_path):
    "The built-in shape-id splits: built from their manifests, disjoint, balanced enough, and far from solved by pixels."
    from prepretrain_lit.data import build_from_recipe, shipped_manifest
    from prepretrain_lit.manifest import load_manifest
    from prepretrain_lit.knn import knn_evaluate
    from prepretrain_lit.transfer import pixel_features
    train, test = (build_from_recipe(shipped_manifest(f"shape-id-{s}"), tmp_path / s, progress=False) for s in ("train", "test"))
    assert (load_manifest(train).num_samples, load_manifest(test).num_samples) == (2000, 1000)
    a, b = pixel_features(str(train), 32), pixel_features(str(test), 32)
    assert set(a.labels.tolist()) == set(range(6)) and min(np.bincount(b.labels.numpy())) > 100
    assert torch.cdist(b.features[:50], a.features).min() > 1.0                 # no test image is a training image
    top1 = knn_evaluate(a, b)[0]["value"]
    assert 20 < top1 < 40, top1                                                   # above chance (16.7%), far below a learner
