"""Streaming at scale: resume in O(1) and exact (epochs, workers, ranks), resume on another number of readers
(every sample of the epoch once), subsets read for their share, bad samples counted against what was read,
and the cluster-size layout simulated from counts alone."""
import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

import prepretrain_lit.loader as loader_module
from prepretrain_lit.data import encode_image
from prepretrain_lit.subsets import nested_subsets, subset_score
from prepretrain_lit.manifest import write_manifest, write_shard
from prepretrain_lit.decode import DataQualityError, eval_transform, mae_transform
from prepretrain_lit.loader import ShardStream, StreamLoader
from prepretrain_lit.stream import StreamPlan, Window, buffer_order


def ordered_corpus(tmp_path, n=400, shard_size=20, subsets=None, record_shards=True, bad=(), name="c"):
    """A corpus written in subset-score order (each subset a prefix of shards), tiny distinct PNGs; samples whose
    number is in `bad` carry an undecodable image. The manifest records `shards: K` per subset when asked."""
    rng = np.random.default_rng(0)
    keys = sorted((f"{i:06d}" for i in range(n)), key=subset_score)
    samples = [{"__key__": k, "png": b"not an image" if int(k) in bad else
                encode_image(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "png"), "cls": int(k) % 3} for k in keys]
    out = tmp_path / name
    out.mkdir()
    names = [f"{name}-{s:04d}.tar" for s in range(math.ceil(n / shard_size))]
    counts = [write_shard(out / f, samples[s * shard_size:(s + 1) * shard_size])[0] for s, f in enumerate(names)]
    fields = dict(name=name, format="webdataset", num_samples=n, shards=names, shard_samples=counts,
                  image_field="png", num_classes=3)
    if subsets:
        specs = nested_subsets(keys, subsets)
        if record_shards:
            for spec in specs.values(): spec["shards"] = math.ceil(spec["size"] / shard_size)
        fields["subsets"] = specs
    return write_manifest(out / f"{name}.yaml", fields)


@pytest.fixture
def reads(monkeypatch):
    "Counts the samples taken out of tar files (in this process: loaders with 0 workers)."
    count = {"n": 0}
    original = loader_module.tar_samples
    def counting(location):
        for sample in original(location):
            count["n"] += 1
            yield sample
    monkeypatch.setattr(loader_module, "tar_samples", counting)
    return count


def make(path, workers=0, rank=0, world=1, infinite=True, batch=8, buffer=16, transform=True, **kw):
    stream = ShardStream(path, mae_transform(8) if transform else None, shuffle_buffer=buffer, rank=rank,
                         world_size=world, infinite=infinite, seed=3, **kw)
    return StreamLoader(stream, batch_size=batch, num_workers=workers, drop_last=infinite)


def run(loader, n, states_at=()):
    "The first `n` batches of `loader`, and its state after each batch number in `states_at`."
    batches, states, it = [], {}, iter(loader)
    for b in range(n):
        batches.append(next(it))
        if b + 1 in states_at: states[b + 1] = copy.deepcopy(loader.state_dict())
    return batches, states


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])       # same augmentation too


# -- resume in O(1), exact ---------------------------------------------------------------------------------

def test_resuming_deep_into_an_epoch_reads_a_window_not_the_epoch(tmp_path, reads):
    path = ordered_corpus(tmp_path, n=1000, shard_size=25)
    whole, states = run(make(path, batch=10), 100, states_at=(5, 95))
    for k in (5, 95):                                    # early and late in the epoch: the same small cost
        resumed = make(path, batch=10)
        resumed.load_state_dict([states[k]])
        reads["n"] = 0
        it = resumed.batches(k)
        first = [next(it)]
        assert reads["n"] <= 25 + 10 + 16, (k, reads["n"])   # one window (a shard) + a batch + the buffer
        assert_same(whole[k:k + 1], first)
        assert_same(whole[k + 1:], [next(it) for _ in range(100 - k - 1)])


def test_resume_is_exact_across_an_epoch_boundary_and_in_a_later_epoch(tmp_path):
    path = ordered_corpus(tmp_path, n=200, shard_size=20)         # 25 batches of 8 an epoch
    whole, states = run(make(path), 60, states_at=(23, 27, 51))
    assert [int(b["stream_epoch"][-1]) for b in (whole[22], whole[26], whole[50])] == [0, 1, 2]
    for k in states:
        resumed = make(path)
        resumed.load_state_dict([states[k]])
        it = resumed.batches(k)
        assert_same(whole[k:], [next(it) for _ in range(60 - k)])


