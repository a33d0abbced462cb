"""`torch.compile` per block (what the trainer does, `parallelize`) against the whole objective compiled and eager:
compile seconds apart from step time, on one process.

Each variant runs in a fresh child process with inductor's on-disk caches off (every compile is a cold one, as on a
new machine): a MAE from a preset, one synthetic batch, AdamW, `--steps` steps. Compile seconds are torch's own count
(`prepretrain_lit.distributed.compile_seconds`: dynamo, AOTAutograd and the backend, forward and backward); the first
step's wall time includes them; the step time is the median of the steps after the first.

    .venv/bin/python benchmarks/compile_blocks.py                                  # tiny MAE, batch 32, inductor, CPU
    .venv/bin/python benchmarks/compile_blocks.py --preset vit_s16 --batch 8 --checkpointing selective
    .venv/bin/python benchmarks/compile_blocks.py --backend aot_eager --steps 2    # seconds: the graphs, no codegen

Numbers are only comparable within one run on one machine.
"""
import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("eager", "whole", "blocks")


def measure(variant: str, args) -> dict:
    "Train `args.steps` steps of the `variant` in this process; compile and step seconds."
    import torch
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.distributed import DistInfo, compile_seconds, parallelize
    from prepretrain_lit.trainer import SyntheticImages
    from prepretrain_lit.optim import build_optimizer
    from prepretrain_lit.objectives import mae_objective
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(preset=args.preset, overrides=["data.dataset=synthetic", f"data.batch_size={args.batch}"])
    m = cfg.model
    batch = {k: v.to(device) for k, v in next(SyntheticImages(args.batch, m.img_size, m.num_patches).batches(0)).items()}
    torch.manual_seed(0)
    objective = mae_objective(cfg).to(device)
    model = parallelize(objective, DistInfo(device=device), checkpointing=args.checkpointing,
                        compile=variant == "blocks", backend=args.backend)
    if variant == "whole": model = torch.compile(model, backend=args.backend)
    optimizer = build_optimizer(objective, cfg, 1e-4, device)
    times, losses = [], []
    for _ in range(args.steps):
        tic = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - tic)
    later = sorted(times[1:]) or times
    return {"variant": variant, "compile_s": compile_seconds(), "first_step_s": times[0],
            "step_s": later[len(later) // 2], "losses": losses}


def child(variant: str, args) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    cmd = [sys.executable, __file__, "--child", variant, "--preset", args.preset, "--batch", str(args.batch),
           "--steps", str(args.steps), "--backend", args.backend, "--checkpointing", args.checkpointing,
           "--threads", str(args.threads), "--device", args.device]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0: raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--checkpointing", choices=("none", "full", "selective"), default="none")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="a subset of eager,whole,blocks")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return []
    rows = [child(v, args) for v in args.variants.split(",")]
    print(f"MAE {args.preset}, batch {args.batch}, {args.steps} steps, backend {args.backend}, checkpointing "
          f"{args.checkpointing}, {args.threads} thread(s) on {args.device}; inductor caches off")
    print(f"{'variant':>8} {'compile s':>10} {'first step s':>13} {'step s':>8} {'images/s':>9}  losses")
    for r in rows:
        print(f"{r['variant']:>8} {r['compile_s']:>10.1f} {r['first_step_s']:>13.2f} {r['step_s']:>8.3f} "
              f"{args.batch / r['step_s']:>9.1f}  {', '.join(f'{x:.4f}' for x in r['losses'][:3])}")
    if args.json:
        with open(args.json, "w") as f: json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
