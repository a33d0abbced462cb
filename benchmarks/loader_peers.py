"""The package's loader against its peers: webdataset's own pipeline, mosaicml-streaming, litdata and torchvision's
ImageFolder, on the same JPEG bytes and the same transform.

What it measures, for each loader at each worker count (`--workers`, 0 and 2 by default), batch 64:

- **throughput**: images/s over one full epoch (worker start-up included, as a training epoch pays it) and CPU
  milliseconds per image (this process and its loader workers together), the median of `--rounds` passes, the
  loaders taking turns (the order flips every round). `ours` is `ShardStream` + `StreamLoader` with
  `mae_transform(224)` (its fast decode-and-resize path); `ours-generic` is the same transform wrapped in a plain
  callable (`UserTransform`), so it runs as any user transform does (PIL decode, torchvision ops). The peers call
  `mae_transform(224)` itself on a PIL image, as their users would.
- **resume**: for each loader that can resume (ours: `StreamLoader.state_dict`; webdataset through torchdata's
  `StatefulDataLoader`; mosaicml-streaming's and litdata's `StreamingDataLoader.state_dict`), one uninterrupted
  epoch is run and its state saved after 10% and 90% of its batches; a fresh loader loads each state, and the
  benchmark times construction + `load_state_dict` + the first batch, then reads on to the end of the epoch and
  says whether the resumed stream is exact (the same samples in the same order as the uninterrupted run from that
  point), the same samples in another order, or other samples; and whether the first resumed batch has the same
  pixels (the same augmentation). `cold` is the first batch of a fresh epoch, for scale.

The data: `--images` photo-like JPEGs of 500x375 (q90), generated here, no downloads (`loader_throughput.py`'s
`photo_like`), written once as the package's shards; then the very bytes inside those shards are written out for
each peer: an ImageFolder tree (`<class>/<key>.jpg`), mosaicml-streaming MDS shards and litdata chunks (raw
bytes columns: no peer re-encodes). The peers live in an optional extra (`pip install -e .[bench]`), never in the
runtime lock; a peer that is not installed is reported as "not installed" and skipped. Run from the repository
root (numbers compare only within one run on one machine: print and read the ratios):

    OMP_NUM_THREADS=1 /path/to/venv-with-peers/bin/python benchmarks/loader_peers.py --out /tmp/loader_peers.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_peers.py --quick --out /tmp/q.json   # seconds, tests
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_throughput import photo_like  # noqa: E402  (the photo-like generator, shared with that benchmark)

from prepretrain_lit.data import Source, build_shards  # noqa: E402
from prepretrain_lit.decode import mae_transform  # noqa: E402
from prepretrain_lit.loader import ShardStream, StreamLoader  # noqa: E402
from prepretrain_lit.manifest import load_manifest  # noqa: E402
from prepretrain_lit.render import SHAPES, SHAPES_HASHTAGS  # noqa: E402
from prepretrain_lit.stream import tar_samples  # noqa: E402

PEERS = ("webdataset", "mosaicml-streaming", "litdata", "torchdata", "torchvision")   # distribution names
SEED = 0


# -- the machine and the peers -----------------------------------------------------------------------------------

def machine() -> dict:
    "CPU model, the SIMD flags that matter for decoding and resampling, cores, load, versions."
    model, flags = platform.processor() or "?", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"): model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"): flags = set(line.split(":", 1)[1].split())
    except (OSError, subprocess.SubprocessError):
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def installed(dist: str) -> str | None:
    "The installed version of distribution `dist`, or None."
    try: return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError: return None


def peer_versions() -> dict[str, str]:
    return {name: installed(name) or "not installed" for name in PEERS}


# -- the data: the package's shards, then their bytes for every peer ------------------------------------------

@dataclass
class Corpus:
    "Where each loader's copy of the same JPEG bytes lies (a peer's is None when it is not installed)."
    manifest: Path
    shards: list[str]
    folder: Path
    mds: Path | None = None
    litdata: Path | None = None
    n: int = 0
    side: tuple[int, int] = (0, 0)


def shard_samples(shards: list[str]) -> Iterable[tuple[str, bytes, int]]:
    "(key, JPEG bytes, class) of every sample in the package's shards, as stored."
    for shard in shards:
        for s in tar_samples(shard):
            yield s["__key__"], s["jpg"], int(s["cls"])


def write_folder(corpus: Corpus, classes: list[str]) -> None:
    for key, data, cls in shard_samples(corpus.shards):
        folder = corpus.folder / classes[cls]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(data)


def write_mds(corpus: Corpus, out: Path, shard_bytes: int) -> None:
    "mosaicml-streaming's MDS shards: the same bytes in a `bytes` column (no re-encoding)."
    from streaming import MDSWriter
    with MDSWriter(out=str(out), columns={"key": "str", "jpg": "bytes", "cls": "int"}, size_limit=shard_bytes) as w:
        for key, data, cls in shard_samples(corpus.shards):
            w.write({"key": key, "jpg": data, "cls": cls})


def _lit_shard(shard: str) -> Iterable[dict]:
    "litdata's `optimize` function: one input (a shard of ours) -> its samples, the same bytes (a generator)."
    for key, data, cls in shard_samples([shard]):
        yield {"key": key, "jpg": data, "cls": cls}


def write_litdata(corpus: Corpus, out: Path, chunk_bytes: int) -> None:
    "litdata chunks through its `optimize`, the bytes kept as bytes (litdata's BytesSerializer)."
    import multiprocessing
    import litdata
    method = multiprocessing.get_start_method(allow_none=True)
    with warnings.catch_warnings(), open(os.devnull, "w") as quiet:
        warnings.simplefilter("ignore")
        stdout, sys.stdout = sys.stdout, quiet
        try:
            litdata.optimize(fn=_lit_shard, inputs=list(corpus.shards), output_dir=str(out), chunk_bytes=chunk_bytes,
                             num_workers=1, reorder_files=False, verbose=False, start_method="fork")
        finally:
            sys.stdout = stdout
            # optimize sets the process-wide start method (force=True): put it back, or every loader of this
            # run would spawn its workers (a fresh interpreter and torch import each, ~2.5 s a pass here)
            multiprocessing.set_start_method(method, force=True)


def make_corpus(root: Path, n: int, size: tuple[int, int], quality: int, peers: dict[str, str]) -> Corpus:
    """`n` photo-like JPEGs as 8 shards of ours, then the same bytes for each installed peer (built once per
    `root`; a later run with the same `--data` reuses them)."""
    where = root / f"photos-{n}-{size[0]}x{size[1]}-q{quality}"
    done = where / "done.json"
    if done.exists():
        info = json.loads(done.read_text())
        corpus = Corpus(Path(info["manifest"]), info["shards"], where / "folder", n=n, side=size)
    else:
        source = Source("photos", n, partial(photo_like, SEED, size=size), list(SHAPES), list(SHAPES_HASHTAGS))
        manifest = build_shards(source, where / "shards", shard_size=-(-n // 8), fmt="jpg", quality=quality,
                                workers=min(2, os.cpu_count() or 1), progress=False)
        shards = list(load_manifest(manifest).shards)
        corpus = Corpus(manifest, shards, where / "folder", n=n, side=size)
        write_folder(corpus, list(SHAPES))
        done.write_text(json.dumps({"manifest": str(manifest), "shards": shards}))
    shard_bytes = max(1 << 16, sum(os.path.getsize(s) for s in corpus.shards) // 8)
    if peers["mosaicml-streaming"] != "not installed":
        corpus.mds = where / "mds"
        if not (corpus.mds / "index.json").exists(): write_mds(corpus, corpus.mds, shard_bytes)
    if peers["litdata"] != "not installed":
        corpus.litdata = where / "litdata"
        if not (corpus.litdata / "index.json").exists(): write_litdata(corpus, corpus.litdata, shard_bytes)
    return corpus


# -- the loaders: each yields batches {"image": (N, 3, 224, 224), "label", "key": [str]}; every maker takes the same
#    arguments (corpus, transform, batch, workers, buffer), `buffer` being the shuffle buffer of the two tar streams

class UserTransform:
    "The same transform behind a plain callable: what any user transform looks like to the loader (no fast path)."
    def __init__(self, transform: Callable): self.transform = transform
    def __call__(self, image): return self.transform(image)


def ours(corpus: Corpus, transform: Callable, batch: int, workers: int, buffer: int) -> StreamLoader:
    stream = ShardStream(corpus.manifest, transform, seed=SEED, shuffle_buffer=buffer)
    return StreamLoader(stream, batch, num_workers=workers)


def _wds_item(transform: Callable, sample: dict) -> dict:
    return {"image": transform(sample["jpg"]), "label": int(sample["cls"]), "key": sample["__key__"]}


def wds_pipeline(corpus: Corpus, transform: Callable, buffer: int):
    "webdataset's own pipeline: shard shuffle and split by worker, sample shuffle buffer, PIL decode, the transform."
    import webdataset as wds
    return (wds.WebDataset(corpus.shards, shardshuffle=len(corpus.shards), seed=SEED, empty_check=False)
            .shuffle(buffer, seed=SEED).decode("pil").map(partial(_wds_item, transform)))


def webdataset_loader(corpus: Corpus, transform: Callable, batch: int, workers: int, buffer: int, stateful: bool):
    "The pipeline in torch's DataLoader (throughput), or in torchdata's StatefulDataLoader (to resume)."
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader as Loader
    else:
        Loader = torch.utils.data.DataLoader
    return Loader(wds_pipeline(corpus, transform, buffer), batch_size=batch, num_workers=workers, drop_last=True)


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def mosaic_loader(corpus: Corpus, transform: Callable, batch: int, workers: int, buffer: int):
    "mosaicml-streaming: a StreamingDataset over the MDS shards (shuffled, seeded), in its StreamingDataLoader."
    from streaming import StreamingDataLoader, StreamingDataset

    class Images(StreamingDataset):
        def __init__(self, image_transform: Callable, **kw):
            super().__init__(**kw)
            self.image_transform = image_transform
        def __getitem__(self, i: int) -> dict:
            s = super().__getitem__(i)
            return {"image": self.image_transform(_pil(s["jpg"])), "label": int(s["cls"]), "key": s["key"]}

    data = Images(transform, local=str(corpus.mds), shuffle=True, shuffle_seed=SEED, batch_size=batch)
    return StreamingDataLoader(data, batch_size=batch, num_workers=workers, drop_last=True)


def _lit_item(transform: Callable, s: dict) -> dict:
    return {"image": transform(_pil(s["jpg"])), "label": int(s["cls"]), "key": s["key"]}


def litdata_loader(corpus: Corpus, transform: Callable, batch: int, workers: int, buffer: int):
    "litdata: a StreamingDataset over its chunks (shuffled, seeded) with the transform, in its StreamingDataLoader."
    import litdata
    data = litdata.StreamingDataset(str(corpus.litdata), shuffle=True, seed=SEED, drop_last=True,
                                    transform=partial(_lit_item, transform))
    return litdata.StreamingDataLoader(data, batch_size=batch, num_workers=workers, drop_last=True)


class KeyedImageFolder(torchvision.datasets.ImageFolder):
    "ImageFolder, each item a dict that carries its file's stem (the sample key) beside image and label."
    def __getitem__(self, i: int) -> dict:
        path, target = self.samples[i]
        return {"image": self.transform(self.loader(path)), "label": target, "key": Path(path).stem}


def folder_loader(corpus: Corpus, transform: Callable, batch: int, workers: int, buffer: int):
    "torchvision's ImageFolder (PIL decode) in torch's DataLoader, shuffled by a seeded sampler."
    data = KeyedImageFolder(str(corpus.folder), transform)
    return torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                       generator=torch.Generator().manual_seed(SEED))


@dataclass
class Side:
    "One loader in the comparison: `make(workers)` gives a fresh loader; `resumable` when it has a state to save."
    name: str
    make: Callable[[int], Any]
    resume_make: Callable[[int], Any] | None = None
    status: str = "ok"


def sides(corpus: Corpus, batch: int, buffer: int, peers: dict[str, str]) -> list[Side]:
    "Every loader of the run; a peer that is not installed is listed with that status and never made."
    t = mae_transform(224)
    kw = dict(batch=batch, buffer=buffer)
    def make(fn, transform=t, **more):
        return lambda workers: fn(corpus, transform, workers=workers, **kw, **more)
    missing = lambda *names: next((f"not installed ({n})" for n in names if peers[n] == "not installed"), None)
    out = [Side("ours", make(ours), make(ours)), Side("ours-generic", make(ours, UserTransform(t)))]
    wds = Side("webdataset", make(webdataset_loader, stateful=False),
               None if missing("torchdata") else make(webdataset_loader, stateful=True))
    wds.status = missing("webdataset") or ("ok" if wds.resume_make else "ok; resume: not installed (torchdata)")
    mosaic = Side("mosaicml-streaming", make(mosaic_loader), make(mosaic_loader), missing("mosaicml-streaming") or "ok")
    lit = Side("litdata", make(litdata_loader), make(litdata_loader), missing("litdata") or "ok")
    folder = Side("ImageFolder", make(folder_loader))
    return out + [wds, mosaic, lit, folder]


# -- measuring ------------------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    "CPU time of this process (all its threads) and of its children that have been waited for (joined workers)."
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_pass(make: Callable[[], Any]) -> tuple[float, float, int]:
    """One full epoch of a fresh loader: (images/s, CPU ms per image, images). The wall time ends at the last batch;
    the CPU time is read once the loader and its workers are gone, so that the workers' time is in it."""
    gc.collect()
    start, cpu = time.perf_counter(), cpu_seconds()
    loader = make()
    it = iter(loader)
    seen = sum(len(b["key"]) for b in it)
    wall = time.perf_counter() - start
    del it, loader
    gc.collect()
    return seen / wall, 1e3 * (cpu_seconds() - cpu) / max(seen, 1), seen


