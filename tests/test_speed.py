"""Speed work that must not change behaviour: the loader's fast augmentation path (deterministic, the same draws
and, within a grey level, the same pixels as torchvision's transform), precision and compile choices."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from prepretrain_lit.data import build_shards, encode_image, shapes_source
from prepretrain_lit.decode import (EncodedJpeg, as_pil, crop_flip_draws, crop_flip_parts, eval_transform,
                                    fast_crop_flip, jpeg_draft_scale, jpeg_header, mae_transform, open_image,
                                    seeded_rng)
from prepretrain_lit.loader import ShardStream, StreamLoader, collate_samples, pack_batch, unpack_batch


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



def draws_of_every_generator(image) -> torch.Tensor:
    "A transform off the fast path that draws from Python's, numpy's and torch's global generators."
    return torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(1))])


def test_a_generic_transform_is_seeded_alike_in_workers_that_skip_restoring_and_in_the_main_process(tmp_path):
    """Workers seed without saving and restoring the global generators (numpy's state costs ~0.2-0.4 ms each way);
    every sample still gets the same draws as in the main process, which restores the caller's streams."""
    manifest = build_shards(shapes_source(40, size=16), tmp_path, shard_size=10, progress=False)
    def draws(workers):
        stream = ShardStream(manifest, draws_of_every_generator, shuffle_buffer=8)
        return {k: d for b in StreamLoader(stream, 5, num_workers=workers) for k, d in zip(b["key"], b["image"])}
    random.seed(2); np.random.seed(2); torch.manual_seed(2)
    before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2); np.random.seed(2); torch.manual_seed(2)
    main = draws(0)
    assert (random.random(), np.random.rand(), torch.rand(1)) == before
    workers = draws(2)
    assert main.keys() == workers.keys() and len(main) == 40
    assert all(torch.equal(main[k], workers[k]) for k in main)
    assert len({tuple(d.tolist()) for d in main.values()}) == 40           # a seed per sample, not one per run
    with seeded_rng(5, restore=False): first = draws_of_every_generator(None)
    with seeded_rng(5): assert torch.equal(draws_of_every_generator(None), first)

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


@pytest.mark.parametrize("out", [32, 224])
def test_crop_flip_draws_are_torchvisions_exactly(out):
    "The private-generator draws equal `RandomResizedCrop.get_params` + the flip's `torch.rand(1)` on the seeded global one."
    parts = crop_flip_parts(mae_transform(out))
    for width, height in [(64, 64), (500, 375), (37, 500), (1000, 10)]:      # the last two hit the central-crop fallback
        for seed in range(300):
            seed = seed * 2654435761 % 2 ** 32
            with seeded_rng(seed, python_numpy=False):
                crop = parts.crop.get_params(Image.new("RGB", (width, height)), parts.crop.scale, parts.crop.ratio)
                expected = (*crop, bool(torch.rand(1) < parts.flip_p))
            assert crop_flip_draws(parts, width, height, seed) == expected, (width, height, seed)


def test_a_batch_crosses_from_a_worker_as_two_tensors_the_images_already_in_shared_memory(tmp_path):
    """What the loader's collate function hands to the worker's queue: two tensors whatever the fields (each costs
    the main process a segment and a file descriptor), the images allocated in shared memory in the worker (no
    copy when handed over); unpacked, the same batch as `collate_samples` of the same items."""
    manifest = build_shards(shapes_source(40, size=32), tmp_path, shard_size=20, progress=False)
    stream = ShardStream(manifest, mae_transform(16), shuffle_buffer=8)
    items = list(stream)[:10]
    loader = StreamLoader(stream, 10)
    packed = loader.loader.collate_fn(items)
    assert sum(isinstance(v, torch.Tensor) for v in packed) == 2
    batch, reference = unpack_batch(packed), collate_samples(items)
    assert batch.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(batch[name], value) if isinstance(value, torch.Tensor) else batch[name] == value, name
    assert batch["hashtags"].shape[1] == max(len(i["hashtags"]) for i in items) and (batch["hashtags"] >= -1).all()
    in_worker = torch.utils.data.DataLoader(items, batch_size=5, num_workers=1,
                                            collate_fn=lambda b: torch.tensor([t.is_shared() for t in pack_batch(b)[:2]]))
    assert all(flags.all() for flags in in_worker)
    assert not any(t.is_shared() for t in pack_batch(items)[:2])          # in the main process: plain memory

