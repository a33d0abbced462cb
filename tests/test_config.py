"""Configs, overrides, YAML, presets, seeding, run folders and provenance: the promises of 00a_schema, 00b_presets
and 00c_config (all importable from `prepretrain_lit.config`)."""
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from prepretrain_lit.presets import PRESETS, config_hash, config_to_dict, get_preset, load_config, save_config
from prepretrain_lit.schema import ConfigError, OptimConfig, RunConfig, UserError, merge, parse_overrides
from prepretrain_lit.config import (collect_provenance, create_run_dir, derive_seed, git_state, seed_everything,
                                    write_provenance)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- bad input: the key, the expected type, the valid choices, the path ------------------------------------

def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.stpes=10"])
    msg = str(e.value)
    assert "'train.stpes'" in msg and "did you mean 'train.steps'" in msg
    for valid in ("steps", "accum_steps", "precision", "log_every"):
        assert valid in msg


def test_unknown_top_level_key_lists_sections():
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*valid keys: seed, preset, stage, model, mae, splitmask, init, head, lit, data, eval, probe, optim, train"):
        load_config(overrides=["modle.depth=2"])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=ten", "expects int"),
    ("train.steps=2.5", "expects int"),
    ("optim.base_lr=fast", "expects float"),
    ("train.compile=maybe", "expects bool"),
    ("optim.lr=abc", "expects float or null"),
    ("optim.betas=[0.9]", "expects tuple[float, float] (2 values)"),
    ("train.precision=fp8", "expects one of 'fp32', 'bf16', 'fp16'"),
    ("model=3", "is a section, not a value"),
])
def test_wrong_type_names_expected_type(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert expected in str(e.value) and override.split("=")[0] in str(e.value)


def test_yaml_types_are_checked_and_the_file_is_named(tmp_path):
    path = write(tmp_path, """
        model:
          depth: "six"
    """)
    with pytest.raises(ConfigError, match=rf"{path}: config key 'model.depth' expects int, got 'six'"):
        load_config(path)


def test_yaml_number_for_a_string_key_says_to_quote_it(tmp_path):
    path = write(tmp_path, "data: {subset: 1000}\n")
    with pytest.raises(ConfigError, match="quote it"):
        load_config(path)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_invalid_yaml_and_non_mapping_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {depth: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as e:
        get_preset("vit_b14")
    assert "did you mean" in str(e.value)
    for name in PRESETS: assert name in str(e.value)


def test_sizes_that_cannot_build_a_model_are_refused():
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_config(preset="tiny", overrides=["model.img_size=30"])
    with pytest.raises(ConfigError, match="not divisible by model.num_heads"):
        load_config(preset="tiny", overrides=["model.num_heads=5"])
    with pytest.raises(ConfigError, match="train.steps=0 must be > 0"):
        load_config(overrides=["train.steps=0"])


def test_a_config_mistake_is_caught_as_the_users_error_and_as_a_value_error():
    "The CLI prints a `UserError` as one line; code that guards with `except ValueError` catches it too."
    for caught in (UserError, ValueError):
        with pytest.raises(caught, match="train.steps=0 must be > 0"):
            load_config(overrides=["train.steps=0"])


def test_malformed_override():
    for bad in ("model.depth", "=3", "model..depth=3"):
        with pytest.raises(ConfigError, match="not of the form key=value"):
            parse_overrides([bad])


# -- layering and typing -----------------------------------------------------------------------------------

def test_layers_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, """
        preset: tiny
        seed: 7
        model: {depth: 3}
        optim: {betas: [0.9, 0.999], clip_grad: 1.0}
    """)
    cfg = load_config(path, overrides=["model.depth=5", "train.steps=1e3"])
    tiny = get_preset("tiny")
    assert cfg.preset == "tiny" and cfg.seed == 7
    assert cfg.model.depth == 5                        # override beats file
    assert cfg.model.embed_dim == tiny.model.embed_dim  # preset kept where the file is silent
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.clip_grad == 1.0
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)


def test_command_line_preset_beats_the_files_preset(tmp_path):
    path = write(tmp_path, "preset: tiny\nseed: 1\n")
    cfg = load_config(path, preset="vit_l16")
    assert cfg.preset == "vit_l16" and cfg.model.depth == 24 and cfg.seed == 1


def test_override_values_are_parsed_for_their_field():
    cfg = load_config(overrides=["optim.base_lr=1e-3", "data.subset=1000", "optim.lr=null",
                                 "optim.layer_decay=0.65", "train.compile=yes", "optim.betas=0.9,0.98"])
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)
    assert cfg.data.subset == "1000"
    assert cfg.optim.lr is None and cfg.optim.layer_decay == 0.65
    assert cfg.train.compile is True and cfg.optim.betas == (0.9, 0.98)