def throughput(all_sides: list[Side], workers: int, rounds: int) -> dict[str, dict]:
    "Medians over `rounds` passes per side, the sides taking turns (A B C ... then ... C B A)."
    live = [s for s in all_sides if s.status.startswith("ok")]
    runs: dict[str, list] = {s.name: [] for s in live}
    for r in range(rounds):
        for side in (live if r % 2 == 0 else live[::-1]):
            try: runs[side.name].append(one_pass(partial(side.make, workers)))
            except Exception as e:
                if side.name.startswith("ours"): raise
                side.status = f"error: {type(e).__name__}: {e}"[:300]
                print(f"  {side.name}: {side.status}", flush=True)
    out = {}
    for side in all_sides:
        got = runs.get(side.name) or []
        row = {"status": side.status}
        if got:
            row.update(images_per_s=statistics.median(g[0] for g in got), cpu_ms_per_image=statistics.median(g[1] for g in got),
                       images=got[0][2], passes=[[round(g[0], 1), round(g[1], 3)] for g in got])
        out[side.name] = row
    return out


@dataclass
class Reference:
    "The uninterrupted epoch: keys per batch, the state after each resume point's batches, its pixels there."
    keys: list[list[str]] = field(default_factory=list)
    states: dict[int, Any] = field(default_factory=dict)
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    cold_s: float = 0.0