@pytest.mark.parametrize("k", [7, 10])                    # odd and even: which worker hands out the next batch
def test_resume_is_exact_with_two_loader_workers(tmp_path, k):
    path = ordered_corpus(tmp_path, n=200, shard_size=20)
    whole, states = run(make(path, workers=2), 40, states_at=(k,))
    resumed = make(path, workers=2)
    resumed.load_state_dict([states[k]])
    it = resumed.batches(k)
    assert_same(whole[k:], [next(it) for _ in range(40 - k)])


def test_resume_is_exact_with_two_ranks(tmp_path):
    path = ordered_corpus(tmp_path, n=200, shard_size=20)
    runs = [run(make(path, rank=r, world=2), 20, states_at=(9,)) for r in range(2)]
    saved = [states[9] for _, states in runs]             # what the trainer gathers from every rank
    for rank, (whole, _) in enumerate(runs):
        resumed = make(path, rank=rank, world=2)
        resumed.load_state_dict(saved)
        it = resumed.batches(9)
        assert_same(whole[9:], [next(it) for _ in range(11)])


def test_resume_is_exact_over_bad_samples_and_a_subset(tmp_path):
    path = ordered_corpus(tmp_path, n=300, shard_size=20, subsets={"half": 150}, bad={3, 50, 77, 120, 260})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole, states = run(make(path, subset="half", max_skip_fraction=0.5), 30, states_at=(6, 17))
        for k in states:
            resumed = make(path, subset="half", max_skip_fraction=0.5)
            resumed.load_state_dict([states[k]])
            it = resumed.batches(k)
            assert_same(whole[k:], [next(it) for _ in range(30 - k)])


def test_the_saved_state_is_a_few_integers_per_reader(tmp_path):
    path = ordered_corpus(tmp_path, n=200, shard_size=20)
    _, states = run(make(path), 20, states_at=(3, 20))
    assert len(pickle.dumps(states[20])) == len(pickle.dumps(states[3])) < 200


# -- another number of readers ----------------------------------------------------------------------------

def test_resuming_on_fewer_and_more_readers_sees_every_sample_of_the_epoch_once(tmp_path):
    path = ordered_corpus(tmp_path, n=480, shard_size=20)
    for old, new in ((4, 3), (2, 5)):
        loaders = [make(path, rank=r, world=old, infinite=False, transform=False) for r in range(old)]
        consumed = [k for r, l in enumerate(loaders) for b in run(l, 3 + r)[0] for k in b["key"]]
        saved = [l.state_dict() for l in loaders]
        rest = []
        for r in range(new):
            resumed = make(path, rank=r, world=new, infinite=False, transform=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                resumed.load_state_dict(saved)
            assert r > 0 or any(f"saved by {old} readers and continues with {new}" in str(w.message) for w in caught)
            rest += [k for b in resumed for k in b["key"]]
        assert sorted(consumed + rest) == sorted(f"{i:06d}" for i in range(480)), (old, new)
        nxt = make(path, rank=0, world=new, infinite=True, transform=False)   # then the new layout: epoch 1 as usual
        nxt.load_state_dict(saved)
        epochs = [int(e) for b in run(nxt, 25)[0] for e in b["stream_epoch"]]
        assert epochs == sorted(epochs) and epochs[0] == 0 and 1 in epochs


# -- subsets read their share ------------------------------------------------------------------------------

def test_a_ten_percent_subset_reads_at_most_twenty_percent(tmp_path, reads):
    path = ordered_corpus(tmp_path, n=400, shard_size=20, subsets={"10%": 40, "50%": 200})
    keys = [k for b in make(path, subset="10%", infinite=False, batch=4, transform=False) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 40 and reads["n"] <= 0.2 * 400
    legacy = ordered_corpus(tmp_path, n=400, shard_size=20, subsets={"10%": 40}, record_shards=False, name="legacy")
    with pytest.warns(UserWarning, match="every shard is read.*prepretrain shards reshard"):
        stream = make(legacy, subset="10%", infinite=False, batch=4, transform=False)
    reads["n"] = 0
    assert sorted(k for b in stream for k in b["key"]) == sorted(keys) and reads["n"] == 400


# -- bad samples counted against what was read ---------------------------------------------------------------

def test_a_handful_of_bad_images_never_stops_a_run_and_a_rotten_shard_does(tmp_path):
    bad = {int(k) for k in sorted((f"{i:06d}" for i in range(4000)), key=subset_score)[::500]}   # one per shard
    path = ordered_corpus(tmp_path, n=4000, shard_size=500, bad=bad)
    loader = make(path, infinite=False, batch=50, buffer=1000, transform=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [k for b in loader for k in b["key"]]
    assert (loader.seen, loader.skipped) == (len(keys), 8) and len(keys) >= 4000 - 8 - 50
    rotten = set(range(500, 1000)) | {int(k) for k in sorted((f"{i:06d}" for i in range(4000)), key=subset_score)[500:1000]}
    path = ordered_corpus(tmp_path, n=4000, shard_size=500, bad=rotten, name="rotten")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match=r"\d+ of \d+ samples read were skipped as bad"):
            list(make(path, infinite=False, batch=50, buffer=1000, transform=False))



def broken_inside(jpeg: bytes) -> bytes:
    "The JPEG with its first Huffman table (after the frame header) overwritten: header and end marker intact, data not."
    at = jpeg.index(b"\xff\xc4", jpeg.index(b"\xff\xc0"))
    return jpeg[:at + 5] + b"\xff" * 20 + jpeg[at + 25:]


def jpeg_corpus(tmp_path, n, bad, name="j"):
    "`n` 16 px colour JPEGs in shards of 20; samples whose number is in `bad` are broken inside."
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n):
        data = encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "jpg", quality=90)
        samples.append({"__key__": f"{i:06d}", "jpg": broken_inside(data) if i in bad else data, "cls": i % 3})
    out = tmp_path / name
    out.mkdir()
    names = [f"{name}-{s:04d}.tar" for s in range(math.ceil(n / 20))]
    counts = [write_shard(out / f, samples[s * 20:(s + 1) * 20])[0] for s, f in enumerate(names)]
    return write_manifest(out / f"{name}.yaml", dict(name=name, format="webdataset", num_samples=n, shards=names,
                                                     shard_samples=counts, image_field="jpg", num_classes=3))


