"""Manifest and hashtag-target costs at IG-3B size, without the data.

1. Manifest load time and peak Python memory at 300k shards (per-shard counts and SHA-256): the old inline
   YAML read the old way (`yaml.safe_load` + `parse_manifest`), the same inline YAML through `load_manifest`,
   and the new YAML + `.npz` sidecar through `load_manifest`; then a second `load_manifest` (parsed once
   per process: the same object back).
2. Batch bytes of the hashtag targets at 28K hashtags: the old dense multi-hot (one |V|-wide float vector a
   sample, stacked) against the new padded indices (`collate_samples`), for a batch of `--batch` samples with
   `--tags` hashtags each; the bytes are counted on the collated batch (both grow linearly with the batch).
3. `shards index` per shard, counted (bytes read, not time) on a small img2dataset-style corpus in each mode
   (sha256: the whole tar once; `--no-sha256` with img2dataset's `_stats.json`: a few headers; no stats: every
   header, the data skipped), and extrapolated to `--shards` shards of 10k samples of ~100 KB; with the pickled
   size of what every rank gathers, and the seeded shard order of the subsets at that many shards.

    .venv/bin/python benchmarks/manifest_scale.py                     # 300k shards, 28K hashtags, batch 4096
    .venv/bin/python benchmarks/manifest_scale.py --shards 30000      # quicker

`rows()` returns the figures as dicts (for `benchmarks/data_scale.py`); times are wall seconds of one load on
this machine, memory is tracemalloc's peak of a separate load.
"""
import argparse
import hashlib
import pickle
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import yaml

from prepretrain_lit.manifest import _MANIFESTS, load_manifest, parse_manifest, write_manifest
from prepretrain_lit.tars import inspect_shards, shard_paths, write_img2dataset_like
from prepretrain_lit.subsets import shard_order
from prepretrain_lit.loader import collate_samples


def corpus_fields(num_shards: int) -> dict:
    "An IG-like manifest: `num_shards` shards of ~10k samples with counts and digests."
    counts = np.random.default_rng(0).integers(9_000, 11_000, num_shards)
    return {"name": "ig", "format": "webdataset", "num_samples": int(counts.sum()),
            "shards": f"/data/ig/ig-{{000000..{num_shards - 1:06d}}}.tar", "shard_samples": counts.tolist(),
            "sha256": [hashlib.sha256(i.to_bytes(4, "big")).hexdigest() for i in range(num_shards)],
            "label_field": None, "num_hashtags": 28000}


def old_load(path: Path):
    "How a manifest was read before the sidecar: the pure-Python YAML loader, every time."
    return parse_manifest(yaml.safe_load(path.read_text()), path)


def measure(load, path: Path) -> tuple[float, float]:
    "(seconds of one load, peak MB of another, traced)."
    _MANIFESTS.clear()
    start = time.perf_counter()
    load(path)
    seconds = time.perf_counter() - start
    _MANIFESTS.clear()
    tracemalloc.start()
    load(path)
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return seconds, peak


def manifest_rows(num_shards: int = 300_000) -> list[dict]:
    fields = corpus_fields(num_shards)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "inline").mkdir()
        inline = write_manifest(Path(d) / "inline" / "ig.yaml", fields, sidecar=False)
        side = write_manifest(Path(d) / "ig.yaml", fields, sidecar=True)
        rows = []
        for label, load, path in (("inline YAML, old reader", old_load, inline),
                                  ("inline YAML, load_manifest", load_manifest, inline),
                                  ("YAML + .npz sidecar, load_manifest", load_manifest, side)):
            seconds, peak = measure(load, path)
            rows.append({"what": f"manifest load, {num_shards} shards: {label}", "seconds": round(seconds, 3),
                         "peak_mb": round(peak, 1), "bytes_on_disk": path.stat().st_size +
                         (path.with_name("ig.shards.npz").stat().st_size if "sidecar" in label else 0)})
        _MANIFESTS.clear()
        first = load_manifest(side)
        start = time.perf_counter()
        again = load_manifest(side)
        rows.append({"what": "manifest load again in the same process (sidecar)", "seconds": round(time.perf_counter() - start, 6),
                     "same_object": again is first})
    return rows


