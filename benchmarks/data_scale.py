"""Streaming at scale: what a resume and a subset cost, measured on shards (counts of samples and bytes read,
and time), and the cluster-size layout simulated from counts alone (IG-3B: 300k shards of 10k samples,
64 nodes x 8 GPUs x 10 loader workers = 5,120 readers; a requeue onto 56 nodes = 4,480 readers).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py                  # ~1-2 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_scale.py --quick          # the reduced version (seconds)

`replay` is the way every resume worked before (and still does for a checkpoint without stream state):
replay the epoch and drop what was consumed; `state` re-enters the saved (epoch, position) of each reader.
"""
import argparse
import copy
import math
import pickle
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import prepretrain_lit.loader as loader_module
from prepretrain_lit.data import encode_image
from prepretrain_lit.subsets import nested_subsets, subset_score
from prepretrain_lit.manifest import write_manifest, write_shard
from prepretrain_lit.loader import ShardStream, StreamLoader
from prepretrain_lit.stream import StreamPlan
from prepretrain_lit.decode import eval_transform


def write_corpus(out: Path, n: int, shard_size: int, side: int, subsets: dict, record_shards: bool, name: str) -> Path:
    "Shards of random-noise JPEGs written in subset-score order (each subset a prefix of shards)."
    rng = np.random.default_rng(0)
    keys = sorted((f"{i:07d}" for i in range(n)), key=subset_score)
    images = [encode_image(rng.integers(0, 255, (side, side, 3), dtype=np.uint8), "jpg", quality=90) for _ in range(64)]
    samples = [{"__key__": k, "jpg": images[i % 64], "cls": 0} for i, k in enumerate(keys)]
    out.mkdir(parents=True)
    names = [f"{name}-{s:05d}.tar" for s in range(math.ceil(n / shard_size))]
    counts = [write_shard(out / f, samples[s * shard_size:(s + 1) * shard_size])[0] for s, f in enumerate(names)]
    specs = nested_subsets(keys, subsets)
    if record_shards:
        for spec in specs.values(): spec["shards"] = math.ceil(spec["size"] / shard_size)
    return write_manifest(out / f"{name}.yaml", dict(name=name, format="webdataset", num_samples=n, shards=names,
                                                     shard_samples=counts, subsets=specs))


class ReadCounter:
    "Counts samples and bytes taken out of tar files (loaders with 0 workers read in this process)."
    def __init__(self):
        self.samples = self.bytes = 0
        self.original = loader_module.tar_samples
        loader_module.tar_samples = self.tar_samples

    def tar_samples(self, location):
        for sample in self.original(location):
            self.samples += 1
            self.bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
            yield sample

    def reset(self): self.samples = self.bytes = 0


def loader(path, subset=None, buffer=1000, batch=64):
    stream = ShardStream(path, eval_transform(32), subset=subset, shuffle_buffer=buffer, infinite=True, seed=0)
    return StreamLoader(stream, batch_size=batch)


def resume_costs(path: Path, counter: ReadCounter, batches_per_epoch: int, fractions=(0.05, 0.9)) -> list[dict]:
    "First batch after a resume at each fraction of the epoch: samples and bytes read, seconds; state vs replay."
    at = {f: max(1, int(f * batches_per_epoch)) for f in fractions}
    rows, states = [], {}
    ref = loader(path)
    it = iter(ref)
    for b in range(1, max(at.values()) + 1):
        next(it)
        for f, k in at.items():
            if k == b: states[f] = copy.deepcopy(ref.state_dict())
    for f, k in at.items():
        for how in ("state", "replay"):
            resumed = loader(path)
            if how == "state": resumed.load_state_dict([states[f]])
            counter.reset()
            tic = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                next(resumed.batches(k))
            rows.append({"at": f, "batch": k, "how": how, "samples": counter.samples, "bytes": counter.bytes,
                         "seconds": time.perf_counter() - tic})
    return rows


def subset_fraction(path: Path, counter: ReadCounter, subset: str, size: int, total_bytes: int) -> float:
    "Bytes read for one epoch of `subset` over the corpus's bytes."
    stream = ShardStream(path, None, subset=subset, shuffle_buffer=256, seed=0)
    counter.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b["key"]) for b in StreamLoader(stream, batch_size=16, drop_last=False))
    assert n == size, (n, size)
    return counter.bytes / total_bytes


