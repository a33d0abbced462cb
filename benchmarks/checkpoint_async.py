"""Checkpoint blocking time: the training loop's wait per checkpoint, synchronous save against asynchronous save.

The model is the MAE of a preset (default ViT-L/16 with its decoder) with AdamW's state filled (one step on zero
gradients: `exp_avg` and `exp_avg_sq` exist, as after any step), inside the package's `Trainer`, whose real `save`
is timed: generators, data position, schedule, then the checkpoint of model + optimizer. Synchronous
(`train.async_checkpoint=false`): the loop waits for `save_file_atomic` (serialise, SHA-256, fsync, rename, prune).
Asynchronous: the save call copies the buffers and plain values; the background thread copies the parameters and
AdamW's moments into reused CPU buffers, then writes; the next training step (timed right after, a real forward,
backward and AdamW step) runs beside it, its optimizer waiting for the copy if the copy is not done. The loop's
blocking is the save call plus that wait (`CheckpointWriter.held_s`); the write left after the step is timed apart
(`background s`), as are the step alone and the step beside the copy and write (they share the CPU here; on a GPU
node the step runs on the GPU). The first asynchronous save allocates the staging buffers (`cold`); later ones
reuse them (`warm`, what every save but the first of a run costs). The writer is idle before each save, as in a run
whose checkpoint interval is longer than a write. Goal (issue 35): warm blocking <= 10% of the synchronous save.

    .venv/bin/python benchmarks/checkpoint_async.py                       # CPU: ViT-L/16 MAE + AdamW, ~4 GB a checkpoint
    .venv/bin/python benchmarks/checkpoint_async.py --preset tiny --rounds 2    # seconds (the test's smoke run)
    .venv/bin/python benchmarks/checkpoint_async.py --dir /scratch/ckpt --json out/checkpoint_async.json

Numbers are only comparable within one run on one machine (the disk and its page cache matter: `--dir`).
"""
import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prepretrain_lit.checkpoint import CheckpointWriter, checkpoint_path
from prepretrain_lit.presets import load_config
from prepretrain_lit.trainer import SyntheticImages, Trainer
from prepretrain_lit.objectives import mae_objective


def cpu_name() -> str:
    "The CPU's model name (lscpu's), for the record."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or "unknown CPU"


def build_trainer(preset: str, out: Path, batch: int = 1, device: str = "cpu") -> Trainer:
    "A `Trainer` of `preset`'s MAE on `device` (fp32 weights) whose AdamW state exists (one step on zero gradients)."
    precision = "bf16" if device == "cuda" else "fp32"             # autocast; the weights and moments stay fp32
    cfg = load_config(preset=preset, overrides=["data.dataset=synthetic", f"data.batch_size={batch}", f"train.device={device}",
                                                f"train.precision={precision}", "train.compile=false", "train.steps=1000000",
                                                "train.keep_checkpoints=1"])
    torch.manual_seed(0)
    objective = mae_objective(cfg)
    m = cfg.model
    trainer = Trainer(cfg, objective, SyntheticImages(batch, m.img_size, m.num_patches), out, progress=False)
    for p in objective.parameters():
        if p.requires_grad: p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer


