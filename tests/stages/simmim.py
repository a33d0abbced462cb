"""A stage defined outside the package, registered with one call: SimMIM (Xie et al. 2022).

SimMIM replaces a random share of the patch tokens by a learned mask token, runs the whole ViT over all of them,
and regresses the raw pixels of the masked patches with a linear head (L1 loss on masked patches only). The
model is the package's `ViT` with two parts of its own, `simmim_mask_token` and `simmim_head`, which the spec
names as not the trunk: export and `init.checkpoint` then keep exactly the ViT. Nothing else in the package
knows this file exists; the tests bring it in with `--stage-module`, `PREPRETRAIN_STAGE_MODULES` or an
experiment's `stage_modules:`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from prepretrain_lit.mae import patchify
from prepretrain_lit.objectives import Objective
from prepretrain_lit.registry import StageSpec, register_stage
from prepretrain_lit.schema import ConfigError, RunConfig
from prepretrain_lit.vit import ViT


@dataclass
class SimMIMConfig:
    "The `simmim` section: how many patches are masked."
    mask_ratio: float = 0.6
    def check(self) -> None:
        if not 0 < self.mask_ratio < 1: raise ConfigError(f"simmim.mask_ratio={self.mask_ratio} must be in (0, 1)")


class SimMIMViT(ViT):
    "A ViT whose masked patch tokens are a learned token, and a linear head from tokens to the patches' pixels."
    def __init__(self, **vit_kwargs):
        super().__init__(**vit_kwargs)
        self.initialize_trunk()
        self.simmim_mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.simmim_head = nn.Linear(self.embed_dim, self.patch_size ** 2 * self.patch_embed.proj.in_channels)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        "imgs (N, C, H, W), mask (N, L) bool (True: masked) -> L1 loss over the masked patches' pixels."
        tokens = self.patch_embed(imgs)                                       # (N, L, D)
        tokens = torch.where(mask[..., None], self.simmim_mask_token.to(tokens.dtype), tokens) + self.pos_embed[:, 1:, :]
        pred = self.simmim_head(self.forward_tokens(tokens)[:, 1:])          # (N, L, p*p*C)
        per_patch = (pred - patchify(imgs, self.patch_size)).abs().mean(-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)


class SimMIMObjective(Objective):
    "SimMIM as a trainer objective: a fresh random mask per batch."
    def __init__(self, model: SimMIMViT, mask_ratio: float):
        super().__init__(model)
        self.mask_ratio = mask_ratio

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        N, L = images.shape[0], self.model.patch_embed.num_patches
        mask = torch.rand(N, L, device=images.device).argsort(1) < int(L * self.mask_ratio)
        return self.model(images, mask), {}


def simmim_objective(cfg: RunConfig) -> SimMIMObjective:
    m = cfg.model
    model = SimMIMViT(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
                      depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
    return SimMIMObjective(model, cfg.simmim.mask_ratio)


register_stage(StageSpec("simmim", "pretrain", "SimMIM", simmim_objective, section=("simmim", SimMIMConfig),
                         not_trunk=("simmim_",), recipe=dict(optim=dict(base_lr=2e-3))))