def test_merge_does_not_mutate_its_input():
    base = RunConfig()
    merged = merge(base, {"model": {"depth": 2}})
    assert base.model.depth == 12 and merged.model.depth == 2


def test_yaml_round_trip_and_hash(tmp_path):
    cfg = load_config(preset="tiny", overrides=["seed=3", "optim.clip_grad=0.5"])
    back = load_config(save_config(cfg, tmp_path / "config.yaml"))
    assert back == cfg and config_hash(back) == config_hash(cfg)
    assert config_hash(cfg) != config_hash(merge(cfg, {"optim": {"clip_grad": 0.4}}))
    assert len(config_hash(cfg)) == 12 and len(config_hash(cfg, length=64)) == 64


def test_presets_match_the_paper_sizes():
    sizes = {name: get_preset(name).model for name in PRESETS}
    assert (sizes["vit_2b14"].embed_dim, sizes["vit_2b14"].depth, sizes["vit_2b14"].num_heads) == (2560, 24, 32)
    assert (sizes["vit_6.5b14"].embed_dim, sizes["vit_6.5b14"].depth, sizes["vit_6.5b14"].num_heads) == (4096, 32, 32)
    assert sizes["vit_h14"].patch_size == 14 and sizes["vit_l16"].patch_size == 16
    assert abs(sizes["vit_b16"].encoder_params() - 86e6) < 1e6
    assert abs(sizes["vit_l16"].encoder_params() - 304e6) < 3e6
    tiny = get_preset("tiny")
    assert tiny.train.device == "cpu" and tiny.model.img_size <= 64


def test_scaled_lr_follows_the_linear_rule():
    cfg = RunConfig()
    assert cfg.optim.scaled_lr(4096) == pytest.approx(1.5e-4 * 16)
    assert merge(cfg, {"optim": {"lr": 0.1}}).optim.scaled_lr(4096) == 0.1


# -- seeding -----------------------------------------------------------------------------------------------

def test_derived_seeds_differ_per_rank_and_worker_and_repeat():
    seeds = {derive_seed(0, rank, worker) for rank in range(4) for worker in range(4)}
    assert len(seeds) == 16
    assert derive_seed(5, 1, 2) == derive_seed(5, 1, 2)
    assert derive_seed(0, 1) != derive_seed(1, 0)


def test_seed_everything_makes_draws_repeat_per_rank():
    import random

    import numpy as np
    import torch

    def draw(rank):
        seed_everything(11, rank)
        return random.random(), float(np.random.rand()), float(torch.rand(()))
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


# -- run folders -------------------------------------------------------------------------------------------

def test_run_dir_layout_and_refusal_of_another_config(tmp_path):
    cfg = get_preset("tiny")
    d = create_run_dir(cfg, tmp_path, "exp", "mae")
    assert d == tmp_path / "exp" / "mae" and (d / "checkpoints").is_dir()
    assert load_config(d / "config.yaml") == cfg
    (d / "checkpoints" / "step_100.pt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"optim.base_lr: 0.001 -> 0.002"):
        create_run_dir(merge(cfg, {"optim": {"base_lr": 2e-3}}), tmp_path, "exp", "mae")
    assert (d / "checkpoints" / "step_100.pt").read_text() == "keep me"
    assert load_config(d / "config.yaml") == cfg  # the old config was not overwritten


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_run_dir_rejects_names_that_are_not_folders(tmp_path, bad):
    with pytest.raises(ConfigError, match="cannot name a folder"):
        create_run_dir(RunConfig(), tmp_path, "exp", bad)


# -- provenance --------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_git_state_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == {"commit": head, "dirty": False}
    (repo / "new.txt").write_text("untracked files do not make the tree dirty\n")
    assert git_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == {"commit": head, "dirty": True}


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_provenance_record(tmp_path):
    import timm
    import torch

    import prepretrain_lit
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    cfg = load_config(preset="tiny", overrides=["seed=4"])
    record = json.loads(write_provenance(tmp_path, cfg, source=repo).read_text())
    assert record["git"] == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    assert record["config_hash"] == config_hash(cfg) and record["config"]["seed"] == 4
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["timm"] == timm.__version__
    assert versions["prepretrain_lit"] == prepretrain_lit.__version__
    assert versions["python"].count(".") == 2
    assert record["host"] and record["devices"] and record["started"].endswith("+00:00")
    assert not list(tmp_path.glob(".provenance.json.tmp*"))  # written atomically, no temporary left


def test_provenance_without_config():
    record = collect_provenance()
    assert record["config"] is None and record["config_hash"] is None and "torch" in record["versions"]


def test_mask_ratio_must_hide_some_and_keep_some():
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="mae.mask_ratio"):
            load_config(overrides=[f"mae.mask_ratio={bad}"])
    assert load_config(overrides=["mae.mask_ratio=0.9"]).mae.mask_ratio == 0.9


