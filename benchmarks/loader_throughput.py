"""Data-loader throughput: webdataset shards (this package) against torchvision ImageFolder + DataLoader.

Both read the same `shapes` images (JPEG, 64 px) and apply the same MAE transform
(RandomResizedCrop 0.2-1 bicubic + flip + normalise); the script prints images/s for each and the ratio,
per number of loader workers. Run from the repository root:

    .venv/bin/python benchmarks/loader_throughput.py --images 4000 --workers 0 1 2

Numbers are only comparable within one run on one machine (shared machines are noisy).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from prepretrain_lit.data import build_shards, encode_image, shapes_source
from prepretrain_lit.loader import ShardStream, StreamLoader, mae_transform


def write_imagefolder(source, root: Path) -> None:
    "The same images, byte for byte the JPEGs inside the shards, as files under root/<class>/<key>.jpg."
    for i in range(source.n):
        image, meta = source.sample(i)
        folder = root / meta["label_name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:09d}.jpg").write_bytes(encode_image(image, "jpg", quality=95))


def images_per_second(batches, n_images: int) -> float:
    start = time.perf_counter()
    seen = sum(len(b["image"] if isinstance(b, dict) else b[0]) for b in batches)
    assert seen >= 0.9 * n_images, (seen, n_images)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--img-size", type=int, default=32, help="the model's input size after the crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    transform = mae_transform(args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        source = shapes_source(args.images, seed=0, size=64)
        manifest = build_shards(source, Path(tmp) / "shards", shard_size=250, fmt="jpg", workers=2, progress=False)
        write_imagefolder(source, Path(tmp) / "folder")
        print(f"{args.images} shapes images, 64 px JPEG, MAE transform to {args.img_size} px, batch {args.batch_size}")
        print(f"{'workers':>8} {'shards img/s':>14} {'ImageFolder img/s':>18} {'ratio':>7}")
        for workers in args.workers:
            ours = StreamLoader(ShardStream(manifest, transform, shuffle_buffer=500), args.batch_size, num_workers=workers)
            peer = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(Path(tmp) / "folder"), transform),
                                               batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True)
            a = images_per_second(iter(ours), args.images)
            b = images_per_second(iter(peer), args.images)
            print(f"{workers:>8} {a:>14.0f} {b:>18.0f} {a / b:>7.2f}")


if __name__ == "__main__":
    main()