def resume_points(batches: int, fractions: list[float]) -> list[int]:
    "Batches consumed before each save: a fraction of the epoch, at least 1 and at most batches - 1."
    return [min(max(1, round(f * batches)), batches - 1) for f in fractions]


def reference_epoch(make: Callable[[], Any], points: list[int]) -> Reference:
    ref = Reference()
    start = time.perf_counter()
    loader = make()
    for i, batch in enumerate(loader):
        if i == 0: ref.cold_s = time.perf_counter() - start
        if i in ref.states: ref.images[i] = batch["image"].clone()
        ref.keys.append(list(batch["key"]))
        if i + 1 in points: ref.states[i + 1] = copy.deepcopy(loader.state_dict())
    del loader
    gc.collect()
    return ref


def resumed_epoch(make: Callable[[], Any], state: Any) -> tuple[float, list[list[str]], torch.Tensor]:
    "A fresh loader from `state`: (seconds to its first batch, keys of every batch to the epoch's end, first images)."
    start = time.perf_counter()
    loader = make()
    loader.load_state_dict(copy.deepcopy(state))
    it = iter(loader)
    first = next(it)
    ttfb = time.perf_counter() - start
    keys = [list(first["key"])] + [list(b["key"]) for b in it]
    del it, loader
    gc.collect()
    return ttfb, keys, first["image"]


