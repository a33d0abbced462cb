"""The data path at IG-3B size, simulated small: manifests parsed once per process and loaded from a compact
sidecar, sparse hashtag targets, builds whose jobs carry row ranges, subsets without all keys in one process,
checksum verification split across ranks, subsets as shard prefixes (build and reshard), bad source files."""
import hashlib
import pickle
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import prepretrain_lit.data as data
from prepretrain_lit.subsets import score_histogram
from prepretrain_lit.tars import read_shard_samples, reshard
import prepretrain_lit.manifest as manifest_module
from prepretrain_lit.schema import DataConfig, UserError
from prepretrain_lit.presets import load_config
from prepretrain_lit.manifest import ManifestError, load_manifest, parse_manifest, write_manifest, write_shard
from prepretrain_lit.data import build_shards, imagefolder_source, shapes_source, table_source, verify_manifest
from prepretrain_lit.subsets import in_subset, nested_subsets, subset_score
from prepretrain_lit.loader import ShardStream, collate_samples, make_loader

TINY_MODEL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]


def shapes(tmp_path: Path, n=120, shard_size=30, **kw) -> Path:
    return build_shards(shapes_source(n, seed=0, size=16), tmp_path, shard_size=shard_size, fmt="png", progress=False, **kw)


def count_parses(monkeypatch) -> Counter:
    "Count `parse_manifest` calls per manifest file (the YAML's resolved path), where `load_manifest` calls it."
    counts, real = Counter(), manifest_module.parse_manifest
    def counting(fields, path="<manifest>"):
        counts[str(Path(path).resolve())] += 1
        return real(fields, path)
    monkeypatch.setattr(manifest_module, "parse_manifest", counting)
    return counts


# -- 1. manifests: parsed once per process, a compact sidecar -----------------------------------------------

def test_a_whole_training_parses_its_manifest_once(tmp_path, monkeypatch):
    from prepretrain_lit.trainer import train
    manifest = shapes(tmp_path / "shapes")
    counts = count_parses(monkeypatch)
    cfg = load_config(preset="tiny", stage="wsp", overrides=TINY_MODEL + [
        f"data.dataset={manifest}", "data.num_workers=0", "data.batch_size=8", "train.steps=2",
        "train.log_every=1", "train.checkpoint_every=2", "data.verify_checksums=true"])
    train("wsp", cfg, tmp_path / "run", progress=False)
    assert counts == {str(manifest.resolve()): 1}


