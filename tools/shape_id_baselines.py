"""Measure the `shape-id` judge's floor and ceiling at the demo's size (nbs/01_render.ipynb quotes the output).

    .venv/bin/python tools/shape_id_baselines.py              # ~10 min on 2 loaded CPU cores
    .venv/bin/python tools/shape_id_baselines.py --steps 20   # seconds: to see that it runs

On the fixed splits (train seed 1, 2,000 images; val seed 2; test seed 3; 32 px), with the evaluation's normalisation:
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
from prepretrain_lit.config import load_config
from prepretrain_lit.objectives import classifier_from_config, load_init
from prepretrain_lit.render import SHAPE_ID_SPLITS, render_shape_id
from prepretrain_lit.transfer import FeatureSet, knn_evaluate
from prepretrain_lit.vit import vit_from_config

MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    "Images (N, 3, 32, 32) normalised as the evaluation transform does, and labels (N,)."
    seed, n = SHAPE_ID_SPLITS[name]
    images, labels = zip(*((img, meta["label"]) for img, meta in (render_shape_id(seed, i) for i in range(n))))
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    return (x - MEAN) / STD, torch.tensor(labels)


def knn_and_logreg(ftr, ytr, fte, yte) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    knn = knn_evaluate(FeatureSet(ftr, ytr, "train"), FeatureSet(fte, yte, "test"))[0]["value"]
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=1000).fit(((ftr - mu) / sd).numpy(), ytr.numpy())
    return knn, 100.0 * clf.score(((fte - mu) / sd).numpy(), yte.numpy())


def supervised(xtr, ytr, evals: dict, steps: int, seed: int = 0) -> dict:
    cfg = load_config(preset="tiny")
    torch.manual_seed(seed)
    model = classifier_from_config(cfg.model, 6, "avg")
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
    ap.add_argument("--steps", type=int, default=1000, help="supervised training steps (batch 64)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    (xtr, ytr), (xva, yva), (xte, yte) = split("train"), split("val"), split("test")
    print(f"rendered {len(xtr)} / {len(xva)} / {len(xte)} images in {time.time() - t0:.1f} s; chance 16.7%", flush=True)
    k, lr = knn_and_logreg(xtr.flatten(1), ytr, xte.flatten(1), yte)
    print(f"raw pixels: k-NN {k:.1f}, logistic regression {lr:.1f}", flush=True)
    cfg = load_config(preset="tiny")
    rows = []
    for seed in range(3):
        torch.manual_seed(seed)
        trunk = load_init(vit_from_config(cfg.model), cfg.init).eval()
        with torch.no_grad(): ftr, fte = trunk.forward_features(xtr)[:, 0], trunk.forward_features(xte)[:, 0]
        rows.append(knn_and_logreg(ftr, ytr, fte, yte))
    m = np.array(rows)
    print(f"random-init tiny trunk (3 seeds): k-NN {m[:, 0].mean():.1f} ± {m[:, 0].std(ddof=1):.1f}, "
          f"logistic regression {m[:, 1].mean():.1f} ± {m[:, 1].std(ddof=1):.1f}", flush=True)
    t1 = time.time()
    acc = supervised(xtr, ytr, {"val": (xva, yva), "test": (xte, yte)}, args.steps)
    print(f"supervised tiny ViT from scratch, {args.steps} steps of 64 ({time.time() - t1:.0f} s): "
          f"val {acc['val']:.1f}, test {acc['test']:.1f}", flush=True)


if __name__ == "__main__":
    main()