# -- stage recipes ---------------------------------------------------------------------------------------

def test_stage_recipe_sits_between_preset_and_overrides():
    cfg = load_config(preset="tiny", stage="finetune", overrides=["head.mixup=0.2"])
    assert cfg.stage == "finetune" and cfg.model.embed_dim == 64          # preset sizes the model
    assert (cfg.optim.layer_decay, cfg.optim.base_lr, cfg.head.cutmix) == (0.65, 5e-4, 1.0)   # the recipe
    assert cfg.head.mixup == 0.2                                           # the override wins


def test_stage_recipe_survives_a_save_and_reload(tmp_path):
    cfg = load_config(preset="tiny", stage="linear_probe", overrides=["optim.base_lr=0.5"])
    from prepretrain_lit.presets import save_config
    back = load_config(save_config(cfg, tmp_path / "config.yaml"))
    assert back == cfg and back.optim.name == "lars" and back.optim.base_lr == 0.5


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ConfigError, match=r"unknown stage 'wps' \(did you mean 'wsp'\?\); valid stages: shards, mae, splitmask, wsp"):
        load_config(stage="wps")


# -- a run's identity survives the schema's growth ------------------------------------------------------------

from dataclasses import dataclass, field


@dataclass
class GrownConfig:
    "A section a later version adds: its defaults reproduce what the code did before it existed."
    weight: float = 1.0

    def check(self) -> None: pass


@dataclass
class GrownRunConfig(RunConfig):
    grown: GrownConfig = field(default_factory=GrownConfig)


def grow_schema(monkeypatch):
    "Make every config this process loads a `GrownRunConfig`, as if the schema had gained the `grown` section."
    from prepretrain_lit import presets
    monkeypatch.setattr(presets, "RunConfig", GrownRunConfig)


def every_shipped_config():
    from prepretrain_lit.registry import stage_kinds
    return {(p, s): load_config(preset=p, stage=s) for p in PRESETS for s in [None, *stage_kinds()]}


def test_a_new_section_with_defaults_leaves_every_shipped_configs_identity_unchanged(monkeypatch, tmp_path):
    from prepretrain_lit.presets import config_identity, run_changes
    before = every_shipped_config()
    hashes = {k: config_hash(c) for k, c in before.items()}
    grow_schema(monkeypatch)
    after = every_shipped_config()
    assert all(type(c) is GrownRunConfig for c in after.values())
    assert {k: config_hash(c) for k, c in after.items()} == hashes
    for k, c in after.items():
        assert config_identity(c) == config_identity(before[k]) and run_changes(config_to_dict(before[k]), c) == [], k
    moved = merge(after[("tiny", "mae")], {"grown": {"weight": 2.0}})      # off its default: another run
    assert config_hash(moved) != hashes[("tiny", "mae")]
    assert run_changes(config_to_dict(before[("tiny", "mae")]), moved) == [
        "grown.weight: (absent: the run predates the key, so it ran as its default 1.0) -> 2.0"]
    old_file = save_config(before[("tiny", "mae")], tmp_path / "config.yaml")   # written before the section existed
    assert load_config(old_file) == after[("tiny", "mae")]                     # loads, the section at its defaults


@dataclass
class ClippingOptim(OptimConfig):
    clip_grad: float | None = 1.0           # a later version clips by default


@dataclass
class ChangedDefaultRunConfig(RunConfig):
    optim: ClippingOptim = field(default_factory=ClippingOptim)


def test_a_changed_default_of_an_existing_key_is_still_another_run(monkeypatch):
    "The hash names a config by what differs from the defaults; the stored values decide `same run`."
    from prepretrain_lit import presets
    from prepretrain_lit.presets import run_changes
    cfg = load_config(preset="tiny", stage="mae")
    monkeypatch.setattr(presets, "RunConfig", ChangedDefaultRunConfig)
    now = load_config(preset="tiny", stage="mae")
    assert now.optim.clip_grad == 1.0
    assert run_changes(config_to_dict(cfg), now) == ["optim.clip_grad: None -> 1.0"]


def test_identity_leaves_out_what_sits_at_its_default_and_what_cannot_change_the_result():
    from prepretrain_lit.presets import config_identity
    assert config_identity(RunConfig()) == {}
    cfg = load_config(preset="tiny", overrides=["data.num_workers=5", "optim.clip_grad=0.5"])
    ident = config_identity(cfg)
    assert ident["optim.clip_grad"] == 0.5 and ident["model.depth"] == 4 and "data.num_workers" not in ident
    assert "train.log_every" not in ident and "preset" not in ident and "model.patch_size" in ident