@pytest.mark.parametrize("transform", ["mae", "eval", None])
def test_a_jpeg_broken_inside_is_skipped_and_counted_within_the_budget(tmp_path, transform):
    """A JPEG whose header and end marker are fine but whose data is broken stays encoded until the transform
    decodes it: it is then skipped and counted like any bad sample (fast path, generic transform, no transform),
    and too many of them stop the run with the data-quality error."""
    from prepretrain_lit.decode import jpeg_header, jpeg_is_complete, open_image
    good = encode_image(np.zeros((16, 16, 3), dtype=np.uint8) + 90, "jpg")
    assert jpeg_header(broken_inside(good)) == (16, 16, 3) and jpeg_is_complete(broken_inside(good))
    assert type(open_image(broken_inside(good))).__name__ == "EncodedJpeg"        # not decoded when read
    transforms = {"mae": mae_transform(8), "eval": eval_transform(8), None: None}
    path = jpeg_corpus(tmp_path, 200, bad={5, 60, 133})
    stream = ShardStream(path, transforms[transform], shuffle_buffer=16, max_skip_fraction=0.05)
    loader = StreamLoader(stream, batch_size=10, drop_last=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(200) if i not in {5, 60, 133}]
    assert (loader.seen, loader.skipped) == (197, 3)
    assert any("skipping bad sample" in str(w.message) and "does not decode" in str(w.message) for w in caught)
    path = jpeg_corpus(tmp_path, 200, bad=set(range(0, 200, 4)), name="rotten")     # 25% broken, limit 5%
    stream = ShardStream(path, transforms[transform], shuffle_buffer=16, max_skip_fraction=0.05, min_samples_for_check=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match=r"\d+ of \d+ samples read were skipped as bad"):
            list(StreamLoader(stream, batch_size=10, drop_last=False))

# -- the plan, at cluster size, from counts alone -----------------------------------------------------------

def test_buffer_order_is_a_permutation_that_emits_within_a_buffer():
    order = buffer_order(500, 16, np.random.default_rng(0))
    assert sorted(order) == list(range(500)) and all(order[q] <= q + 15 for q in range(500))
    assert not np.array_equal(order, np.arange(500))