def verdict(resumed: list[list[str]], expected: list[list[str]]) -> str:
    "exact: the same batches in order; reordered: the same samples in another order; else how many differ."
    if resumed == expected: return "exact"
    got, want = [k for b in resumed for k in b], [k for b in expected for k in b]
    if sorted(got) == sorted(want): return "same samples, other order"
    missing, extra = len(set(want) - set(got)), len(set(got) - set(want))
    return f"differs ({len(got)} read vs {len(want)}; {missing} missing, {extra} not in the reference)"


def resume_check(side: Side, workers: int, fractions: list[float], batches: int) -> list[dict]:
    "Save after each fraction of one uninterrupted epoch, resume a fresh loader from it, compare with the reference."
    make = partial(side.resume_make, workers)
    points = resume_points(batches, fractions)
    ref = reference_epoch(make, points)
    points = resume_points(len(ref.keys), fractions)
    if set(points) != set(ref.states):               # the epoch was not the length expected: take states again
        ref = reference_epoch(make, points)
    rows = []
    for fraction, k in zip(fractions, points):
        ttfb, keys, first = resumed_epoch(make, ref.states[k])
        rows.append({"loader": side.name, "workers": workers, "at": fraction, "batch": k, "batches": len(ref.keys),
                     "first_batch_s": ttfb, "cold_first_batch_s": ref.cold_s, "stream": verdict(keys, ref.keys[k:]),
                     "pixels_exact": bool(first.shape == ref.images[k].shape and torch.equal(first, ref.images[k]))})
    return rows