def simulate(shards: int, per_shard: int, readers: int, new_readers: int, buffer: int, sample_level: bool,
             rng: np.random.Generator) -> dict:
    "The layout of one epoch from counts alone: balance, coverage, state size, resume cost, the elastic deal."
    plan = StreamPlan((per_shard,) * shards, seed=0, shuffle_buffer=buffer, window_samples=buffer)
    tic = time.perf_counter()
    windows = [plan.epoch_windows(0, r, readers) for r in range(readers)]
    per_reader = [sum(len(w.shards) for w in ws) for ws in windows]
    every_shard_once = sorted(s for ws in windows for w in ws for s in w.shards) == list(range(shards))
    lengths = [sum(plan.length(w) for w in ws) for ws in windows]
    positions = [[0, int(rng.integers(0, n + 1))] for n in lengths]
    # the state the trainer saves: one entry per rank (10 readers each), gathered
    workers = 10 if readers % 10 == 0 else 1
    states = [{"readers": readers, "rank": rank, "rotation": 3, "plan": None,
               "positions": [[r, *positions[r]] for r in range(rank * workers, (rank + 1) * workers)]}
              for rank in range(readers // workers)]
    state_bytes = len(pickle.dumps(states)) / readers
    # resume cost: samples read again to re-enter a reader's stream early and late in the epoch
    ws = windows[0]
    early, late = int(0.05 * lengths[0]), int(0.9 * lengths[0])
    cost = {}
    for name, p in (("early", early), ("late", late)):
        k, into = plan.locate(ws, p)
        cost[name] = {"position": p, "state": plan.resume_reads(ws[k], into), "replay": p}
    # elastic: the old readers' rest dealt to the new ones
    old = {"readers": readers, "positions": positions, "plan": None}
    layout = {"readers": new_readers, "plan": {"epoch": 0, "from": old}}
    dealt = [plan.reader_windows(layout, r, 0) for r in range(new_readers)]
    dealt_samples = [sum(plan.length(w) for w in d) for d in dealt]
    rest = sum(dealt_samples)
    consumed = sum(p for _, p in positions)
    out = {"shards": shards, "per_shard": per_shard, "readers": readers, "new_readers": new_readers,
           "shards_per_reader": (min(per_reader), max(per_reader)), "every_shard_once": every_shard_once,
           "state_bytes_per_reader": state_bytes, "resume": cost,
           "elastic_counts_add_up": consumed + rest == shards * per_shard,
           "dealt_per_new_reader": (min(dealt_samples), max(dealt_samples))}
    if sample_level:
        seen = np.concatenate([np.concatenate([plan.sample_ids(w) for w in ws])[:p] for ws, (_, p) in zip(windows, positions)]
                              + [plan.sample_ids(w) for d in dealt for w in d])
        out["elastic_every_sample_once"] = bool(np.array_equal(np.sort(seen), np.arange(shards * per_shard)))
    out["seconds"] = time.perf_counter() - tic
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and a reduced simulation")
    args = parser.parse_args()
    n, shard_size = (4000, 250) if args.quick else (16000, 500)
    tmp = Path(tempfile.mkdtemp())
    counter = ReadCounter()
    path = write_corpus(tmp / "ordered", n, shard_size, 48, {"10%": n // 10}, True, "ordered")
    legacy = write_corpus(tmp / "legacy", n, shard_size, 48, {"10%": n // 10}, False, "legacy")
    counter.reset()
    list(StreamLoader(ShardStream(path, None, shuffle_buffer=256), batch_size=256, drop_last=False))
    total = counter.bytes                              # the sample bytes of the whole corpus (tar headers aside)
    print(f"corpus: {n} JPEGs (48 px) in {n // shard_size} shards of {shard_size}, {total / 1e6:.1f} MB of samples; "
          "shuffle buffer 1000, batch 64, 1 reader")
    print(f"{'resume at':>10} {'how':>7} {'samples read':>13} {'MB read':>8} {'first batch s':>14}")
    for row in resume_costs(path, counter, n // 64):
        print(f"{row['at']:>10.0%} {row['how']:>7} {row['samples']:>13} {row['bytes'] / 1e6:>8.2f} {row['seconds']:>14.3f}")
    for name, p in (("with 'shards: K'", path), ("without (all shards filtered)", legacy)):
        print(f"10% subset, {name}: bytes read / corpus bytes = {subset_fraction(p, counter, '10%', n // 10, total):.3f}")
    rng = np.random.default_rng(0)
    sims = ([(3000, 10, 512, 448, 4, True)] if args.quick else
            [(300_000, 10_000, 5120, 4480, 1000, False), (300_000, 10, 5120, 4480, 4, True)])
    for shards, per_shard, readers, new, buffer, sample_level in sims:
        s = simulate(shards, per_shard, readers, new, buffer, sample_level, rng)
        print(f"\nsimulation: {shards} shards x {per_shard} samples, {readers} readers -> {new} (buffer {buffer})")
        print(f"  shards per reader min/max {s['shards_per_reader']}, every shard read once: {s['every_shard_once']}")
        print(f"  resume state: {s['state_bytes_per_reader']:.1f} bytes per reader (pickled, all ranks gathered)")
        for name, c in s["resume"].items():
            print(f"  resume {name} (position {c['position']}): samples read again {c['state']} (replay: {c['replay']})")
        print(f"  elastic: consumed + dealt rest = every sample: {s['elastic_counts_add_up']}; "
              f"samples dealt per new reader min/max {s['dealt_per_new_reader']}")
        if "elastic_every_sample_once" in s: print(f"  elastic, sample by sample: every sample once: {s['elastic_every_sample_once']}")
        print(f"  ({s['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