def test_a_reduced_cluster_simulation_balanced_complete_elastic():
    shards, per_shard, readers, fewer = 3000, 6, 512, 448       # IG-3B: 300k x 10k, 5,120 -> 4,480 readers
    plan = StreamPlan((per_shard,) * shards, seed=1, shuffle_buffer=4, window_samples=4)
    windows = [plan.epoch_windows(0, r, readers) for r in range(readers)]
    per_reader = [sum(len(w.shards) for w in ws) for ws in windows]
    assert max(per_reader) - min(per_reader) <= 1                # balanced
    assert sorted(s for ws in windows for w in ws for s in w.shards) == list(range(shards))   # every shard once
    rng = np.random.default_rng(0)
    lengths = [sum(plan.length(w) for w in ws) for ws in windows]
    positions = [[0, int(rng.integers(0, n + 1))] for n in lengths]
    consumed = [plan.sample_ids(w) for r, ws in enumerate(windows) for w in ws]
    consumed = np.concatenate([np.concatenate([plan.sample_ids(w) for w in ws])[:p]
                               for ws, (_, p) in zip(windows, positions)])
    layout = {"readers": fewer, "plan": {"epoch": 0, "from": {"readers": readers, "positions": positions, "plan": None}}}
    rest = np.concatenate([plan.sample_ids(w) for r in range(fewer) for w in plan.reader_windows(layout, r, 0)])
    assert np.array_equal(np.sort(np.concatenate([consumed, rest])), np.arange(shards * per_shard))
    dealt = [sum(plan.length(w) for w in plan.reader_windows(layout, r, 0)) for r in range(fewer)]
    assert max(dealt) - min(dealt) <= 2 * 4 * per_shard          # the rest is dealt evenly, window by window


# -- the trainer: the stream state in the checkpoint, a resume on another world size ---------------------------

def test_the_trainer_resumes_a_stream_checkpoint_on_another_world_size_with_a_warning(tmp_path):
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.checkpoint import save_file_atomic
    from prepretrain_lit.trainer import train
    path = ordered_corpus(tmp_path, n=200, shard_size=20)
    cfg = load_config(preset="tiny", overrides=[f"data.dataset={path}", "model.depth=2", "model.decoder_depth=1",
                                                "data.num_workers=0", "data.batch_size=8", "train.steps=4",
                                                "train.checkpoint_every=2", "train.keep_checkpoints=5"])
    out = tmp_path / "run"
    train("mae", cfg, out, progress=False)
    ckpt = out / "checkpoints" / "step_00000002.pt"
    state = torch.load(ckpt, weights_only=True)
    (mine,) = state["data"]["stream"]                       # one rank, one reader, 16 samples in
    assert mine["positions"][0][2] >= 16
    state["world_size"] = 2                                 # as if written by 2 ranks: reader 1 had not started
    state["data"]["stream"] = [{**mine, "readers": 2}, {**mine, "readers": 2, "rank": 1, "positions": [[1, 0, 0]]}]
    state["rng"] = state["rng"] * 2
    save_file_atomic(state, ckpt)                            # with a fresh integrity sidecar, as the trainer writes
    (out / "checkpoints" / "step_00000004.pt").unlink()
    (out / "model.pt").unlink()
    with pytest.warns(UserWarning, match="written by 2 processes, this run has 1: the global batch changes from 16 to 8"):
        train("mae", cfg, out, progress=False)
    assert (out / "model.pt").exists()


# -- the bad-sample budget: a statistical rule while reading, an exact one at the end of an epoch ------------

def simulated_stops(rate: float, streams: int, samples: int = 20_000, batch: int = 16, limit: float = 0.01,
                    seed: int = 0) -> np.ndarray:
    "Samples read when `check_skip_fraction` stopped each of `streams` simulated streams with `rate` bad (inf: never)."
    from prepretrain_lit.loader import check_skip_fraction
    rng = np.random.default_rng(seed)
    stops = np.full(streams, np.inf)
    for s in range(streams):
        bad = np.cumsum(rng.binomial(batch, rate, samples // batch))
        for i, k in enumerate(bad):
            n = (i + 1) * batch
            try: check_skip_fraction(n - int(k), int(k), limit, 200)
            except DataQualityError:
                stops[s] = n
                break
    return stops


def test_a_corpus_within_its_bad_sample_limit_is_never_stopped_and_one_far_over_it_is_stopped_early():
    within = simulated_stops(0.008, streams=60)                # 0.8% bad, limit 1%: many seeds, never stopped
    assert np.isinf(within).all(), within[np.isfinite(within)]
    over = simulated_stops(0.05, streams=60, samples=2000)     # 5% bad: stopped every time, early
    assert np.isfinite(over).all() and over.max() <= 1000, over


def test_an_epoch_just_over_the_limit_is_stopped_when_it_ends(tmp_path):
    """6 bad of 400 (1.5%, limit 1%) is no clear excess while reading (p ~ 0.2), so no running look stops it; the
    exact verdict at the end of the epoch does."""
    path = jpeg_corpus(tmp_path, 400, bad={7, 70, 150, 222, 301, 388})
    stream = ShardStream(path, eval_transform(8), shuffle_buffer=16, max_skip_fraction=0.01)
    loader = StreamLoader(stream, batch_size=10, drop_last=False)
    read = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataQualityError, match=r"6 of 400 samples .* over the whole of epoch 0"):
            for batch in loader: read += batch["key"]
    assert len(read) == 394                                   # every good sample was handed out before the verdict
