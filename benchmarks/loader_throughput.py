"""Data-loader throughput: webdataset shards (this package) against torchvision ImageFolder + DataLoader.

Both read the same JPEG bytes (the shards hold byte for byte the files of the ImageFolder) and apply the same
MAE transform object (`mae_transform`: RandomResizedCrop 0.2-1 bicubic + flip + normalise), with the same batch
size and number of loader workers. Two image sets:

- `shapes`: the built-in 64 px renders (JPEG q95), cropped to `--img-size` (32) px: per-sample overhead;
- `photos`: ~500x375 JPEG q90 photo-like images (a shapes render upscaled, with film grain and a texture,
  generated here, no downloads), cropped to `--photo-size` (224, MAE's) px: decoding and resampling.

For each set and worker count the two loaders alternate A B B A ... (`--rounds` pairs; each pass is one full
epoch, worker start-up included), and the table gives images/s at the median pass and the ratio of medians, and
the CPU time per image (main process and loader workers together, the median pass), which a busy shared machine
distorts less than wall time. Ours is the real `StreamLoader` path: per-sample deterministic augmentation (seeded
by run seed, epoch, key), shuffle buffer, skip counting, exact-resume positions; the peer shuffles with its
sampler and does not reseed. Both run the same `DataLoader` settings: batch size, workers, `drop_last`, no
pinning, default prefetch (2 batches a worker), no persistent workers. `--generic` adds our loader with the
fast path disabled (the transform wrapped in a lambda, so it runs as any other transform does). Run from the
repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_throughput.py --workers 0 2 --rounds 3 --generic
    # the images kept (and reused by a second run, e.g. of an older checkout through PYTHONPATH):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_throughput.py --rounds 5 --data /tmp/loader_bench

Numbers are only comparable within one run on one machine (shared machines are noisy).
"""
import argparse
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from prepretrain_lit.render import SHAPES, SHAPES_HASHTAGS, render_shapes
from prepretrain_lit.data import Source, build_shards, encode_image, shapes_source
from prepretrain_lit.loader import ShardStream, StreamLoader
from prepretrain_lit.decode import mae_transform


def photo_like(seed: int, i: int, size=(500, 375)) -> tuple[np.ndarray, dict]:
    "A ~500x375 photo-like image: shapes render `i` upscaled, plus a smooth texture and film grain (seeded by i)."
    image, meta = render_shapes(seed, i, size=64)
    big = np.asarray(Image.fromarray(np.asarray(image)).resize(size, Image.BICUBIC), dtype=np.float32)
    rng = np.random.default_rng([seed, i])
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    fx, fy, phase = rng.uniform(0.02, 0.2, 2).tolist() + [rng.uniform(0, 6.3)]
    texture = 18 * np.sin(fx * xx + phase) * np.cos(fy * yy)
    low = Image.fromarray(rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = 0.75 * big + 0.25 * np.asarray(low, dtype=np.float32) + texture[..., None] + rng.normal(0, 6, big.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), meta


def photos_source(n: int, seed: int = 0) -> Source:
    return Source("photos", n, partial(photo_like, seed), list(SHAPES), list(SHAPES_HASHTAGS))


def write_imagefolder(source: Source, root: Path, quality: int) -> None:
    "The same images, byte for byte the JPEGs inside the shards, as files under root/<class>/<key>.jpg."
    for i in range(source.n):
        image, meta = source.sample(i)
        folder = root / meta["label_name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:09d}.jpg").write_bytes(encode_image(image, "jpg", quality=quality))


def cpu_seconds() -> float:
    "CPU time of this process and of its finished children (loader workers are joined at the end of a pass)."
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def one_pass(loader, n_images: int) -> tuple[float, float]:
    """One full pass over `loader`: (images per second, CPU milliseconds per image, main process and workers
    together). Worker start-up is included, as a training epoch pays it."""
    start, cpu = time.perf_counter(), cpu_seconds()
    seen = sum(len(b["image"] if isinstance(b, dict) else b[0]) for b in loader)
    assert seen >= 0.8 * n_images, (seen, n_images)
    return seen / (time.perf_counter() - start), 1e3 * (cpu_seconds() - cpu) / seen


def compare(name: str, source: Source, quality: int, img_size: int, args, tmp: Path) -> None:
    # 8 shards: with the default counts every worker's share is whole batches (a stream worker drops its own partial
    # last batch after transforming it, which a map-style sampler never loads: counts that do not divide cost us)
    where = tmp / f"{name}-{source.n}-q{quality}"
    manifest = where / "shards" / f"{name}.yaml"
    if not (where / "done").exists():                   # with --data, built once and reused by later runs
        manifest = build_shards(source, where / "shards", shard_size=-(-source.n // 8), fmt="jpg", quality=quality,
                                workers=1, progress=False)
        write_imagefolder(source, where / "folder", quality)
        (where / "done").touch()
    transform = mae_transform(img_size)
    side = Image.open(next((where / "folder").rglob("*.jpg"))).size
    print(f"\n{name}: {source.n} images {side[0]}x{side[1]} JPEG q{quality}, MAE transform to {img_size} px, "
          f"batch {args.batch_size}, {args.rounds} A B B A rounds")
    head = f"{'workers':>8} {'shards img/s':>13} {'ImageFolder img/s':>18} {'ratio':>7} {'CPU ms/img ours, peer':>22} {'ratio':>6}"
    print(head + (f" {'generic img/s':>14} {'ratio':>6}" if args.generic else ""))
    for workers in args.workers:
        def ours(t=transform):
            stream = ShardStream(manifest, t, shuffle_buffer=min(500, source.n // 4))
            return StreamLoader(stream, args.batch_size, num_workers=workers)
        def peer():
            folder = torchvision.datasets.ImageFolder(str(where / "folder"), transform)
            return torch.utils.data.DataLoader(folder, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                               drop_last=True)
        makers = {"ours": ours, "peer": peer}
        if args.generic: makers["generic"] = partial(ours, lambda image: transform(image))
        rates, cpus = {k: [] for k in makers}, {k: [] for k in makers}
        for r in range(args.rounds):
            order = list(makers) if r % 2 == 0 else list(makers)[::-1]
            for k in order:
                rate, cpu = one_pass(makers[k](), source.n)
                rates[k].append(rate); cpus[k].append(cpu)
        med = {k: statistics.median(v) for k, v in rates.items()}
        cpu = {k: statistics.median(v) for k, v in cpus.items()}
        line = (f"{workers:>8} {med['ours']:>13.0f} {med['peer']:>18.0f} {med['ours'] / med['peer']:>6.2f}x "
                f"{cpu['ours']:>11.2f}, {cpu['peer']:>8.2f} {cpu['peer'] / cpu['ours']:>5.2f}x")
        if args.generic: line += f" {med['generic']:>14.0f} {med['generic'] / med['peer']:>5.2f}x"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="64 px shapes images")
    parser.add_argument("--photos", type=int, default=640, help="~500x375 photo-like images (0: skip)")
    parser.add_argument("--img-size", type=int, default=32, help="the model's input size for the shapes images")
    parser.add_argument("--photo-size", type=int, default=224, help="the model's input size for the photos")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=2, help="A B pairs per worker count (order flips each round)")
    parser.add_argument("--generic", action="store_true", help="also time our loader without its fast path")
    parser.add_argument("--data", help="keep the generated images in this folder and reuse them in later runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if args.images: compare("shapes", shapes_source(args.images, seed=0, size=64), 95, args.img_size, args, root)
        if args.photos: compare("photos", photos_source(args.photos), 90, args.photo_size, args, root)


if __name__ == "__main__":
    main()