def test_lazy_jpegs_and_damaged_images():
    "Complete colour JPEGs stay encoded (header read); truncated, grey and PNG images are decoded (and fail) at once."
    data = photo_jpeg(80, 60)
    assert jpeg_header(data) == (80, 60, 3)
    assert isinstance(open_image(data), EncodedJpeg) and open_image(data).size == (80, 60)
    assert np.array_equal(np.asarray(open_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    with pytest.raises(OSError): open_image(data[: len(data) // 2])          # truncated: no end marker, full decode fails
    grey = io.BytesIO(); Image.new("L", (16, 16), 100).save(grey, "JPEG")
    assert open_image(grey.getvalue()).mode == "RGB" and not isinstance(open_image(grey.getvalue()), EncodedJpeg)


# -- precision and compilation ---------------------------------------------------------------------------------
from prepretrain_lit import trainer as trainer_module
from prepretrain_lit.presets import load_config
from prepretrain_lit.trainer import SyntheticImages, Trainer, resolve_compile, resolve_precision
from prepretrain_lit.objectives import mae_objective
from tiny_runs import TINY


def test_auto_precision_and_compile_follow_the_hardware(monkeypatch):
    "auto: bf16 on a bf16 GPU or a native-bf16 CPU, fp32 on other CPUs; compile on CUDA only; explicit values kept."
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_compile("auto", "cuda") is True and resolve_compile("auto", "cpu") is False
    assert resolve_compile(True, "cpu") is True and resolve_compile(False, "cuda") is False
    assert load_config(preset="vit_b16").train.precision == "auto"


def mae_losses(tmp_path, steps: int, *overrides: str) -> tuple[list[float], Trainer]:
    "Losses of `steps` MAE train steps of a tiny model from the same initial weights and data."
    cfg = load_config(preset="tiny", overrides=[*TINY, f"train.steps={steps}", *overrides])
    torch.manual_seed(0)
    trainer = Trainer(cfg, mae_objective(cfg), SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    batches = trainer.data.batches(0)
    return [trainer.train_step(batches, step)[0].item() for step in range(steps)], trainer


def test_bf16_and_fp32_loss_curves_agree(tmp_path, monkeypatch, capsys):
    "Over 6 steps the bf16-autocast MAE loss stays within 3% of fp32's (bf16 keeps 8 bits of mantissa: ~0.4% per op)."
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: True)        # auto picks bf16 (emulated on this CPU)
    bf16, trainer = mae_losses(tmp_path / "bf16", 6, "train.precision=auto")
    assert trainer.precision == "bf16" and trainer.autocast_dtype is torch.bfloat16
    assert "precision bf16 (train.precision=auto)" in capsys.readouterr().out
    fp32, _ = mae_losses(tmp_path / "fp32", 6, "train.precision=fp32")
    assert fp32[-1] < fp32[0]                                                 # it trains
    for a, b in zip(bf16, fp32): assert abs(a - b) <= 0.03 * abs(b), (bf16, fp32)
    assert bf16 != fp32                                                       # bf16 really ran


def test_the_resolved_choice_is_recorded_in_provenance(tmp_path, monkeypatch):
    from prepretrain_lit.config import write_provenance
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: False)
    cfg = load_config(preset="tiny", overrides=[*TINY, "train.precision=auto", "train.compile=auto"])
    tmp_path.mkdir(exist_ok=True)
    write_provenance(tmp_path, cfg)
    Trainer(cfg, mae_objective(cfg), SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    import json
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["resolved"] == {"precision": "fp32", "compile": False, "attention": "fused"}
    assert record["config"]["train"]["precision"] == "auto"


def attention_flags(trainer: Trainer) -> set[bool]:
    "The `fused_attn` switches of every attention module the trainer trains (trunk and MAE decoder)."
    return {m.fused_attn for m in trainer.objective.modules() if isinstance(getattr(m, "fused_attn", None), bool)}


def test_auto_attention_is_the_textbook_kernel_on_a_cpu_under_bf16_only(tmp_path, monkeypatch, capsys):
    "train.attention=auto: math (two bf16 matmuls) on a CPU under bf16, fused SDPA in fp32; an explicit choice is kept."
    monkeypatch.setattr(trainer_module, "cpu_has_bf16", lambda: True)
    _, bf16 = mae_losses(tmp_path / "bf16", 1, "train.precision=auto")
    assert bf16.attention == "math" and attention_flags(bf16) == {False}
    assert "attention math (train.attention=auto)" in capsys.readouterr().out
    _, fp32 = mae_losses(tmp_path / "fp32", 1, "train.precision=fp32")
    assert fp32.attention == "fused" and attention_flags(fp32) == {True}
    _, forced = mae_losses(tmp_path / "forced", 1, "train.precision=bf16", "train.attention=fused")
    assert forced.attention == "fused" and attention_flags(forced) == {True}
    assert len([m for m in bf16.objective.modules() if hasattr(m, "fused_attn")]) == 3   # 2 trunk + 1 decoder blocks


def test_the_two_attention_kernels_train_alike_and_are_not_part_of_a_runs_identity(tmp_path):
    "The textbook and fused kernels compute the same function: fp32 MAE losses agree to rounding over 3 steps."
    from prepretrain_lit.presets import config_hash
    fused, a = mae_losses(tmp_path / "fused", 3, "train.precision=fp32", "train.attention=fused")
    math, b = mae_losses(tmp_path / "math", 3, "train.precision=fp32", "train.attention=math")
    assert (a.attention, b.attention) == ("fused", "math")
    for x, y in zip(math, fused): assert abs(x - y) <= 1e-4 * abs(y), (math, fused)
    assert config_hash(a.cfg) == config_hash(b.cfg)          # a requeued job may change kernels and still resume


@pytest.mark.slow
def test_compiled_and_eager_give_the_same_loss(tmp_path):
    "torch.compile (inductor, on CPU here) changes kernels, not the maths: the losses agree to float rounding."
    eager, _ = mae_losses(tmp_path / "eager", 3, "train.precision=fp32", "train.compile=false")
    compiled, trainer = mae_losses(tmp_path / "compiled", 3, "train.precision=fp32", "train.compile=true")
    assert trainer.compile
    for a, b in zip(compiled, eager): assert abs(a - b) <= 1e-4 * abs(b), (compiled, eager)


def test_the_first_step_is_timed_apart_from_the_throughput(tmp_path, monkeypatch):
    "The first step (with train.compile: the compilation) is logged as first_step_s, kept out of images_per_s, and recorded in provenance."
    import json
    import time
    from prepretrain_lit.config import write_provenance
    cfg = load_config(preset="tiny", overrides=[*TINY, "train.steps=4", "train.log_every=4", "train.checkpoint_every=100",
                                                "train.precision=fp32", "train.compile=false"])
    write_provenance(tmp_path, cfg)
    trainer = Trainer(cfg, mae_objective(cfg), SyntheticImages(cfg.data.batch_size, 32, 64), tmp_path, progress=False)
    clock, real = [0.0], trainer.train_step      # a clock that moves only with the steps: 10 s for the first, 0.5 s after
    def timed_step(batches, step):
        out = real(batches, step)
        clock[0] += 10.0 if step == 0 else 0.5
        return out
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(trainer, "train_step", timed_step)
    trainer.fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["step"] == 4 and line["first_step_s"] == 10.0
    assert line["images_per_s"] == pytest.approx(3 * cfg.data.batch_size / 1.5)   # not 4 batches / 11.5 s
    assert json.loads((tmp_path / "provenance.json").read_text())["resolved"]["first_step_s"] == 10.0