# -- the report -----------------------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_throughput(workers: int, rows: dict[str, dict]) -> None:
    o, g = rows["ours"].get("images_per_s"), rows["ours-generic"].get("images_per_s")
    oc = rows["ours"].get("cpu_ms_per_image")
    print(f"\nworkers {workers}")
    print(f"{'loader':<20} {'img/s':>7} {'CPU ms/img':>11} {'ours/it':>8} {'generic/it':>11} {'its CPU/ours':>13}  status")
    for name, r in rows.items():
        rate, cpu = r.get("images_per_s"), r.get("cpu_ms_per_image")
        if rate is None:
            print(f"{name:<20} {'-':>7} {'-':>11} {'-':>8} {'-':>11} {'-':>13}  {r['status']}")
            continue
        print(f"{name:<20} {rate:>7.0f} {cpu:>11.2f} {ratio(o, rate):>8} {ratio(g, rate):>11} {ratio(cpu, oc):>13}  {r['status']}")


def print_resume(rows: list[dict]) -> None:
    print(f"\n{'loader':<20} {'workers':>7} {'at':>4} {'batch':>9} {'first batch s':>14} {'cold s':>7} {'pixels':>7}  stream")
    for r in rows:
        print(f"{r['loader']:<20} {r['workers']:>7} {r['at']:>4.0%} {r['batch']:>4}/{r['batches']:<4} "
              f"{r['first_batch_s']:>14.2f} {r['cold_first_batch_s']:>7.2f} {'same' if r['pixels_exact'] else 'other':>7}  {r['stream']}")


