"""Activation memory of `train.activation_checkpointing` none / full / selective, on a ViT-L-shaped stack on the CPU.

A stack of timm blocks at ViT-L/16's width (1024, 16 heads, MLP ratio 4) over 197 tokens (224 px) runs forward and
backward once per mode, each mode in a fresh child process. The child measures its resident memory (RSS, Linux's
`/proc/self/status`) with glibc told to return every freed block of 64 KiB or more to the system
(`MALLOC_MMAP_THRESHOLD_`), so that RSS follows the live tensors: after the weights, their gradients and the input
exist and one step has run (the baseline); right after forward (what the stack keeps for backward); and its peak over forward and
backward (`VmHWM`, reset at the baseline through `/proc/self/clear_refs`). The step time shows what recomputation
costs. The blocks checkpoint themselves as the trainer's do (`prepretrain_lit.vit.checkpoint_block`).

    .venv/bin/python benchmarks/activation_memory.py                    # 4 ViT-L blocks, batch 8, fp32
    .venv/bin/python benchmarks/activation_memory.py --blocks 2 --batch 4
    .venv/bin/python benchmarks/activation_memory.py --tiny             # seconds: what tests/test_benchmarks.py runs

Numbers are only comparable within one run on one machine.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

MODES = ("none", "full", "selective")


def rss_mib(field: str = "VmRSS") -> float:
    "This process's resident memory (`VmRSS`) or its peak since the last reset (`VmHWM`), in MiB."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"): return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    "Make `VmHWM` start again from the current RSS (Linux 4.0+)."
    with open("/proc/self/clear_refs", "w") as f: f.write("5")


def measure(mode: str, width: int, heads: int, tokens: int, blocks: int, batch: int, threads: int) -> dict:
    "One forward and backward of the stack in `mode`, in this process: memory above the baseline and seconds."
    import torch
    import torch.nn as nn
    from timm.models.vision_transformer import Block
    from prepretrain_lit.vit import LayerNorm6, checkpoint_block
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stack = nn.Sequential(*[checkpoint_block(Block(width, heads, 4.0, qkv_bias=True, norm_layer=LayerNorm6), mode)
                            for _ in range(blocks)])
    for p in stack.parameters(): p.grad = torch.zeros_like(p)          # gradients exist before: not counted
    x = torch.randn(batch, tokens, width, requires_grad=True)
    stack(x).square().mean().backward()                                 # once first: kernels and libraries set up
    x.grad = None
    base = rss_mib()
    reset_peak()
    tic = time.perf_counter()
    y = stack(x)
    kept = rss_mib() - base
    y.square().mean().backward()
    seconds = time.perf_counter() - tic
    return {"mode": mode, "kept_mib": kept, "peak_mib": rss_mib("VmHWM") - base, "seconds": seconds,
            "weights_mib": sum(p.numel() for p in stack.parameters()) * 4 / 2 ** 20}


def child(mode: str, args) -> dict:
    "`measure` in a fresh process (its own allocator and peak), with glibc returning freed blocks at once."
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--child", mode, "--width", str(args.width), "--heads", str(args.heads),
           "--tokens", str(args.tokens), "--blocks", str(args.blocks), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration): return platform.processor() or platform.machine()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=197, help="1 + (224 / 16)^2")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="width 64, 4 heads, 17 tokens, 2 blocks, batch 2")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny: args.width, args.heads, args.tokens, args.blocks, args.batch = 64, 4, 17, 2, 2
    if args.child:
        print(json.dumps(measure(args.child, args.width, args.heads, args.tokens, args.blocks, args.batch, args.threads)))
        return []
    rows = [child(mode, args) for mode in MODES]
    none = rows[0]
    print(f"{args.blocks} blocks of width {args.width} ({args.heads} heads, MLP 4x), {args.tokens} tokens, batch "
          f"{args.batch}, fp32, {args.threads} thread(s), {cpu_name()}; weights {none['weights_mib']:.0f} MiB")
    print(f"{'mode':>10} {'kept after forward':>19} {'peak fwd+bwd':>13} {'vs none':>8} {'fwd+bwd s':>10}")
    for r in rows:
        print(f"{r['mode']:>10} {r['kept_mib']:>15.1f} MiB {r['peak_mib']:>9.1f} MiB {r['peak_mib'] / max(none['peak_mib'], 1e-9):>8.2f} "
              f"{r['seconds']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f: json.dump({"cpu": cpu_name(), "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
