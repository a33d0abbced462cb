"""Data: manifests, shards round trip, bad samples survived and counted, splits, subsets, determinism, CLI."""
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prepretrain_lit.schema import DataConfig, UserError
from prepretrain_lit.render import SHAPES, SHAPES_HASHTAGS, render_shapes
from prepretrain_lit.manifest import ManifestError, load_manifest, parse_manifest, write_shard
from prepretrain_lit.data import (build_from_recipe, build_shards, imagefolder_source, shapes_source, table_source,
                                  verify_manifest)
from prepretrain_lit.subsets import in_subset
from prepretrain_lit.decode import DataQualityError, eval_transform, finetune_transform, mae_transform
from prepretrain_lit.loader import ShardStream, StreamLoader, make_loader

from project import ROOT
PRETRAIN = Path(sys.executable).parent / "prepretrain"


def small_shapes(tmp_path, n=200, shard_size=50, fmt="png", **kw) -> Path:
    return build_shards(shapes_source(n, seed=0, size=32), tmp_path / "shards", shard_size=shard_size, fmt=fmt,
                        progress=False, **kw)


def read_all(manifest, **kw):
    stream = ShardStream(manifest, shuffle_buffer=kw.pop("shuffle_buffer", 8), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(stream)
    return items, [str(w.message) for w in caught]


# -- manifests ---------------------------------------------------------------------------------------------

BASE = dict(name="x", format="webdataset", num_samples=20, shards="x-{0..1}.tar", shard_samples=[10, 10])


@pytest.mark.parametrize("change, field, problem", [
    ({"num_samples": None}, "num_samples", "is missing"),
    ({"format": "tfrecord"}, "format", "known formats: webdataset, recipe"),
    ({"shard_samples": [10, 11]}, "shard_samples", "adds up to 21, but num_samples is 20"),
    ({"shard_samples": [20]}, "shard_samples", "has 1 entries for 2 shards"),
    ({"sha256": ["ab"] * 2}, "sha256", "64 lowercase hex digits"),
    ({"sha256": ["a" * 64]}, "sha256", "has 1 entries for 2 shards"),
    ({"classes": ["a", "b"], "num_classes": 3}, "num_classes", "'classes' names 2"),
    ({"subsets": {"big": 21}}, "subsets.big", "between 1 and num_samples=20"),
    ({"colour": "red"}, "colour", "is not a manifest field"),
    ({"shards": []}, "shards", "is missing"),
])
def test_manifest_validation_names_file_and_field(tmp_path, change, field, problem):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(path) in str(e.value) and f"'{field}'" in str(e.value) and problem in str(e.value)


def test_missing_manifest_and_unknown_subset(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "none.yaml")
    m = parse_manifest({**BASE, "subsets": {"5": 5}}, tmp_path / "m.yaml")
    with pytest.raises(ManifestError, match="no subset 'six'; subsets: 5"):
        m.subset_size("six")


def test_shipped_manifests_load_with_their_real_counts():
    manifests = {p.stem: load_manifest(p) for p in (ROOT / "data_manifests").glob("*.yaml")}
    assert manifests["imagenet-1k-train"].num_samples == 1281167 and manifests["imagenet-1k-train"].num_classes == 1000
    assert manifests["imagenet-1k-val"].num_samples == 50000
    assert manifests["inaturalist-2018-train"].num_classes == 8142
    assert manifests["food-101-train"].num_samples + manifests["food-101-test"].num_samples == 101000
    assert len(manifests["food-101-train"].classes) == 101
    assert manifests["digits-train"].num_samples + manifests["digits-test"].num_samples == 1797
    shapes = manifests["shapes"]
    assert shapes.classes == list(SHAPES) and shapes.hashtags == list(SHAPES_HASHTAGS)   # recipe matches the code
    ig = manifests["ig-hashtags"]
    assert ig.num_hashtags == 28000 and [ig.subset_size(s) for s in ("0.5M", "1M", "100M")] == [500000, 1000000, 100000000]


def test_a_template_cannot_be_streamed_until_filled_in():
    with pytest.raises(UserError, match="is a template: replace CHANGE-ME"):
        ShardStream(ROOT / "data_manifests" / "imagenet-1k-val.yaml")


# -- round trip --------------------------------------------------------------------------------------------

def test_shards_round_trip_images_labels_hashtags_captions(tmp_path):
    manifest = load_manifest(small_shapes(tmp_path, n=60, shard_size=25))
    assert manifest.shard_samples == [25, 25, 10] and verify_manifest(manifest) == []
    items, warns = read_all(manifest)
    assert len(items) == 60 and not warns
    vocab = manifest.hashtags
    for item in items:
        image, meta = render_shapes(0, int(item["key"]), size=32)
        assert np.array_equal(np.asarray(item["image"]), image)          # PNG: exact pixels
        assert item["label"] == meta["label"] and item["caption"] == meta["caption"]
        assert [vocab[i] for i in item["hashtags"].tolist()] == sorted(meta["hashtags"], key=vocab.index)   # indices


def test_jpeg_shards_decode_close_to_the_source(tmp_path):
    items, _ = read_all(small_shapes(tmp_path, n=10, shard_size=10, fmt="jpg"))
    for item in items:
        diff = np.abs(np.asarray(item["image"]).astype(int) - render_shapes(0, int(item["key"]), size=32)[0])
        assert diff.mean() < 5          # quality 95, 4:4:4 chroma


def test_imagefolder_and_table_sources(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 60, 3), 50 * i, np.uint8)).save(tmp_path / "folder" / cls / f"{i}.png")
    src = imagefolder_source(tmp_path / "folder")
    assert src.classes == ["cat", "dog"] and src.n == 6
    path = build_shards(src, tmp_path / "out", shard_size=4, max_side=30, progress=False)
    items, _ = read_all(path)
    assert sorted(i["label"] for i in items) == [0, 0, 0, 1, 1, 1] and items[0]["image"].size == (30, 20)
    (tmp_path / "list.csv").write_text("path,label,hashtags,caption\nfolder/cat/0.png,cat,a b,first\nfolder/dog/1.png,dog,b,second\n")
    table = table_source(tmp_path / "list.csv")
    assert table.classes == ["cat", "dog"] and table.hashtags == ["a", "b"]
    items, _ = read_all(build_shards(table, tmp_path / "out2", progress=False))
    assert {(i["caption"], i["label"], len(i["hashtags"])) for i in items} == {("first", 0, 2), ("second", 1, 1)}