def test_a_whole_zero_shot_evaluation_parses_each_manifest_once(tmp_path, monkeypatch):
    from prepretrain_lit import transfer
    train_m = shapes(tmp_path / "train", n=64, shard_size=32)
    test_m = build_shards(shapes_source(40, seed=1, size=16), tmp_path / "test", shard_size=40, fmt="png", progress=False)
    counts = count_parses(monkeypatch)
    cfg = load_config(preset="tiny", stage="lit", overrides=TINY_MODEL + [
        "lit.embed_dim=16", "lit.text_width=16", "lit.text_layers=1", "lit.text_heads=2", "lit.context_length=16",
        f"data.dataset={train_m}", f"eval.dataset={test_m}", "data.num_workers=0", "eval.num_workers=0",
        "data.batch_size=8", "train.steps=2", "train.checkpoint_every=2", "train.log_every=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transfer.zeroshot_evaluate(cfg, tmp_path / "run", progress=False)
    assert counts == {str(train_m.resolve()): 1, str(test_m.resolve()): 1}


def test_a_changed_manifest_file_is_read_again(tmp_path):
    path = shapes(tmp_path)
    first = load_manifest(path)
    assert load_manifest(path) is first and load_manifest(path.parent / ".." / path.parent.name / path.name) is first
    fields = yaml.safe_load(Path(path).read_text())
    fields["description"] = "edited"
    write_manifest(path, fields)
    assert load_manifest(path).description == "edited"


def big_fields(num_shards: int) -> dict:
    rng = np.random.default_rng(0)
    counts = rng.integers(9_000, 11_000, num_shards)
    return {"name": "ig", "format": "webdataset", "num_samples": int(counts.sum()),
            "shards": f"/data/ig/ig-{{000000..{num_shards - 1:06d}}}.tar", "shard_samples": counts.tolist(),
            "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(num_shards)], "label_field": None,
            "num_hashtags": 28000, "subsets": {"10k": 10_000}}


def test_sidecar_holds_counts_and_checksums_and_loads_like_inline(tmp_path):
    fields = big_fields(50)
    (tmp_path / "inline").mkdir()
    inline = write_manifest(tmp_path / "inline" / "ig.yaml", fields, sidecar=False)
    side = write_manifest(tmp_path / "ig.yaml", fields, sidecar=True)
    text = side.read_text()
    assert "sidecar: ig.shards.npz" in text and "shard_samples" not in text and len(text) < 1000   # readable YAML
    a, b = load_manifest(inline), load_manifest(side)
    assert a.shard_samples == b.shard_samples == fields["shard_samples"] and list(b.sha256) == fields["sha256"]
    assert b.sha256[3] == fields["sha256"][3] and b.shards == a.shards
    with pytest.raises(ManifestError, match="both given"):
        parse_manifest({**fields, "sidecar": "ig.shards.npz"}, side)
    with pytest.raises(ManifestError, match="has 50 shard_samples for 60 shards"):
        parse_manifest({**{k: v for k, v in fields.items() if k not in ("shard_samples", "sha256")},
                        "shards": "/data/ig/ig-{000000..000059}.tar", "sidecar": "ig.shards.npz"}, side)


def test_a_300k_shard_manifest_loads_in_under_100_mb(tmp_path):
    fields = big_fields(300_000)
    path = write_manifest(tmp_path / "ig.yaml", fields)         # 300k shards: the sidecar by default
    assert "sidecar" in path.read_text()
    tracemalloc.start()
    m = load_manifest(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(m.shards) == 300_000 and m.shard_samples[-1] == fields["shard_samples"][-1]
    assert m.sha256[-1] == fields["sha256"][-1]
    assert peak < 100 * 2 ** 20, f"loading took {peak / 2 ** 20:.0f} MB"


# -- 2. sparse hashtag targets -------------------------------------------------------------------------------

def hashtag_corpus(tmp_path: Path, vocab_size: int) -> Path:
    "20 tagged samples; the vocabulary holds their 24 tags plus padding up to `vocab_size`."
    path = shapes(tmp_path / f"v{vocab_size}", n=20, shard_size=20)
    fields = yaml.safe_load(path.read_text())
    fields["hashtags"] += [f"pad{i}" for i in range(vocab_size - len(fields["hashtags"]))]
    return write_manifest(path, fields)


def test_batch_memory_does_not_grow_with_the_vocabulary(tmp_path):
    sizes = {}
    for vocab in (24, 28_000):
        batch = next(iter(make_loader(DataConfig(dataset=str(hashtag_corpus(tmp_path, vocab)), batch_size=20,
                                                 num_workers=0, shuffle_buffer=1), None)))
        sizes[vocab] = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
        tags = batch["hashtags"]
        assert tags.dtype == torch.long and tags.shape[0] == 20 and (tags < 24).all()
    assert sizes[24] == sizes[28_000] and sizes[28_000] < 20 * 28_000    # dense would be 20 x 28K floats


def test_sparse_targets_give_the_dense_loss_and_gradient():
    from prepretrain_lit.objectives import hashtag_targets, multi_hot, soft_cross_entropy, wsp_loss
    torch.manual_seed(0)
    items = [{"hashtags": torch.tensor(t, dtype=torch.long)} for t in ([3, 7, 9], [], [0], [1, 2, 3, 4, 5])]
    idx = collate_samples(items)["hashtags"]
    assert idx.shape == (4, 5) and idx[1].tolist() == [-1] * 5
    dense = multi_hot(idx, 12)
    assert dense.sum(1).tolist() == [3, 0, 1, 5]
    z1 = torch.randn(4, 12, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    wsp_loss(z1, idx).backward()
    targets, has_tag = hashtag_targets(dense)
    soft_cross_entropy(z2, targets, has_tag).backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_a_manifest_without_a_hashtag_vocabulary_is_refused_before_compute(tmp_path):
    from prepretrain_lit.objectives import wsp_objective
    path = shapes(tmp_path, n=20, shard_size=20)
    fields = yaml.safe_load(path.read_text())
    del fields["hashtags"]
    fields["num_hashtags"] = 28000                   # the IG template as shipped
    write_manifest(path, fields)
    cfg = load_config(preset="tiny", stage="wsp", overrides=TINY_MODEL + [f"data.dataset={path}"])
    with pytest.raises(UserError, match="no 'hashtags' vocabulary.*List the vocabulary under 'hashtags'"):
        wsp_objective(cfg)


def test_pin_memory_follows_the_trainers_device(tmp_path):
    from prepretrain_lit.distributed import DistInfo
    from prepretrain_lit.trainer import build_data
    cfg = load_config(preset="tiny", stage="mae", overrides=TINY_MODEL + [f"data.dataset={shapes(tmp_path)}",
                                                                          "data.num_workers=0"])
    assert build_data("mae", cfg, DistInfo(device=torch.device("cpu"))).loader.pin_memory is False
    loader = make_loader(DataConfig(dataset=cfg.data.dataset, num_workers=0), None, pin_memory=True)
    assert loader.loader.pin_memory is True


# -- 3. building and verifying at scale ----------------------------------------------------------------------

class InlineExecutor:
    "A `ProcessPoolExecutor` stand-in that records what would be pickled to the workers, and runs inline."
    payloads: list[int] = []
    setup: list[int] = []

    def __init__(self, workers, initializer=None, initargs=()):
        InlineExecutor.setup.append(len(pickle.dumps(initargs)))
        if initializer: initializer(*initargs)
    def __enter__(self): return self
    def __exit__(self, *exc):
        data._set_worker_source(None) if hasattr(data, "_set_worker_source") else None
    def map(self, fn, *iterables):
        for args in zip(*iterables):
            InlineExecutor.payloads.append(len(pickle.dumps(args)))
            yield fn(*args)


def test_build_jobs_carry_row_ranges_not_the_source_table(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    monkeypatch.setattr(data, "ProcessPoolExecutor", InlineExecutor)
    per_job = {}
    for n in (40, 400):
        rows = "\n".join(f"red.png,red,,{'a caption that makes the table big ' * 20}{i}" for i in range(n))
        (tmp_path / f"list{n}.csv").write_text("path,label,hashtags,caption\n" + rows + "\n")
        InlineExecutor.payloads = []
        build_shards(table_source(tmp_path / f"list{n}.csv"), tmp_path / f"out{n}", shard_size=10, workers=2, progress=False)
        per_job[n] = max(InlineExecutor.payloads)
    assert per_job[400] < 2000 and per_job[400] <= per_job[40] + 100      # 10x the table, the same job size


def old_nested_subsets(keys, sizes):
    "Today's function (before this change), kept as the reference: all keys' scores sorted in one process."
    scores = np.sort(np.array([subset_score(k) for k in keys]))
    out = {}
    for name, size in sorted(sizes.items(), key=lambda kv: kv[1]):
        threshold = 1.0 if size == len(keys) else float((scores[size - 1] + scores[size]) / 2)
        out[name] = {"size": int(size), "threshold": threshold}
    return out


@pytest.mark.parametrize("num_buckets", [1, 7, 64, 1 << 16])
def test_bucketed_subsets_equal_the_sorted_ones(num_buckets):
    keys = [f"{i:09d}" for i in range(3000)]
    sizes = {"a": 1, "b": 17, "c": 500, "d": 1499, "e": 2999, "all": 3000}
    new = nested_subsets(lambda: iter(keys), sizes, num_buckets=num_buckets)     # streamed: keys are never a list here
    assert new == old_nested_subsets(keys, sizes)
    m = parse_manifest(dict(name="k", format="webdataset", num_samples=3000, shards="k.tar", subsets=new), "k.yaml")
    for name, size in sizes.items():
        assert sum(in_subset(k, m, name) for k in keys) == size


def test_histograms_of_key_shards_add_up():
    keys = [f"k{i}" for i in range(2000)]
    whole = score_histogram(keys, 32)
    parts = score_histogram(keys[:700], 32) + score_histogram(keys[700:], 32)
    assert (whole == parts).all() and whole.sum() == 2000


def test_each_rank_verifies_its_share_once_and_all_get_the_verdict(tmp_path, monkeypatch):
    m = load_manifest(shapes(tmp_path, n=120, shard_size=20))            # 6 shards
    with open(m.shards[4], "r+b") as f: f.seek(2000); f.write(b"\x00damage\x00")
    hashed = Counter()
    real = data.sha256_file
    monkeypatch.setattr(data, "sha256_file", lambda p, *a: (hashed.update([p]), real(p, *a))[1])
    shares = [data.verify_share(m, rank=r, world_size=3) for r in range(3)]     # (problems, counted, complete)
    assert hashed == Counter({s: 1 for s in m.shards})                   # every shard once over all ranks
    assert sum(len(s[0]) for s in shares) >= 1 and shares[1][0] and "000004" in shares[1][0][0]
    verdicts = [data.verify_across_ranks(m, rank=r, world_size=3, gather=lambda mine: shares) for r in range(3)]
    assert verdicts[0] == verdicts[1] == verdicts[2] == [p for s in shares for p in s[0]]


# -- 4. subsets as shard prefixes -----------------------------------------------------------------------------

def members_by_shard(m, subset):
    "For each shard, how many of its samples belong to `subset`."
    stream = ShardStream(m, shuffle_buffer=1)
    return [sum(in_subset(s["__key__"], m, subset) for s in read_shard_samples(shard)) for shard in m.shards]


def test_build_writes_subsets_as_nested_shard_prefixes(tmp_path):
    sizes = {"20": 20, "50": 50, "90": 90, "all": 120}
    m = load_manifest(shapes(tmp_path / "a", subsets=sizes))
    keys = [f"{i:09d}" for i in range(120)]
    assert {n: {k: v for k, v in s.items() if k != "shards"} for n, s in m.subsets.items()} == old_nested_subsets(keys, sizes)
    ks = [m.subset_shards(n) for n in ("20", "50", "90", "all")]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == len(m.shards) == 4
    for name, size in sizes.items():
        per_shard = members_by_shard(m, name)
        assert sum(per_shard[:m.subset_shards(name)]) == size and sum(per_shard[m.subset_shards(name):]) == 0
    scores = [subset_score(s["__key__"]) for shard in m.shards for s in read_shard_samples(shard)]
    assert scores == sorted(scores)                                     # written in subset-score order


def test_reshard_makes_a_corpus_built_elsewhere_a_prefix_corpus(tmp_path):
    out = tmp_path / "plain"
    out.mkdir()
    samples = [{"__key__": f"img{i:04d}", "png": bytes([i % 256]) * (i + 1), "cls": i % 3} for i in range(90)]
    results = [write_shard(out / f"p-{j}.tar", samples[j * 30:(j + 1) * 30]) for j in range(3)]   # index order
    path = write_manifest(out / "p.yaml", {"name": "p", "format": "webdataset", "num_samples": 90,
                                           "shards": "p-{0..2}.tar", "shard_samples": [r[0] for r in results],
                                           "subsets": {"10": 10, "45": {"size": 45, "threshold": 0.5}}})
    new = load_manifest(reshard(path, tmp_path / "re", shard_size=20, progress=False))
    assert new.shard_samples == [20, 20, 20, 20, 10] and verify_manifest(new) == []
    got = {s["__key__"]: s for shard in new.shards for s in read_shard_samples(shard)}
    assert {k: (v["png"], v["cls"]) for k, v in got.items()} == {s["__key__"]: (s["png"], str(s["cls"]).encode()) for s in samples}
    old = load_manifest(path)
    assert new.subsets["45"]["threshold"] == 0.5                       # membership unchanged
    for name in ("10", "45"):
        members = {s["__key__"] for s in samples if in_subset(s["__key__"], old if name == "45" else new, name)}
        per_shard = members_by_shard(new, name)
        assert sum(per_shard[:new.subset_shards(name)]) == len(members) and sum(per_shard[new.subset_shards(name):]) == 0
    assert len({s for s in got if in_subset(s, new, "10")}) == 10       # a size-only subset got its exact threshold
    deep = load_manifest(reshard(path, tmp_path / "deep", shard_size=20, max_open=2, progress=False))
    assert list(deep.sha256) == list(new.sha256) and deep.subsets == new.subsets   # spilled in 3 levels: the same shards
    assert not (tmp_path / "deep" / ".reshard-spill").exists()


def test_parse_checks_subset_shard_prefixes(tmp_path):
    base = dict(name="x", format="webdataset", num_samples=20, shards="x-{0..1}.tar", shard_samples=[10, 10])
    assert parse_manifest({**base, "subsets": {"a": {"size": 5, "threshold": 0.2, "shards": 1}}}).subset_shards("a") == 1
    with pytest.raises(ManifestError, match="subsets.a.shards' must be a shard count between 1 and 2"):
        parse_manifest({**base, "subsets": {"a": {"size": 5, "shards": 3}}})
    with pytest.raises(ManifestError, match="shrink as the size grows"):
        parse_manifest({**base, "subsets": {"a": {"size": 5, "shards": 2}, "b": {"size": 9, "shards": 1}}})
    with pytest.raises(ManifestError, match="unknown keys"):
        parse_manifest({**base, "subsets": {"a": {"size": 5, "shard": 1}}})


# -- 5. unreadable source files ------------------------------------------------------------------------------

def image_folder(root: Path, n: int, truncated: int) -> list[Path]:
    "An ImageFolder of `n` JPEGs, the first `truncated` of them cut short; returns the damaged files."
    bad = []
    for i in range(n):
        path = root / ("cat" if i % 2 else "dog") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)
        if i < truncated:
            path.write_bytes(path.read_bytes()[:200])
            bad.append(path)
    return bad


def test_one_truncated_jpeg_is_skipped_named_and_counted(tmp_path):
    bad = image_folder(tmp_path / "folder", 12, truncated=1)
    with pytest.warns(UserWarning, match=f"skipping unreadable source file {bad[0]}"):
        path = build_shards(imagefolder_source(tmp_path / "folder"), tmp_path / "out", shard_size=5, progress=False)
    m = load_manifest(path)
    assert m.num_samples == 11 and m.skipped_sources == 1 and sum(m.shard_samples) == 11 and verify_manifest(m) == []


def test_too_many_unreadable_files_fail_with_the_list(tmp_path):
    bad = image_folder(tmp_path / "folder", 12, truncated=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="3 of 12 source files are unreadable") as e:
            build_shards(imagefolder_source(tmp_path / "folder"), tmp_path / "out", shard_size=5, progress=False)
    assert all(str(p) in str(e.value) for p in bad) and not (tmp_path / "out" / "folder.yaml").exists()


@pytest.mark.multiproc
def test_two_gloo_ranks_split_verification_and_agree(tmp_path):
    from prepretrain_lit.distributed import launch
    m = load_manifest(shapes(tmp_path, n=100, shard_size=20))            # 5 shards: 3 on rank 0, 2 on rank 1
    with open(m.shards[3], "r+b") as f: f.seek(2000); f.write(b"\x00damage\x00")   # rank 1's
    out = launch(data.verify_worker, str(m.path), nprocs=2)
    assert out[0][0] == out[1][0] == verify_manifest(m) and len(out[0][0]) >= 1
    assert (out[0][1], out[1][1]) == (3, 2)


def test_the_manifest_benchmark_reports_each_figure():
    import importlib.util
    spec = importlib.util.spec_from_file_location("manifest_scale", Path(__file__).parents[1] / "benchmarks" / "manifest_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.rows(num_shards=3000, vocab=1000, batch=64, tags=3)
    assert len(rows) == 6 and rows[3]["same_object"] is True
    assert rows[4]["bytes"] == 64 * 1000 * 4 and rows[5]["bytes"] == 64 * 3 * 8    # dense float32 vs padded int64
    assert rows[2]["bytes_on_disk"] < rows[0]["bytes_on_disk"]
    index = bench.index_rows(shards=3, per_shard=10, ig_shards=1000)
    assert [r["counted_samples"] for r in index[:3]] == [10, 10, 10] and index[0]["of_shard_bytes"] == 1.0
    assert index[1]["bytes_read_per_shard"] < index[2]["bytes_read_per_shard"] < index[0]["bytes_read_per_shard"]
