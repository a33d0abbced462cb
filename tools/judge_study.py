"""Which built-in transfer task can show what the demo's pretraining teaches? A study of candidate judges.

    .venv/bin/python tools/judge_study.py trunks --seeds 0 1 2     # the demo's trunks (MAE, WSP, MAE->WSP), 1.5-8 min a seed
    .venv/bin/python tools/judge_study.py judge count shapes-count --seeds 0 1 2   # ~4 min a task on 2 loaded cores
    .venv/bin/python tools/judge_study.py supervised count --steps 400
    .venv/bin/python tools/judge_study.py pipeline knn linear_probe --seeds 0 1 2  # prepretrain evaluate, train -> val

Trains the demo's pretraining stages as `experiments/demo.yaml` does (tiny preset, 2,000 `shapes` of seed 0,
MAE 150 steps, WSP 300 steps at lr 2e-3 with the light transform, from scratch and from MAE; runs/judge_study/), then
judges each frozen trunk on candidate tasks rendered in memory and read through the evaluation transform, on their
train (seed 1) and *val* (seed 2) splits, never test: the package's weighted k-NN (k=20, T=0.07) and a logistic
regression (standardised features, C=0.1), on the normed cls token and on the mean patch token, beside the raw pixels
and random-init trunks ("±": the population std over the seeds given). The tasks (`TASKS`): shape-id; factors of held-out
`shapes` scenes (the main object's shape, colour, texture, the background style, the object count); `count` (1-3 objects
that never touch, shapes' palette), `count-rgb` (the same in any colour) and `shape-count` (the package's renderer of the
judge `count` led to). nbs/01_render.ipynb quotes the table; the run of Dec 2026 took ~30 min on 2 shared cores.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shape_id_baselines import knn_and_logreg   # the frozen-feature pair every study here reports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def train(stage: str, out: Path, dataset: Path, steps: int, seed: int, *overrides: str) -> Path:
    "`prepretrain train` of the tiny preset on one thread, skipped when `out` is complete."
    if not (out / "model.pt").is_file():
        cmd = [str(BIN / "prepretrain"), "train", stage, "--preset", "tiny", "--out", str(out)]
        for s in [f"seed={seed}", f"data.dataset={dataset}", f"train.steps={steps}", *overrides]: cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "model.pt"


def trunks(work: Path, seeds) -> None:
    data = work / "shapes" / "shapes.yaml"
    if not data.is_file():
        subprocess.run([str(BIN / "prepretrain"), "shards", "build", str(ROOT / "data_manifests" / "shapes.yaml"),
                        "--out", str(work / "shapes"), "--num-samples", "2000"], check=True, stdout=subprocess.DEVNULL)
    for seed in seeds:
        t0 = time.time()
        mae = train("mae", work / f"mae-{seed}", data, 150, seed)
        wsp = ["optim.lr=2e-3", "data.transform=light"]
        train("wsp", work / f"wsp-{seed}", data, 300, seed, *wsp)
        train("wsp", work / f"maewsp-{seed}", data, 300, seed, *wsp, f"init.checkpoint={mae}")
        print(f"seed {seed}: trunks in {time.time() - t0:.0f} s", flush=True)


# ---- candidate tasks: (seed, index) -> (uint8 image, label); train = seed 1, val = seed 2 (test, seed 3, never read)
def _shapes_factor(factor):
    from prepretrain_lit.render import COLORS, COUNT_WORDS, SHAPES, TEXTURES, render_shapes
    def task(seed, index):
        img, meta = render_shapes(100 + seed, index)            # 64 px, as the pretraining images; seeds apart from it
        main = meta["caption"].split(" on a ")[0].split(", ")[0].split(" and ")[0].split()   # a large red solid circle
        if factor == "shape": label = meta["label"]
        elif factor == "colour": label = list(COLORS).index(main[2])
        elif factor == "texture": label = TEXTURES.index(main[3])
        elif factor == "count": label = next(i for i, w in enumerate(COUNT_WORDS) if w in meta["hashtags"])
        elif factor == "bgstyle": label = ["plain", "gradient", "noisy"].index(meta["caption"].split(" on a ")[1].split()[0])
        return img, label
    return task


def _shape_id(**kw):
    from prepretrain_lit.render import render_shape_id
    def task(seed, index):
        img, meta = render_shape_id(seed, index, **kw) if kw else render_shape_id(seed, index)
        return img, meta["label"]
    return task


def _count(palette: bool = True, size: int = 64):
    "1-3 objects that do not touch, one large and the others small as in `shapes`; the label is how many."
    from prepretrain_lit.render import BACKGROUND_STYLES, BACKGROUNDS, COLORS, SHAPES, TEXTURES, _background, _texture, shape_mask
    def task(seed, index):
        rng = np.random.default_rng([seed, index, 11])
        bg = np.array(BACKGROUNDS[list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]], np.float32) if palette \
            else rng.uniform(20, 235, 3).astype(np.float32)
        img = _background(BACKGROUND_STYLES[rng.integers(3)], size, bg, rng)
        count = int(rng.integers(1, 4))
        placed = []
        while len(placed) < count:
            r = size * (rng.uniform(0.22, 0.32) if not placed else rng.uniform(0.10, 0.16))
            lo = r + size / 16                                  # clear of the evaluation's centre crop
            cx, cy = rng.uniform(lo, size - lo, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed): placed.append((cx, cy, r))
        for cx, cy, r in placed:
            rgb = np.array(COLORS[list(COLORS)[rng.integers(len(COLORS))]], np.float32) if palette \
                else rng.uniform(0, 255, 3).astype(np.float32)
            mask = shape_mask(SHAPES[rng.integers(len(SHAPES))], size, cx, cy, r)
            img[mask] = _texture(TEXTURES[rng.integers(len(TEXTURES))], size, rgb, rng)[mask]
        return np.clip(img, 0, 255).astype(np.uint8), count - 1
    return task


def _rendered(generator):
    from prepretrain_lit.render import RENDERED_SPLITS
    render = RENDERED_SPLITS[generator][2]
    return lambda seed, index: (lambda img, meta: (img, meta["label"]))(*render(seed, index))


TASKS = {"shape-count": lambda: _rendered("shape_count"), "count": lambda: _count(), "count-rgb": lambda: _count(palette=False), "shape-id": lambda: _shape_id(), **{f"shapes-{f}": (lambda f=f: _shapes_factor(f))
                                             for f in ("shape", "colour", "texture", "count", "bgstyle")}}
NTRAIN, NVAL = 2000, 1000


def render_split(task, seed, n):
    "Images (n, 3, 32, 32) through the evaluation transform, labels (n,)."
    from PIL import Image
    from prepretrain_lit.decode import eval_transform
    tf = eval_transform(32)
    xs, ys = [], []
    for i in range(n):
        img, label = task(seed, i)
        xs.append(tf(Image.fromarray(img))); ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def trunk(path, seed=0):
    from prepretrain_lit.presets import load_config
    from prepretrain_lit.vit import load_init, vit_from_config
    cfg = load_config(preset="tiny", overrides=[f"init.checkpoint={path}"] if path else [])
    torch.manual_seed(seed)
    return load_init(vit_from_config(cfg.model), cfg.init).eval()


@torch.no_grad()
def features(model, x):
    tokens = torch.cat([model.forward_features(b) for b in x.split(500)])
    return {"cls": tokens[:, 0], "avg": tokens[:, 1:].mean(1)}


def judge(work: Path, names, seeds) -> None:
    arms = {"random": [None] * len(seeds)}
    for arm in ("mae", "wsp", "maewsp"):
        arms[arm] = [work / f"{arm}-{s}" / "model.pt" for s in seeds]
    for name in names:
        t0 = time.time()
        task = TASKS[name]()
        (xtr, ytr), (xva, yva) = render_split(task, 1, NTRAIN), render_split(task, 2, NVAL)
        chance = 100 * np.bincount(yva.numpy()).max() / len(yva)
        k, lr = knn_and_logreg(xtr.flatten(1), ytr, xva.flatten(1), yva)
        print(f"== {name}: {len(torch.unique(ytr))} classes, majority {chance:.1f}%; pixels k-NN {k:.1f} LR {lr:.1f}", flush=True)
        for arm, paths in arms.items():
            res = {"cls": [], "avg": []}
            for s, path in zip(seeds, paths):
                model = trunk(path, s)
                ftr, fva = features(model, xtr), features(model, xva)
                for pool in res: res[pool].append(knn_and_logreg(ftr[pool], ytr, fva[pool], yva))
            line = []
            for pool, rows in res.items():
                m = np.array(rows)
                line.append(f"{pool}: k-NN {m[:, 0].mean():.1f}±{m[:, 0].std():.1f} LR {m[:, 1].mean():.1f}±{m[:, 1].std():.1f}")
            print(f"   {arm:>7} (n={len(seeds)})  " + "   ".join(line), flush=True)
        print(f"   ({time.time() - t0:.0f} s)", flush=True)


def supervised_ceiling(names, steps) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from shape_id_baselines import supervised
    for name in names:
        task = TASKS[name]()
        (xtr, ytr), (xva, yva) = render_split(task, 1, NTRAIN), render_split(task, 2, NVAL)
        t0 = time.time()
        acc = supervised(xtr, ytr, {"train": (xtr[:1000], ytr[:1000]), "val": (xva, yva)}, steps,
                         num_classes=int(ytr.max()) + 1)
        print(f"== {name}: supervised tiny ViT, {steps} steps of 64 ({time.time() - t0:.0f} s): "
              f"train {acc['train']:.1f}, val {acc['val']:.1f}", flush=True)


def pipeline(work: Path, seeds, kinds, steps_grid) -> None:
    """The demo's own evaluations (`prepretrain evaluate`: shards, evaluation transform, cls token, the pixel arm) of
    every arm on shape-count-train -> shape-count-*val*: the recipe's choice, never read from test."""
    import json
    sets = {}
    for split in ("train", "val"):
        out = work / f"shape-count-{split}"
        if not (out / f"{out.name}.yaml").is_file():
            subprocess.run([str(BIN / "prepretrain"), "shards", "build", str(ROOT / "data_manifests" / f"{out.name}.yaml"),
                            "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        sets[split] = out / f"{out.name}.yaml"
    for kind in kinds:
        for steps in (steps_grid if kind == "linear_probe" else [0]):
            for arm in ("random", "mae", "wsp", "maewsp"):
                tops, pixels = [], None
                for seed in seeds:
                    out = work / "eval" / f"{kind}-{steps}-{arm}-{seed}"
                    if not (out / "results.json").is_file():
                        sets_ = [f"seed={seed}", f"data.dataset={sets['train']}", f"eval.dataset={sets['val']}",
                                 f"train.steps={max(steps, 1)}"]
                        if arm != "random": sets_.append(f"init.checkpoint={work / f'{arm}-{seed}' / 'model.pt'}")
                        cmd = [str(BIN / "prepretrain"), "evaluate", kind, "--preset", "tiny", "--out", str(out)]
                        for x in sets_: cmd += ["--set", x]
                        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
                    res = json.loads((out / "results.json").read_text())
                    tops += [r["value"] for r in res["records"] if r["metric"] == "top1"]
                    pixels = res.get("baselines", {}).get("pixels", {}).get("summary", {}).get("top1", {}).get("mean", pixels)
                print(f"{kind:>12} steps {steps:>4} {arm:>7}: top-1 {np.mean(tops):.1f} ± {np.std(tops):.1f} (n={len(tops)}); "
                      f"pixels {pixels if pixels is not None else float('nan'):.1f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["trunks", "judge", "supervised", "pipeline"])
    p.add_argument("tasks", nargs="*")
    p.add_argument("--work", default="runs/judge_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--probe-steps", type=int, nargs="+", default=[60])
    args = p.parse_args(argv)
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.what == "trunks": trunks(work, args.seeds)
    if args.what == "judge": judge(work, args.tasks, args.seeds)
    if args.what == "supervised": supervised_ceiling(args.tasks, args.steps)
    if args.what == "pipeline": pipeline(work, args.seeds, args.tasks or ["knn", "linear_probe"], args.probe_steps)


if __name__ == "__main__":
    main()
