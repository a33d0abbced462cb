"""The online k-NN monitor's cost (`eval.monitor`, nbs/05c_knn.ipynb): a demo-size pretraining run with it on against
the same run with it off.

The runs are the demo's pretraining stages as `experiments/demo.yaml` configures them (the `tiny` preset, one thread,
MAE 150 steps on 2,000 built `shapes` images; WSP 300 steps at lr 2e-3 with the light crop), through the stage's own
config (`kind_config`) and the package's `train`. The monitor runs at step 0, every `--every` steps and at the last
step on a built labelled set (`--monitor`, default digits-train: 1,347 images, of which it keeps `--samples`). Two measures of its share: (a) its own
seconds (`monitor/seconds`, logged beside each value; the first call also reads and transforms the images) against the
run's wall time, from the same run, so it does not depend on how loaded the machine is; (b) the wall time of the
run with the monitor against the run without it (alternating, `--rounds` of each: noisy on a shared machine).
Goal (issue 35): <= 5% of the training time. Losses of both runs are compared too: they must be equal.

    .venv/bin/python benchmarks/monitor_cost.py                          # MAE every 75, WSP every 100, 256 digits-train images
    .venv/bin/python benchmarks/monitor_cost.py --stages mae --every mae=25 --samples 0 --monitor digits-test
    .venv/bin/python benchmarks/monitor_cost.py --quick                  # seconds: 6 MAE steps on 200 images (the smoke test)
"""
import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from prepretrain_lit.data import build_from_recipe, shipped_manifest
from prepretrain_lit.pipeline_stage import kind_config
from prepretrain_lit.trainer import train

STAGES = {"mae": dict(steps=150, overrides=[]),
          "wsp": dict(steps=300, overrides=["optim.lr=2e-3", "data.transform=light"])}   # experiments/demo.yaml's


def cpu_name() -> str:
    try: return next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if l.startswith("Model name"))
    except (OSError, StopIteration): return platform.processor() or "?"


def one_run(stage: str, shapes: Path, steps: int, overrides: list[str], monitor: Path | None, every: int, samples: int,
            out: Path) -> dict:
    "Wall time, monitor seconds and losses of one run of `stage` into `out` (removed first)."
    shutil.rmtree(out, ignore_errors=True)
    extra = [f"eval.monitor.every={every}", f"eval.monitor.dataset={monitor}", f"eval.monitor.samples={samples}"] if monitor else []
    cfg = kind_config(stage, dict(preset="tiny", dataset=str(shapes), steps=steps, seed=0, overrides=overrides + extra))
    tic = time.perf_counter()
    train(stage, cfg, out, progress=False)
    wall = time.perf_counter() - tic
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    calls = [r["monitor/seconds"] for r in lines if "monitor/seconds" in r]
    return {"wall_s": wall, "monitor_s": sum(calls), "calls": calls,
            "knn": {r["step"]: r["monitor/knn_top1"] for r in lines if "monitor/knn_top1" in r},
            "losses": [r["loss"] for r in lines if "loss" in r]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", default=["mae", "wsp"], choices=list(STAGES))
    ap.add_argument("--every", nargs="+", default=["mae=75", "wsp=100"], help="eval.monitor.every per stage (the demo's)")
    ap.add_argument("--samples", type=int, default=256, help="eval.monitor.samples (the demo's)")
    ap.add_argument("--monitor", default="digits-train", help="built-in labelled set the monitor reads")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    ap.add_argument("--quick", action="store_true", help="6 MAE steps on 200 shapes, every 3: a smoke run")
    ap.add_argument("--dir", default=None, help="where to build the data and run (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)                           # as the demo runs each stage: one thread a run
    root = Path(args.dir or tempfile.mkdtemp(prefix="monitor-cost-"))
    shapes = build_from_recipe(shipped_manifest("shapes"), root / "shapes", num_samples=200 if args.quick else 2000, progress=False)
    monitor = build_from_recipe(shipped_manifest(args.monitor), root / args.monitor, progress=False)
    stages = {"mae": dict(steps=6, overrides=[])} if args.quick else {s: STAGES[s] for s in args.stages}
    every = {"mae": 3} if args.quick else {k: int(v) for k, v in (e.split("=") for e in args.every)}
    samples = 50 if args.quick else args.samples
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, 1 thread; monitor every {every} steps on {samples or 'all'} "
          f"images of {args.monitor}")
    results = {}
    for stage, spec in stages.items():
        off, on = [], []
        for _ in range(args.rounds):
            off.append(one_run(stage, shapes, spec["steps"], spec["overrides"], None, every[stage], samples, root / f"{stage}-off"))
            on.append(one_run(stage, shapes, spec["steps"], spec["overrides"], monitor, every[stage], samples, root / f"{stage}-on"))
        assert all(a["losses"] == b["losses"] for a, b in zip(off, on)), f"{stage}: the monitor changed the losses"
        wall_off, wall_on = statistics.median(r["wall_s"] for r in off), statistics.median(r["wall_s"] for r in on)
        mon = statistics.median(r["monitor_s"] for r in on)
        row = {"steps": spec["steps"], "every": every[stage], "calls": len(on[0]["calls"]), "first_call_s": on[0]["calls"][0],
               "later_call_s": statistics.median(on[0]["calls"][1:]) if len(on[0]["calls"]) > 1 else None,
               "monitor_s": mon, "wall_on_s": wall_on, "wall_off_s": wall_off,
               "share_own": mon / wall_on, "share_wall": (wall_on - wall_off) / wall_off, "knn": on[0]["knn"]}
        results[stage] = row
        print(f"{stage}: {row['steps']} steps, {row['calls']} monitor calls (first {row['first_call_s']:.2f} s with the reading, "
              f"then {row['later_call_s'] or 0:.2f} s each): {mon:.2f} s of a {wall_on:.1f} s run = {100 * row['share_own']:.1f}% "
              f"(its own seconds); runs with / without: {wall_on:.1f} / {wall_off:.1f} s = {100 * row['share_wall']:+.1f}%; "
              f"k-NN top-1 by step: {', '.join(f'{s}: {v:.1f}' for s, v in row['knn'].items())}; losses equal")
    if args.json: Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "samples": samples, "monitor": args.monitor,
                                                         "stages": results}, indent=1) + "\n")
    if not args.dir: shutil.rmtree(root, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
