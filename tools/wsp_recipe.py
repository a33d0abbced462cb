"""Rerun the choice of the demo's WSP recipe (steps, lr, transform), judged on held-out shapes, never on a test split.

    .venv/bin/python tools/wsp_recipe.py                 # ~4 min on 2 CPU cores: 7 recipes x 2 arms, two at a time
    .venv/bin/python tools/wsp_recipe.py --quick         # seconds: one tiny recipe, to see that it runs

It builds the demo's pretraining set (the first 2,000 `shapes`, seed 0) and a validation set that no evaluation reads
(1,000 `shapes` drawn with seed 1), trains the demo's MAE (150 steps, seed 0) for the from-MAE arm, then trains WSP
with each recipe of the grid from scratch and from that MAE (seed 0) and prints each run's last training loss and its
WSP loss and hashtag top-1 over the validation set (evaluation transform). `experiments/demo.yaml` quotes the table
and says which recipe it took and why.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# (steps, absolute lr, transform): the demo's old recipe first, then what the reasoning in demo.yaml suggests
GRID = [(200, 1e-3, "mae"), (200, 1e-3, "light"), (200, 2e-3, "light"), (200, 4e-3, "light"),
        (300, 2e-3, "light"), (300, 4e-3, "light"), (400, 2e-3, "light")]
QUICK_GRID = [(4, 1e-3, "light")]


def build_sets(work: Path, train_n: int, val_n: int) -> tuple[Path, Path]:
    "The pretraining shards (shapes seed 0, the first `train_n`) and the validation shards (shapes seed 1)."
    recipe = yaml.safe_load((ROOT / "data_manifests" / "shapes.yaml").read_text())
    recipe.update(name="shapes-val", num_samples=val_n)
    recipe["recipe"]["seed"] = 1
    recipe.pop("subsets", None)
    (work / "shapes-val-recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for source, out, n in ((ROOT / "data_manifests" / "shapes.yaml", work / "shapes", train_n),
                           (work / "shapes-val-recipe.yaml", work / "shapes-val", val_n)):
        if not (out / f"{out.name}.yaml").is_file():
            subprocess.run([str(BIN / "prepretrain"), "shards", "build", str(source), "--out", str(out),
                            "--num-samples", str(n)], check=True, stdout=subprocess.DEVNULL)
    return work / "shapes" / "shapes.yaml", work / "shapes-val" / "shapes-val.yaml"


def train(stage: str, out: Path, dataset: Path, steps: int, *overrides: str) -> Path:
    "`prepretrain train` of the tiny preset, one thread (two run side by side), skipped when `out` is complete."
    if not (out / "model.pt").is_file():
        sets = ["seed=0", f"data.dataset={dataset}", f"train.steps={steps}", *overrides]
        cmd = [str(BIN / "prepretrain"), "train", stage, "--preset", "tiny", "--out", str(out)]
        for s in sets: cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def heldout(run: Path, val: Path) -> tuple[float, float, float]:
    "(last training loss, WSP loss, hashtag top-1 %) of the WSP run in `run`, the last two over manifest `val`."
    import torch
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.manifest import load_manifest
    from prepretrain_lit.objectives import classifier_from_config, hashtag_top1, wsp_loss
    from prepretrain_lit.knn import eval_loader
    from prepretrain_lit.vit import load_state_dict_file
    cfg = load_config(run / "config.yaml")
    model = classifier_from_config(cfg.model, len(load_manifest(val).hashtags), cfg.head.global_pool)
    model.load_state_dict(load_state_dict_file(run / "model.pt"))
    model.eval()
    loss = top1 = n = 0.0
    with torch.no_grad():
        for batch in eval_loader(str(val), cfg.model.img_size, 250, 0):
            logits = model(batch["image"])
            loss += float(wsp_loss(logits, batch["hashtags"])) * len(logits)
            top1 += float(hashtag_top1(logits, batch["hashtags"]).sum())
            n += len(logits)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    return last, loss / n, 100 * top1 / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/wsp_recipe", help="folder for the shards and runs (reused: finished runs skip)")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side, one thread each")
    p.add_argument("--quick", action="store_true", help="one recipe of 4 steps on 64 images: a smoke test")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    grid, (train_n, val_n, mae_steps) = (QUICK_GRID, (64, 50, 4)) if args.quick else (GRID, (2000, 1000, 150))
    data, val = build_sets(work, train_n, val_n)
    mae = train("mae", work / "mae", data, mae_steps) / "model.pt"
    jobs = [(steps, lr, tf, arm) for steps, lr, tf in grid for arm in ("scratch", "mae")]
    def run(job):
        steps, lr, tf, arm = job
        init = [f"init.checkpoint={mae}"] if arm == "mae" else []
        return train("wsp", work / f"wsp-{steps}-{lr:g}-{tf}-{arm}", data, steps, f"optim.lr={lr}",
                     f"data.transform={tf}", *init)
    with ThreadPoolExecutor(args.jobs) as pool: runs = list(pool.map(run, jobs))
    print(f"WSP on {train_n} shapes (seed 0), judged on {val_n} held-out shapes (seed 1); seed 0, tiny preset")
    print(f"{'steps':>5} {'lr':>7} {'transform':>9} {'arm':>7} {'train loss':>10} {'held-out loss':>13} {'hashtag top-1':>13}")
    for (steps, lr, tf, arm), folder in zip(jobs, runs):
        last, loss, top1 = heldout(folder, val)
        print(f"{steps:>5} {lr:>7g} {tf:>9} {arm:>7} {last:>10.3f} {loss:>13.3f} {top1:>12.1f}%")


if __name__ == "__main__":
    main()
