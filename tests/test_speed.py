"""Speed work that must not change behaviour: the loader's fast augmentation path (deterministic, the same draws
and, within a grey level, the same pixels as torchvision's transform), precision and compile choices."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from prepretrain_lit.data import build_shards, encode_image, shapes_source
from prepretrain_lit.loader import (EncodedJpeg, ShardStream, StreamLoader, as_pil, crop_flip_parts, eval_transform,
                                    fast_crop_flip, jpeg_draft_scale, jpeg_header, mae_transform, open_image,
                                    seeded_rng)


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    "A smooth random colour field with grain, as JPEG bytes (photo-like: detail at every scale)."
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32) + rng.normal(0, 5, (height, width, 3))
    return encode_image(np.clip(pixels, 0, 255).astype(np.uint8), "jpg", quality=quality)


def grey_levels(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    "|a - b| of two normalised images, in grey levels of the 0..255 input."
    return ((a - b) * std * 255).abs()


@pytest.mark.parametrize("size,out", [((64, 64), 32), ((500, 375), 224), ((120, 90), 32)])
def test_fast_path_matches_torchvision_within_one_grey_level_without_draft(size, out):
    "Same seed -> same crop and flip as torchvision's transform; pixels differ only by resampling rounding (<= 2 levels)."
    transform, data = mae_transform(out), photo_jpeg(*size, seed=out)
    parts = crop_flip_parts(transform)
    assert parts is not None and isinstance(open_image(data), EncodedJpeg)
    worst_mean = 0.0
    for seed in range(12):
        with seeded_rng(seed): ref = transform(as_pil(open_image(data)))
        image = open_image(data)
        top, left, h, w = _params(transform, image.size, seed)
        if jpeg_draft_scale(w, h, out, out) > 1: continue              # the draft case has its own test
        diff = grey_levels(fast_crop_flip(image, parts, seed), ref, parts[3])
        assert diff.max() <= 2.01, (seed, diff.max())
        worst_mean = max(worst_mean, diff.mean().item())
    assert worst_mean < 0.5


def _params(transform, size, seed):
    with seeded_rng(seed): return transform.transforms[0].get_params(Image.new("RGB", size), (0.2, 1.0), (3 / 4, 4 / 3))


def test_draft_decoding_follows_its_rule_and_stays_close():
    "A crop >= 2s x the output decodes at 1/s; the result stays within ~1-2 grey levels on average of the full decode."
    assert jpeg_draft_scale(400, 300, 32, 32) == 4 and jpeg_draft_scale(63, 63, 32, 32) == 1
    assert jpeg_draft_scale(130, 70, 32, 32) == 1 and jpeg_draft_scale(130, 130, 32, 32) == 2
    transform, data = mae_transform(32), photo_jpeg(500, 375, seed=3)
    parts, means, drafted = crop_flip_parts(transform), [], 0
    for seed in range(12):
        with seeded_rng(seed): ref = transform(as_pil(open_image(data)))
        top, left, h, w = _params(transform, (500, 375), seed)
        drafted += jpeg_draft_scale(w, h, 32, 32) > 1
        means.append(grey_levels(fast_crop_flip(open_image(data), parts, seed), ref, parts[3]).mean().item())
    assert drafted >= 6 and max(means) < 3.0, means


def test_augmentation_is_a_function_of_sample_and_epoch_and_leaves_the_callers_rng_alone(tmp_path):
    "Whichever worker count reads it, a sample in an epoch gets the same tensor; another epoch another; global RNGs untouched."
    manifest = build_shards(shapes_source(48, size=64), tmp_path, shard_size=12, progress=False)
    def images(workers, epoch=0, transform=mae_transform(32)):
        stream = ShardStream(manifest, transform, shuffle_buffer=8)
        stream.set_epoch(epoch)
        return {k: img for b in StreamLoader(stream, 8, num_workers=workers) for k, img in zip(b["key"], b["image"])}
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1); np.random.seed(1); torch.manual_seed(1)
    one = images(0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == before     # the caller's streams did not move
    two = images(2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    other = images(0, epoch=1)
    assert sum(not torch.equal(one[k], other[k]) for k in one) > len(one) // 2


def test_generic_transforms_are_seeded_too_numpy_included():
    "A transform off the fast path (here drawing from numpy, as timm's RandAugment does) repeats under the same seed."
    def draws(image): return (random.random(), float(np.random.rand()), float(torch.rand(1)))
    with seeded_rng(7): a = draws(None)
    with seeded_rng(7): b = draws(None)
    with seeded_rng(8): c = draws(None)
    assert a == b and a != c
    assert crop_flip_parts(eval_transform(32)) is None and crop_flip_parts(lambda x: x) is None


def test_fast_path_takes_the_same_draws_as_the_old_per_sample_seeding():
    "`seeded_rng` (default generator, microseconds) draws as `fork_rng` + `torch.manual_seed` (the old path) did."
    def old(seed):
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed); torch.manual_seed(seed)
            out = (random.random(), torch.rand(3))
        random.setstate(state)
        return out
    for seed in (0, 12345, 2**32 - 1):
        with seeded_rng(seed): new = (random.random(), torch.rand(3))
        assert new[0] == old(seed)[0] and torch.equal(new[1], old(seed)[1])


def test_lazy_jpegs_and_damaged_images():
    "Complete colour JPEGs stay encoded (header read); truncated, grey and PNG images are decoded (and fail) at once."
    data = photo_jpeg(80, 60)
    assert jpeg_header(data) == (80, 60, 3)
    assert isinstance(open_image(data), EncodedJpeg) and open_image(data).size == (80, 60)
    assert np.array_equal(np.asarray(open_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    with pytest.raises(OSError): open_image(data[: len(data) // 2])          # truncated: no end marker, full decode fails
    grey = io.BytesIO(); Image.new("L", (16, 16), 100).save(grey, "JPEG")
    assert open_image(grey.getvalue()).mode == "RGB" and not isinstance(open_image(grey.getvalue()), EncodedJpeg)