def goals(table: dict[int, dict[str, dict]]) -> dict:
    "Ours ahead of every measured peer in each cell (img/s and CPU/img); the generic path at least at each peer's img/s."
    peers = [p for p in ("webdataset", "mosaicml-streaming", "litdata", "ImageFolder")]
    ahead, generic, worst = True, True, {}
    for w, rows in table.items():
        o, g, oc = (rows[k].get(m) for k, m in (("ours", "images_per_s"), ("ours-generic", "images_per_s"), ("ours", "cpu_ms_per_image")))
        for p in peers:
            r = rows.get(p, {})
            if r.get("images_per_s") is None: continue
            ahead &= o > r["images_per_s"] and oc < r["cpu_ms_per_image"]
            generic &= g >= r["images_per_s"]
            worst[f"{w}/{p}"] = {"ours": round(o / r["images_per_s"], 3), "generic": round(g / r["images_per_s"], 3)}
    return {"ours_ahead_of_every_peer": ahead, "generic_at_least_peers": generic, "ratios": worst}


# -- main -----------------------------------------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000, help="photo-like JPEGs (default 3000)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts (default 0 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timed passes per loader and worker count (order flips)")
    p.add_argument("--resume-at", type=float, nargs="+", default=[0.1, 0.9], help="fractions of an epoch")
    p.add_argument("--no-resume", action="store_true", help="throughput only")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for tests (128 images of 250x188, batch 16, 1 round): checks, not speed")
    p.add_argument("--data", help="keep the generated data in this folder and reuse it in later runs")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.size = (500, 375)
    if args.quick:
        args.images, args.batch_size, args.rounds, args.size = 128, 16, 1, (250, 188)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*shardshuffle.*")
    peers = peer_versions()
    info = machine()
    print(f"{info['cpu']} ({', '.join(info['flags']) or 'no avx2/avx512/amx'}), {info['cores']} cores, "
          f"load average {info['load_average'][0]:.2f}; torch {info['torch']}")
    print("peers: " + ", ".join(f"{k} {v}" for k, v in peers.items()))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        corpus = make_corpus(Path(args.data or tmp), args.images, args.size, 90, peers)
        print(f"data: {args.images} JPEGs {args.size[0]}x{args.size[1]} q90, 8 shards "
              f"({sum(os.path.getsize(s) for s in corpus.shards) / 2**20:.1f} MiB), ready in {time.perf_counter() - start:.1f} s; "
              f"mae_transform(224), batch {args.batch_size}, {args.rounds} round(s)")
        buffer = min(500, max(1, args.images // 4))
        all_sides = sides(corpus, args.batch_size, buffer, peers)
        table = {}
        for w in args.workers:
            table[w] = throughput(all_sides, w, args.rounds)
            print_throughput(w, table[w])
        resume = []
        if not args.no_resume:
            for w in args.workers:
                for side in all_sides:
                    if side.resume_make is None or not side.status.startswith("ok"): continue
                    batches = args.images // args.batch_size
                    try: rows = resume_check(side, w, args.resume_at, batches)
                    except Exception as e:
                        if side.name == "ours": raise
                        rows = [{"loader": side.name, "workers": w, "error": f"{type(e).__name__}: {e}"[:300]}]
                        print(f"  {side.name} resume at {w} workers: {rows[0]['error']}", flush=True)
                    resume += rows
            print_resume([r for r in resume if "error" not in r])
    info["load_average_end"] = list(os.getloadavg())
    result = {"machine": info, "peers": peers, "args": {k: v for k, v in vars(args).items()},
              "throughput": {str(w): rows for w, rows in table.items()}, "resume": resume, "goals": goals(table)}
    print(f"\ngoal, ours ahead of every peer (img/s and CPU/img) in each cell: {result['goals']['ours_ahead_of_every_peer']}; "
          f"generic path at least at each peer's img/s: {result['goals']['generic_at_least_peers']}")
    if args.out: Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