def timed(fn) -> float:
    "Seconds `fn` takes, the GPU's queued work included."
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized(): torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(trainer: Trainer, rounds: int) -> dict:
    """Seconds per checkpoint: synchronous saves, then asynchronous ones, each followed by a training step (forward,
    backward, AdamW) that overlaps the background copy; the loop's blocking is the save call plus the wait of that
    step's optimizer for the copy (`CheckpointWriter.held_s`)."""
    counters, step, batches = {"seen": 0, "skipped": 0}, 0, trainer.data.batches(0)
    def save():
        nonlocal step
        step += 1
        trainer.save(step, counters)
    train_step = lambda: trainer.train_step(batches, step)
    train_step()                                 # the first step allocates the gradients: untimed
    alone = [timed(train_step) for _ in range(2)]
    trainer.writer = CheckpointWriter(asynchronous=False)
    sync = [timed(save) for _ in range(rounds)]
    trainer.writer = writer = CheckpointWriter(True, trainer.optimizer, trainer.objective)
    calls, held, steps, background = [], [], [], []
    for _ in range(rounds + 1):                  # the first one is cold (buffers allocated), the rest warm
        before = writer.held_s
        calls.append(timed(save))
        steps.append(timed(train_step))
        held.append(writer.held_s - before)
        background.append(timed(writer.wait))    # the write left after that step
    blocking = [c + h for c, h in zip(calls, held)]
    path = checkpoint_path(trainer.ckpt_dir, step)
    return {"sync_s": sync, "async_cold_s": blocking[0], "async_warm_s": blocking[1:], "call_s": calls, "held_s": held,
            "background_s": background, "step_alone_s": alone, "step_during_s": steps, "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_l16", help="model preset (tiny: a smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="timed saves of each kind")
    parser.add_argument("--batch", type=int, default=1, help="images per training step (the step the copy overlaps)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures there as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model trains (cuda: bf16 autocast; the staging copy goes GPU -> CPU)")
    args = parser.parse_args(argv)
    row = run(args.preset, args.rounds, args.batch, args.dir, args.device)
    report(row)
    if args.json: args.json.write_text(json.dumps(row, indent=1) + "\n")
    return row


def run(preset: str, rounds: int, batch: int = 1, folder: Path | None = None, device: str = "cpu") -> dict:
    "The figures of `measure` for `preset`'s MAE on `device`, as one row (medians; `goal_met`: warm <= 10% of sync)."
    with tempfile.TemporaryDirectory(dir=folder) as d:
        trainer = build_trainer(preset, Path(d), batch, device)
        params = sum(p.numel() for p in trainer.objective.parameters())
        r = measure(trainer, rounds)
    sync, warm = statistics.median(r["sync_s"]), statistics.median(r["async_warm_s"])
    return {"preset": preset, "device": device, "parameters": params, "checkpoint_gb": r["bytes"] / 1e9, "sync_s": sync,
           "async_blocking_warm_s": warm, "async_blocking_cold_s": r["async_cold_s"],
           "async_background_s": statistics.median(r["background_s"]), "blocking_share": warm / sync,
           "save_call_s": statistics.median(r["call_s"][1:]), "step_held_s": statistics.median(r["held_s"][1:]),
           "train_step_s": statistics.median(r["step_alone_s"]), "train_step_during_write_s": statistics.median(r["step_during_s"][1:]),
           "goal_met": warm <= 0.10 * sync, "cpu": cpu_name(), "threads": torch.get_num_threads(), "rounds": rounds,
           "async_cold_background_s": r["background_s"][0], "parameters_m": params / 1e6}


def report(row: dict) -> None:
    "The row as the table this script prints."
    sync, warm = row["sync_s"], row["async_blocking_warm_s"]
    print(f"{row['preset']} MAE + AdamW on {row['device']}: {row['parameters_m']:.0f}M parameters, "
          f"{row['checkpoint_gb']:.2f} GB a checkpoint, {row['cpu']}, {row['threads']} threads, median of {row['rounds']}")
    print(f"{'save':<28}{'loop blocked s':>16}{'background s':>15}")
    print(f"{'synchronous':<28}{sync:>16.3f}{'-':>15}")
    print(f"{'asynchronous, cold (first)':<28}{row['async_blocking_cold_s']:>16.3f}{row['async_cold_background_s']:>15.3f}")
    print(f"{'asynchronous, warm':<28}{warm:>16.3f}{row['async_background_s']:>15.3f}")
    print(f"warm blocking = save call {row['save_call_s']:.3f} s + next optimizer step's wait for the copy "
          f"{row['step_held_s']:.3f} s; a training step takes {row['train_step_s']:.2f} s alone, "
          f"{row['train_step_during_write_s']:.2f} s while the copy and write run beside it")
    print(f"blocking: {100 * row['blocking_share']:.1f}% of the synchronous save (goal <= 10%: "
          f"{'met' if row['goal_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
