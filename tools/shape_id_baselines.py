"""Measure a rendered judge's floor and ceiling at the demo's size (nbs/01_render.ipynb quotes the output).

    .venv/bin/python tools/shape_id_baselines.py                           # shape-id: ~10 min on 2 loaded CPU cores
    .venv/bin/python tools/shape_id_baselines.py --task shape-count --steps 400
    .venv/bin/python tools/shape_id_baselines.py --steps 20                # seconds: to see that it runs

On the fixed splits (train seed 1, 2,000 images; val seed 2; test seed 3), read through the evaluation transform
(resize to 36 px, centre crop 32, normalise), as the pipeline's evaluations read the shards:
raw-pixel k-NN (the package's weighted k-NN, k=20, T=0.07) and logistic regression (standardised pixels, C=0.1),
a random-init `tiny` trunk (cls token; k-NN and logistic regression, seeds 0-2), and the ceiling: the same `tiny` ViT
trained supervised from scratch (AdamW lr 1e-3, wd 0.05, batch 64, 50 warmup steps then half-cosine, random
horizontal flips; a recipe fixed before any run, not tuned), its top-1 on val and on test.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepretrain_lit.decode import eval_transform
from prepretrain_lit.knn import FeatureSet, knn_evaluate
from prepretrain_lit.objectives import classifier_from_config
from prepretrain_lit.presets import load_config
from prepretrain_lit.render import RENDERED_SPLITS
from prepretrain_lit.vit import load_init, vit_from_config

TASKS = {name: generator for generator, (name, *_) in RENDERED_SPLITS.items()}   # shape-id -> shape_id, ...


def split(task: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    "Images (N, 3, 32, 32) under the evaluation transform, and labels (N,), of split `name` of judge `task`."
    from PIL import Image
    _, splits, render, *_ = RENDERED_SPLITS[TASKS[task]]
    seed, n = splits[name]
    tf = eval_transform(32)
    images, labels = zip(*((tf(Image.fromarray(img)), meta["label"]) for img, meta in (render(seed, i) for i in range(n))))
    return torch.stack(images), torch.tensor(labels)


def knn_and_logreg(ftr, ytr, fte, yte) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    knn = knn_evaluate(FeatureSet(ftr, ytr, "train"), FeatureSet(fte, yte, "test"))[0]["value"]
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(((ftr - mu) / sd).numpy(), ytr.numpy())
    return knn, 100.0 * clf.score(((fte - mu) / sd).numpy(), yte.numpy())


def supervised(xtr, ytr, evals: dict, steps: int, seed: int = 0, num_classes: int = 6) -> dict:
    cfg = load_config(preset="tiny")
    torch.manual_seed(seed)
    model = classifier_from_config(cfg.model, num_classes, "avg")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        lr = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups: group["lr"] = lr
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        x = torch.where((torch.rand(64, generator=g) < 0.5)[:, None, None, None], xtr[idx].flip(3), xtr[idx])
        loss = F.cross_entropy(model.train()(x), ytr[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        return {name: 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item() for name, (x, y) in evals.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="shape-id", choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=1000, help="supervised training steps (batch 64)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    (xtr, ytr), (xva, yva), (xte, yte) = (split(args.task, s) for s in ("train", "val", "test"))
    classes = int(ytr.max()) + 1
    print(f"{args.task}: rendered {len(xtr)} / {len(xva)} / {len(xte)} images in {time.time() - t0:.1f} s; "
          f"chance {100 / classes:.1f}%; figures: val / test", flush=True)
    k, lr = zip(*(knn_and_logreg(xtr.flatten(1), ytr, x.flatten(1), y) for x, y in ((xva, yva), (xte, yte))))
    print(f"raw pixels: k-NN {k[0]:.1f} / {k[1]:.1f}, logistic regression {lr[0]:.1f} / {lr[1]:.1f}", flush=True)
    cfg = load_config(preset="tiny")
    rows = []
    for seed in range(3):
        torch.manual_seed(seed)
        trunk = load_init(vit_from_config(cfg.model), cfg.init).eval()
        with torch.no_grad(): ftr, fva, fte = (trunk.forward_features(x)[:, 0] for x in (xtr, xva, xte))
        rows.append(knn_and_logreg(ftr, ytr, fva, yva) + knn_and_logreg(ftr, ytr, fte, yte))
    m = np.array(rows)
    pm = lambda j: f"{m[:, j].mean():.1f} ± {m[:, j].std(ddof=1):.1f}"
    print(f"random-init tiny trunk (cls token, 3 seeds): k-NN {pm(0)} / {pm(2)}, logistic regression {pm(1)} / {pm(3)}",
          flush=True)
    t1 = time.time()
    acc = supervised(xtr, ytr, {"val": (xva, yva), "test": (xte, yte)}, args.steps, num_classes=classes)
    print(f"supervised tiny ViT from scratch, {args.steps} steps of 64 ({time.time() - t1:.0f} s): "
          f"val {acc['val']:.1f}, test {acc['test']:.1f}", flush=True)


if __name__ == "__main__":
    main()
