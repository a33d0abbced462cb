"""MAE training-step throughput: the package's Trainer step against a plain PyTorch loop on the same model.

Both run forward, backward and AdamW on identical synthetic batches; the ratio shows what the trainer's
machinery (schedule, accumulation, scaler, NaN bookkeeping) costs. On a GPU it also prints model FLOPs
utilisation: training FLOPs (`mae_throughput.mae_flops`: the visible-token encoder and the full-length decoder)
per second, over the device's peak dense bf16 rate.

    .venv/bin/python benchmarks/train_step_throughput.py                           # CPU: tiny preset
    .venv/bin/python benchmarks/train_step_throughput.py --preset vit_l16 --batch 128 --precision bf16 --compile

Numbers are only comparable within one run on one machine.
"""
import argparse
import tempfile
import time

import torch

from prepretrain_lit.presets import load_config
from prepretrain_lit.distributed import DistInfo
from prepretrain_lit.trainer import SyntheticImages, Trainer
from prepretrain_lit.objectives import mae_objective

# The FLOP count and the peak rates are the ones tests/test_benchmarks.py checks (sys.path holds this folder).
from mae_throughput import mae_flops, peak_tflops


def time_it(step, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup): step()
    if device.type == "cuda": torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters): step()
    if device.type == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: looked up)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16" if cuda else "fp32")
    cfg = load_config(preset=args.preset, overrides=["data.dataset=synthetic", f"data.batch_size={args.batch}",
                                                     f"train.precision={precision}", f"train.compile={args.compile}",
                                                     f"train.device={'cuda' if cuda else 'cpu'}", "train.steps=1000000"])
    device = torch.device("cuda" if cuda else "cpu")
    m = cfg.model
    data = SyntheticImages(args.batch, m.img_size, m.num_patches)
    batch = {k: v.to(device) for k, v in next(data.batches()).items() if k in ("image", "noise")}

    torch.manual_seed(0)
    plain_objective = mae_objective(cfg).to(device)
    plain_model = torch.compile(plain_objective) if args.compile else plain_objective
    opt = torch.optim.AdamW(plain_objective.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)   # the trainer's kernel
    dtype = torch.bfloat16 if precision == "bf16" else None
    def plain_step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = plain_model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, mae_objective(cfg), data, out, DistInfo(device=device), progress=False)
        repeat = iter(lambda: batch, None)
        counter = iter(range(10 ** 9))
        trainer_step = lambda: trainer.train_step(repeat, next(counter))[0]
        t_plain = time_it(plain_step, 3, args.iters, device)
        t_trainer = time_it(trainer_step, 3, args.iters, device)

    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"MAE {args.preset} (img {m.img_size}, patch {m.patch_size}, {m.embed_dim}x{m.depth}, decoder "
          f"{m.decoder_embed_dim}x{m.decoder_depth}), batch {args.batch}, {precision}, compile={args.compile}, {name}")
    print(f"{'':>14} {'images/s':>10}")
    print(f"{'plain loop':>14} {args.batch / t_plain:>10.1f}")
    print(f"{'Trainer':>14} {args.batch / t_trainer:>10.1f}")
    print(f"ratio Trainer / plain loop: {t_plain / t_trainer:.3f}")
    if cuda:
        peak = args.peak_tflops or peak_tflops(name)
        flops = mae_flops(m, cfg.mae.mask_ratio, args.batch).train
        achieved = flops / t_trainer / 1e12
        print(f"model FLOPs: {flops / 1e12:.2f} TFLOP per step, {achieved:.1f} TFLOP/s"
              + (f", MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else " (pass --peak-tflops for MFU)"))


if __name__ == "__main__":
    main()
