"""`prepretrain export --to hf|hf-vit`: Hugging Face `transformers` reads the folders back strictly (no
missing, unexpected or mismatched weights) and computes what ours computes: the MAE's loss, predictions and mask
with the same noise; a trunk's last hidden state."""
import json
from pathlib import Path

import pytest
import torch

from prepretrain_lit.cli import export_trunk, main
from prepretrain_lit.presets import load_config
from prepretrain_lit.mae import load_mae_checkpoint, mae_from_config
from prepretrain_lit.trainer import train
from prepretrain_lit.vit import load_trunk, vit_from_config

transformers = pytest.importorskip("transformers")      # an optional extra: the dev environment has it

TINY = ["data.dataset=synthetic", "model.depth=2", "model.decoder_depth=2", "train.log_every=1", "train.steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    "A finished tiny MAE run and a finished tiny SplitMask run."
    out = {}
    for stage in ("mae", "splitmask"):
        out[stage] = tmp_path_factory.mktemp(stage)
        train(stage, load_config(preset="tiny", stage=stage, overrides=TINY), out[stage], progress=False)
    return out


def loaded_strictly(cls, folder: Path, **kwargs):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems                        # every weight of the model read, every file weight used
    return model.eval()


def images(cfg, n: int = 3) -> torch.Tensor:
    return torch.randn(n, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(0))


def test_an_mae_run_exports_as_vitmae_for_pretraining_with_our_loss(runs, capsys):
    run = runs["mae"]
    assert main(["export", str(run), "--to", "hf"]) == 0
    assert "from transformers import ViTMAEForPreTraining" in capsys.readouterr().out
    dest = run / "export-hf"
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "config.json", "export.json", "model.safetensors"]
    peer = loaded_strictly(transformers.ViTMAEForPreTraining, dest)
    cfg = load_config(run / "config.yaml")
    ours = load_mae_checkpoint(mae_from_config(cfg.model, cfg.mae), run / "model.pt").eval()
    assert peer.config.layer_norm_eps == 1e-6 and peer.config.norm_pix_loss == cfg.mae.norm_pix_loss
    imgs, noise = images(cfg), torch.rand(3, cfg.model.num_patches, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss, pred, mask = ours(imgs, cfg.mae.mask_ratio, noise)
        out = peer(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    # pretraining goes on there: the decoder's weights are ours, not a fresh init
    torch.testing.assert_close(peer.decoder.decoder_pred.weight, ours.decoder_pred.weight)


@pytest.mark.parametrize("stage,to", [("mae", "hf-vit"), ("splitmask", "hf")])
def test_a_trunk_exports_as_vitmodel_with_our_features(runs, stage, to):
    run = runs[stage]
    record = export_trunk(run, to, run / f"vit-{to}")
    assert record["hf_class"] == "ViTModel" and "add_pooling_layer=False" in record["hf_call"]
    assert json.loads((run / f"vit-{to}" / "config.json").read_text())["model_type"] == "vit"
    peer = loaded_strictly(transformers.ViTModel, run / f"vit-{to}", add_pooling_layer=False)
    cfg = load_config(run / "config.yaml")
    trunk = load_trunk(vit_from_config(cfg.model), run / "model.pt").eval()
    imgs = images(cfg)
    with torch.no_grad():
        ours, theirs = trunk.forward_features(imgs), peer(pixel_values=imgs).last_hidden_state
    assert theirs.shape == (3, 1 + cfg.model.num_patches, cfg.model.embed_dim)   # every token, after the final LayerNorm
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_an_unknown_format_is_refused_naming_the_choices(runs):
    from prepretrain_lit.schema import UserError
    with pytest.raises(UserError, match="choose one of timm, safetensors, hf, hf-vit"):
        export_trunk(runs["mae"], "onnx")