def target_rows(vocab: int = 28_000, batch: int = 4096, tags: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    chosen = [np.sort(rng.choice(vocab, tags, replace=False)) for _ in range(batch)]
    sparse = collate_samples([{"hashtags": torch.tensor(c, dtype=torch.long)} for c in chosen])["hashtags"]
    measured = min(batch, 256)                # the old collate's tensor, built for 256 samples and scaled (459 MB at 4096)
    dense = torch.stack([torch.zeros(vocab).index_fill_(0, torch.tensor(c), 1.0) for c in chosen[:measured]])
    dense_bytes = dense.numel() * dense.element_size() * batch // measured
    sparse_bytes = sparse.numel() * sparse.element_size()
    return [{"what": f"hashtag targets, batch {batch}, {vocab} hashtags, {tags} a sample: dense multi-hot (old)",
             "bytes": dense_bytes},
            {"what": f"hashtag targets, batch {batch}, {vocab} hashtags, {tags} a sample: padded indices (new)",
             "bytes": sparse_bytes, "ratio_dense_over_sparse": round(dense_bytes / sparse_bytes, 1)}]


def index_rows(shards: int = 16, per_shard: int = 50, ig_shards: int = 300_000, ig_per_shard: int = 10_000,
               ig_sample_kb: float = 100.0) -> list[dict]:
    """`shards index`, counted per shard in each mode on `shards` img2dataset-style shards, and extrapolated to
    `ig_shards` shards of `ig_per_shard` samples of `ig_sample_kb` KB (3 members a sample: jpg, txt, json)."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        tars = write_img2dataset_like(Path(d), shards, per_shard, size=(32, 24))
        paths = shard_paths(d)
        size = sum(t.stat().st_size for t in tars) / shards
        members = 3 * per_shard
        for mode, sha in (("sha256 (the tar once)", True), ("--no-sha256, img2dataset stats", False),
                          ("--no-sha256, no stats (headers)", False)):
            if "no stats" in mode:
                for stats in Path(d).glob("*_stats.json"): stats.unlink()
            infos = inspect_shards(paths, sha256=sha)
            read = sum(i.bytes_read for i in infos) / shards
            if sha: ig_read = ig_per_shard * ig_sample_kb * 1024 * read / size    # the shard's bytes, whatever they are
            elif "headers" in mode: ig_read = 3 * ig_per_shard * read / members   # ~512 bytes a member
            else: ig_read = read                                                  # a constant: the first headers
            out.append({"what": f"index per shard: {mode}", "bytes_read_per_shard": round(read),
                        "of_shard_bytes": round(read / size, 3), "counted_samples": infos[0].samples,
                        f"at_{ig_shards}_shards_TB": round(ig_shards * ig_read / 1e12, 4)})
        gathered = len(pickle.dumps(infos)) / shards
        out.append({"what": "index: what each rank gathers, per shard (pickled ShardInfo)", "bytes": round(gathered),
                    f"at_{ig_shards}_shards_MB": round(gathered * ig_shards / 1e6, 1)})
    shard_order.cache_clear()
    start = time.perf_counter()
    shard_order(ig_shards, 0)
    out.append({"what": f"subsets over shards: the seeded order of {ig_shards} shards (once per process)",
                "seconds": round(time.perf_counter() - start, 3), "keys_read_per_subset": ig_per_shard})
    return out


def rows(num_shards: int = 300_000, vocab: int = 28_000, batch: int = 4096, tags: int = 5) -> list[dict]:
    "Every figure of this benchmark, as dicts."
    return manifest_rows(num_shards) + target_rows(vocab, batch, tags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=300_000)
    parser.add_argument("--hashtags", type=int, default=28_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tags", type=int, default=5, help="hashtags per sample")
    args = parser.parse_args()
    for row in rows(args.shards, args.hashtags, args.batch, args.tags) + index_rows(ig_shards=args.shards):
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