# -- bad samples -------------------------------------------------------------------------------------------

def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def damaged_dataset(tmp_path) -> Path:
    "Two shards of 10 samples: shard 0 holds a truncated image, one without image and one without label."
    samples = []
    for i in range(20):
        sample = {"__key__": f"{i:04d}", "png": _png(i), "cls": i % 2, "json": {"caption": f"c{i}"}}
        if i == 3: sample["png"] = sample["png"][:40]           # truncated image
        if i == 5: del sample["png"]                             # no image
        if i == 7: del sample["cls"]                             # no label
        samples.append(sample)
    d = tmp_path / "damaged"
    d.mkdir()
    counts, digests = zip(*(write_shard(d / f"d-{s}.tar", samples[s * 10:(s + 1) * 10]) for s in range(2)))
    manifest = dict(name="d", format="webdataset", num_samples=20, shards="d-{0..1}.tar", shard_samples=list(counts),
                    sha256=list(digests), image_field="png", caption_field="json.caption", classes=["even", "odd"])
    (d / "d.yaml").write_text(yaml.safe_dump(manifest))
    return d / "d.yaml"


def test_corrupt_missing_and_unlabelled_samples_are_skipped_named_and_counted(tmp_path):
    path = damaged_dataset(tmp_path)
    loader = StreamLoader(ShardStream(path, max_skip_fraction=0.5, shuffle_buffer=4), batch_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == [f"{i:04d}" for i in range(20) if i not in (3, 5, 7)]
    assert (loader.seen, loader.skipped) == (17, 3)
    message = " ".join(str(w.message) for w in caught)
    assert "d-0.tar" in message and "0003" in message and "does not decode" in message


def test_a_truncated_tar_is_survived_and_its_lost_samples_counted(tmp_path):
    path = damaged_dataset(tmp_path)
    shard = path.parent / "d-1.tar"
    shard.write_bytes(shard.read_bytes()[:3000])               # cut the second shard short
    loader = StreamLoader(ShardStream(path, max_skip_fraction=0.9, shuffle_buffer=4), batch_size=2, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for batch in loader for k in batch["key"]]
    read_from_second = [k for k in keys if int(k) >= 10]
    assert len(read_from_second) < 10 and loader.seen == len(keys)
    assert loader.skipped == 3 + (10 - len(read_from_second))  # the 3 bad samples + every sample the cut lost
    assert any("d-1.tar" in str(w.message) and "lost" in str(w.message) for w in caught)
    assert any("d-1.tar" in p for p in verify_manifest(load_manifest(path)))


def test_a_missing_shard_is_survived(tmp_path):
    path = damaged_dataset(tmp_path)
    (path.parent / "d-0.tar").unlink()
    loader = StreamLoader(ShardStream(path, max_skip_fraction=0.9), batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == [f"{i:04d}" for i in range(10, 20)] and loader.skipped == 10


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path):
    path = damaged_dataset(tmp_path)
    loader = StreamLoader(ShardStream(path, max_skip_fraction=0.05, min_samples_for_check=10), batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match=r"skipped as bad .* limit 5.0%.*prepretrain shards verify"):
            list(loader)


def test_verify_reports_every_kind_of_mismatch(tmp_path):
    manifest = load_manifest(small_shapes(tmp_path, n=90, shard_size=30))
    Path(manifest.shards[0]).unlink()
    with open(manifest.shards[1], "ab") as f: f.write(b"\0" * 1024)
    data = yaml.safe_load(Path(manifest.path).read_text())
    data["shard_samples"] = [30, 30, 31]
    data["num_samples"] = 91
    Path(manifest.path).write_text(yaml.safe_dump(data))
    problems = verify_manifest(load_manifest(manifest.path))
    assert len(problems) == 3
    assert "000000.tar: missing" in problems[0] and "000001.tar: sha256" in problems[1]
    assert "000002.tar: 30 samples, the manifest says 31" in problems[2]


def test_verify_checksums_before_training(tmp_path):
    path = small_shapes(tmp_path, n=40, shard_size=20)
    with open(load_manifest(path).shards[0], "ab") as f: f.write(b"\0" * 512)
    with pytest.raises(DataQualityError, match="1 shard\\(s\\) fail verification"):
        make_loader(DataConfig(dataset=str(path), batch_size=4, num_workers=0, verify_checksums=True), None)
    batch = next(iter(make_loader(DataConfig(dataset=str(path), batch_size=4, num_workers=0), None)))
    assert len(batch["image"]) == 4                       # unverified, the appended bytes past the tar's end are not read


# -- splitting, determinism, subsets -----------------------------------------------------------------------

@pytest.mark.slow
def test_two_workers_times_two_ranks_see_disjoint_samples_covering_the_epoch(tmp_path):
    path = small_shapes(tmp_path, n=160, shard_size=20)
    seen = {}
    for rank in range(2):
        loader = StreamLoader(ShardStream(path, eval_transform(32), rank=rank, world_size=2, shuffle_buffer=16),
                              batch_size=5, num_workers=2, drop_last=False)
        seen[rank] = [k for batch in loader for k in batch["key"]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:09d}" for i in range(160)]
    assert len(seen[0]) == len(set(seen[0])) == 80


def test_epoch_seeded_order_replays_and_infinite_mode_moves_on(tmp_path):
    path = small_shapes(tmp_path, n=40, shard_size=10)
    def order(epoch):
        s = ShardStream(path, shuffle_buffer=8, seed=5)
        s.set_epoch(epoch)
        return [x["key"] for x in s]
    assert order(2) == order(2) and order(2) != order(3) and sorted(order(2)) == sorted(order(3))
    endless = iter(ShardStream(path, shuffle_buffer=8, seed=5, infinite=True))
    keys = [next(endless)["key"] for _ in range(100)]
    assert keys[:40] == order(0) and keys[40:80] == order(1)


def test_subsets_are_nested_exact_and_independent_of_sharding(tmp_path):
    sizes = {"25": 25, "50": 50, "100": 100}
    a = build_shards(shapes_source(150, size=32), tmp_path / "a", shard_size=20, subsets=sizes, progress=False)
    b = build_shards(shapes_source(150, size=32), tmp_path / "b", shard_size=70, subsets=sizes, progress=False)
    members = {}
    for name in sizes:
        ka = {x["key"] for x in read_all(a, subset=name)[0]}
        kb = {x["key"] for x in read_all(b, subset=name)[0]}
        assert ka == kb and len(ka) == sizes[name]
        members[name] = ka
    assert members["25"] < members["50"] < members["100"]


def test_shapes_is_deterministic_to_the_byte(tmp_path):
    one = load_manifest(build_shards(shapes_source(120, seed=3, size=32), tmp_path / "1", shard_size=50, progress=False))
    two = load_manifest(build_shards(shapes_source(120, seed=3, size=32), tmp_path / "2", shard_size=50, workers=2,
                                     progress=False))
    other = load_manifest(build_shards(shapes_source(120, seed=4, size=32), tmp_path / "3", shard_size=50, progress=False))
    assert one.sha256 == two.sha256 and one.sha256 != other.sha256


def test_shapes_labels_hashtags_and_captions_agree():
    for i in range(50):
        image, meta = render_shapes(0, i)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert SHAPES[meta["label"]] in meta["hashtags"] and meta["caption"].startswith(f"a large ")
        assert SHAPES[meta["label"]] in meta["caption"].split(",")[0].split(" and ")[0]
        assert sum(w in meta["hashtags"] for w in ("one", "two", "three")) == 1


def test_digits_recipe_builds_the_fixed_test_split(tmp_path):
    path = build_from_recipe(ROOT / "data_manifests" / "digits-test.yaml", tmp_path, progress=False)
    m = load_manifest(path)
    assert m.num_samples == 450 and m.classes == [str(d) for d in range(10)]
    items, _ = read_all(path)
    assert np.bincount([x["label"] for x in items]).min() >= 43     # stratified: every digit present


# -- transforms --------------------------------------------------------------------------------------------

def test_transforms_give_the_model_size():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    for make in (mae_transform, eval_transform, finetune_transform):
        out = make(32)(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(eval_transform(32)(img), eval_transform(32)(img))   # evaluation is deterministic


# -- command line ------------------------------------------------------------------------------------------

def test_cli_build_and_verify(tmp_path):
    out = tmp_path / "shapes"
    res = subprocess.run([str(PRETRAIN), "shards", "build", str(ROOT / "data_manifests" / "shapes.yaml"), "--out", str(out),
                          "--num-samples", "1500"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    m = load_manifest(out / "shapes.yaml")
    assert m.num_samples == 1500 and list(m.subsets) == ["1k"]              # subsets larger than the build dropped
    assert subprocess.run([str(PRETRAIN), "shards", "verify", str(out / "shapes.yaml")], capture_output=True).returncode == 0
    with open(m.shards[1], "ab") as f: f.write(b"\0" * 512)
    res = subprocess.run([str(PRETRAIN), "shards", "verify", str(out / "shapes.yaml")], capture_output=True, text=True)
    assert res.returncode == 1 and "shapes-000001.tar: sha256" in res.stdout


def test_cli_build_bad_source_is_a_clear_error(tmp_path):
    res = subprocess.run([str(PRETRAIN), "shards", "build", str(tmp_path / "nothing.txt"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a recipe manifest (.yaml), an image folder or a .csv/.jsonl" in res.stderr


def test_a_builtin_name_that_was_not_built_says_how_to_build_it():
    with pytest.raises(UserError, match="prepretrain shards build .*shapes.yaml --out data/shapes"):
        make_loader(DataConfig(dataset="shapes"), None)


def test_duplicate_label_names_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="'hashtags' repeats a: each name must appear once"):
        parse_manifest({**BASE, "hashtags": ["a", "b", "a"]}, tmp_path / "m.yaml")


def test_an_endless_stream_needs_a_shard_per_reader(tmp_path):
    path = small_shapes(tmp_path, n=40, shard_size=20)                        # 2 shards
    with pytest.raises(UserError, match="2 shard\\(s\\) cannot feed 2 rank\\(s\\) x 2 loader worker\\(s\\) = 4 readers"):
        StreamLoader(ShardStream(path, rank=0, world_size=2, infinite=True), batch_size=4, num_workers=2)
    StreamLoader(ShardStream(path, rank=0, world_size=2, infinite=True), batch_size=4, num_workers=1)   # 2 readers: fine


# -- IG-3B-size data path through the command line -------------------------------------

def test_cli_build_skips_a_truncated_jpeg_and_reshard_writes_prefix_subsets(tmp_path, capsys):
    from prepretrain_lit.cli import main
    for i in range(8):
        path = tmp_path / "folder" / ("a" if i % 2 else "b") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), 30 * i, np.uint8)).save(path)
    bad = tmp_path / "folder" / "b" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.warns(UserWarning, match="0.jpg"):
        assert main(["shards", "build", str(tmp_path / "folder"), "--out", str(tmp_path / "out"), "--shard-size", "3",
                     "--subset", "half=3", "--max-bad-fraction", "0.2"]) == 0
    assert "1 unreadable source file(s) skipped" in capsys.readouterr().out
    built = load_manifest(tmp_path / "out" / "folder.yaml")
    assert built.num_samples == 7 and built.skipped_sources == 1
    assert built.subset_shards("half") == int(np.searchsorted(np.cumsum(built.shard_samples), 3)) + 1   # 3 members
    assert main(["shards", "reshard", str(tmp_path / "out" / "folder.yaml"), "--out", str(tmp_path / "re"),
                 "--shard-size", "2"]) == 0
    new = load_manifest(tmp_path / "re" / "folder.yaml")
    assert new.shard_samples == [2, 2, 2, 1] and new.subset_shards("half") == 2 and verify_manifest(new) == []
    assert new.subsets["half"]["threshold"] == built.subsets["half"]["threshold"]
    assert main(["shards", "reshard", str(tmp_path / "re" / "folder.yaml"), "--out", str(tmp_path / "re")]) == 2


# -- bring your own corpus: index in place, subsets over shards as they are, byte-exact builds ------

class CountingOpen:
    "`gopen` wrapped so that the bytes read from each shard are counted (what the loader opens, and how much)."
    def __init__(self, monkeypatch):
        from prepretrain_lit import stream
        self.read, real = {}, stream.gopen
        outer = self
        class Counted:
            def __init__(self, location): self.f, self.location = real(location), location
            def read(self, n=-1):
                data = self.f.read(n)
                outer.read[self.location] = outer.read.get(self.location, 0) + len(data)
                return data
            def close(self): self.f.close()
        monkeypatch.setattr(stream, "gopen", Counted)


def test_img2dataset_shards_indexed_once_train_mae_on_an_exact_quarter_then_on_all_without_a_rewrite(tmp_path, monkeypatch):
    from prepretrain_lit.cli import main
    from prepretrain_lit.subsets import subset_reads
    from prepretrain_lit.tars import write_img2dataset_like
    tars = write_img2dataset_like(tmp_path / "coyo", 8, [30, 28, 31, 29, 30, 27, 32, 33], size=(12, 10))   # 240 samples
    files = lambda: {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "coyo").iterdir()}
    before, manifest = files(), tmp_path / "coyo.yaml"
    assert main(["shards", "index", str(tmp_path / "coyo"), "--out", str(manifest), "--subset", "q=0.25",
                 "--subset", "h=0.5", "--workers", "2"]) == 0
    m = load_manifest(manifest)
    assert (m.num_samples, m.subset_size("q"), m.subset_size("h"), m.caption_field) == (240, 60, 120, "txt")
    q, h = (set(i["key"] for i in read_all(m, subset=s)[0]) for s in ("q", "h"))
    assert (len(q), len(h)) == (60, 120) and q < h                                  # exact and nested
    sizes = {str(t): t.stat().st_size for t in tars}
    wanted = [m.shards[j] for j in subset_reads(m, "q").shards.tolist()]
    counting = CountingOpen(monkeypatch)
    tiny = ["--preset", "tiny", "--set", f"data.dataset={manifest}", "--set", "data.num_workers=0", "--set",
            "data.batch_size=10", "--set", "data.shuffle_buffer=16", "--set", "model.depth=2", "--set",
            "model.decoder_depth=1", "--set", "train.log_every=1"]
    assert main(["train", "mae", *tiny, "--set", "data.subset=q", "--set", "train.steps=6", "--out", str(tmp_path / "q")]) == 0
    total = sum(sizes.values())
    share, subset_share = sum(counting.read.values()) / total, sum(sizes[s] for s in wanted) / total
    assert set(counting.read) <= set(wanted)                                       # no shard outside the subset's opened
    assert 0.2 < subset_share < 0.3 and share <= subset_share + max(sizes.values()) / total, (share, subset_share)
    # ... about a quarter of the bytes: the subset's 2 shards, and the start of the next epoch's first (held back item)
    assert main(["train", "mae", *tiny, "--set", "train.steps=3", "--out", str(tmp_path / "all")]) == 0
    assert files() == before                                                       # used as it is: nothing rewritten


def test_verify_fails_a_count_the_shards_do_not_hold_and_the_loader_refuses_it(tmp_path, capsys):
    from prepretrain_lit.cli import main
    from prepretrain_lit.tars import write_img2dataset_like
    write_img2dataset_like(tmp_path / "web", 8, 100, size=(8, 8), failures=0)       # 800 samples
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(dict(name="web", format="webdataset", num_samples=840, shards="web/{00000..00007}.tar",
                                        caption_field="txt", label_field=None)))
    assert main(["shards", "verify", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: the shards hold 800 samples, the manifest says num_samples: 840; correct it, or count them " \
                     "with `prepretrain shards index`"
    assert "no shard_samples: per-shard counts not checked, only the total" in out[-1]
    with pytest.raises(UserError, match="the shards hold 800 samples, the manifest says num_samples: 840"):
        ShardStream(path)


def test_a_folder_built_shard_holds_the_files_bytes_its_path_and_a_key_traceable_to_it(tmp_path):
    from prepretrain_lit.stream import tar_samples
    files = {}
    for cls, fmt in (("cat", "JPEG"), ("dog", "PNG")):
        for i in range(3):
            path = tmp_path / "pets" / cls / f"{cls}.{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path, format=fmt)
            files[f"{cls}/{cls}_{i}"] = path
    m = load_manifest(build_shards(imagefolder_source(tmp_path / "pets"), tmp_path / "out", shard_size=4, progress=False))
    samples = {s["__key__"]: s for shard in m.shards for s in tar_samples(shard)}
    assert sorted(samples) == sorted(files)                                         # keys: paths without the extension
    for key, path in files.items():
        ext = "jpg" if path.suffix == ".jpg" else "png"
        assert samples[key][ext] == path.read_bytes()                              # the file's bytes, not a re-encode
        assert yaml.safe_load(samples[key]["json"])["path"] == path.relative_to(tmp_path / "pets").as_posix()
    small = load_manifest(build_shards(imagefolder_source(tmp_path / "pets"), tmp_path / "small", max_side=15, progress=False))
    for s in (s for shard in small.shards for s in tar_samples(shard)):            # asked to shrink: re-encoded, format kept
        ext = "jpg" if "jpg" in s else "png"
        assert Image.open(io.BytesIO(s[ext])).size == (15, 10) and s[ext] != files[s["__key__"]].read_bytes()


def test_build_split_for_a_folder_without_one_is_stratified_seeded_and_recorded(tmp_path, capsys):
    from prepretrain_lit.cli import main
    for cls, n in (("a", 10), ("b", 5)):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(n): Image.fromarray(np.full((6, 6, 3), 9 * i, np.uint8)).save(tmp_path / "f" / cls / f"{i}.png")
    args = ["shards", "build", str(tmp_path / "f"), "--split", "test=0.2", "--seed", "7", "--shard-size", "4"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0 and main([*args, "--out", str(tmp_path / "o2")]) == 0
    train, test = (load_manifest(tmp_path / "o1" / f"f-{p}.yaml") for p in ("train", "test"))
    keys = {p: [i["key"] for i in read_all(load_manifest(tmp_path / o / f"f-{p}.yaml"))[0]] for o in ("o1",) for p in ("train", "test")}
    assert sorted(k.split("/")[0] for k in keys["test"]) == ["a", "a", "b"] and not set(keys["train"]) & set(keys["test"])
    assert train.split == {"of": "f", "seed": 7, "fractions": {"test": 0.2}, "sizes": {"train": 12, "test": 3}, "part": "train"}
    assert test.split["part"] == "test" and list(test.sha256) == list(load_manifest(tmp_path / "o2" / "f-test.yaml").sha256)


def test_index_leaves_out_unreadable_shards_and_reshard_keeps_the_sources_shard_size_and_members(tmp_path):
    from prepretrain_lit.tars import index_shards, reshard, sample_metadata, write_img2dataset_like
    tars = write_img2dataset_like(tmp_path / "c", 4, 10, size=(8, 8))
    tars[1].write_bytes(b"not a tar" * 100)
    with pytest.warns(UserWarning, match="00001.tar: unreadable"):
        m = load_manifest(index_shards(tmp_path / "c", tmp_path / "c.yaml", sha256=False, subsets={"h": 15}, progress=False))
    assert m.shard_samples == [10, 10, 10] and m.sha256 is None and len(m.skipped_shards) == 1
    assert sample_metadata(m, "000020003")["caption"] == "picture 000020003"
    new = load_manifest(reshard(m, tmp_path / "re", progress=False))
    assert new.shard_samples == [10, 10, 10] and verify_manifest(new) == []        # the source's shard size, not 1000
    from prepretrain_lit.stream import tar_samples
    samples = [s for shard in new.shards for s in tar_samples(shard)]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)                  # every member of a sample kept
    key = samples[0]["__key__"]                                                     # img2dataset's files come along
    assert sample_metadata(new, key, shard=0)["url"] == f"https://example.com/{key}.jpg"
    assert json.loads(Path(new.shards[0][:-4] + "_stats.json").read_text())["successes"] == 10
    assert "shard_seed" not in new.subsets["h"] and sum(in_subset(s["__key__"], new, "h") for s in samples) == 15


def test_index_splits_the_shards_across_ranks_and_rank_0_writes_what_one_process_would(tmp_path):
    from prepretrain_lit.tars import index_shards, inspect_shards, shard_paths, write_img2dataset_like
    write_img2dataset_like(tmp_path / "c", 5, 4, size=(8, 8))
    paths = shard_paths(tmp_path / "c")
    shares = [inspect_shards(paths[r::2]) for r in range(2)]                       # what each of 2 ranks reads
    assert [len(s) for s in shares] == [3, 2]
    for rank in (1, 0):
        index_shards(tmp_path / "c", tmp_path / "two.yaml", rank=rank, world_size=2, gather=lambda mine: shares,
                     progress=False)
        assert (tmp_path / "two.yaml").is_file() == (rank == 0)                     # rank 0 writes
    one = load_manifest(index_shards(tmp_path / "c", tmp_path / "one.yaml", progress=False))
    two = load_manifest(tmp_path / "two.yaml")
    assert (two.shard_samples, list(two.sha256), two.shards) == (one.shard_samples, list(one.sha256), one.shards)


def test_reshard_in_processes_and_on_two_ranks_writes_the_shards_one_process_writes(tmp_path):
    import threading
    from prepretrain_lit.tars import reshard
    path = small_shapes(tmp_path, n=90, shard_size=20, subsets={"30": 30})
    kw = dict(shard_size=7, max_open=3, progress=False)               # 13 buckets in 3 groups: spilled twice, shards shared
    one = load_manifest(reshard(path, tmp_path / "one", **kw))
    many = load_manifest(reshard(path, tmp_path / "many", workers=2, **kw))
    assert list(many.sha256) == list(one.sha256) and one.shard_samples == [7] * 12 + [6] and verify_manifest(one) == []
    slots, barrier = [None, None], threading.Barrier(2, timeout=60)
    def gather_of(rank):                                              # all_gather_object, between two threads
        def gather(mine):
            slots[rank] = mine; barrier.wait(); everyone = list(slots); barrier.wait()
            return everyone
        return gather
    ranks = [threading.Thread(target=reshard, args=(path, tmp_path / "ranks"),
                              kwargs=dict(rank=r, world_size=2, gather=gather_of(r), **kw)) for r in range(2)]
    for t in ranks: t.start()
    for t in ranks: t.join()
    two = load_manifest(tmp_path / "ranks" / "shapes.yaml")
    assert list(two.sha256) == list(one.sha256) and two.subsets == one.subsets
    assert not (tmp_path / "ranks" / ".reshard-spill").exists()
