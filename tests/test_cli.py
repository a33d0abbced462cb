"""The `prepretrain` console script: version, config show/presets, env, demo, and user errors without tracebacks."""
import configparser
import json
import subprocess
import sys
from pathlib import Path

import yaml

from prepretrain_lit.cli import main
from prepretrain_lit.config import config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = Path(sys.executable).parent / "prepretrain"


def run(*args: str) -> subprocess.CompletedProcess:
    "The installed console script, as a user runs it."
    return subprocess.run([str(PRETRAIN), *args], capture_output=True, text=True, timeout=300)


def test_version_comes_from_settings_ini():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"prepretrain-lit {cfg['DEFAULT']['version']}"


def test_config_show_prints_the_resolved_config_and_its_hash(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("preset: tiny\nmodel: {depth: 3}\n")
    res = run("config", "show", "--config", str(path), "--set", "seed=9")
    assert res.returncode == 0, res.stderr
    expected = load_config(path, overrides=["seed=9"])
    assert res.stdout.splitlines()[0] == f"# config hash {config_hash(expected)}"
    shown = yaml.safe_load(res.stdout)
    assert shown["model"]["depth"] == 3 and shown["seed"] == 9 and shown["preset"] == "tiny"


def test_config_show_json(capsys):
    assert main(["config", "show", "--preset", "vit_h14", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["patch_size"] == 14


def test_user_errors_are_one_line_with_exit_status_2(tmp_path):
    cases = [
        (["config", "show", "--set", "model.dept=2"], "did you mean 'model.depth'"),
        (["config", "show", "--set", "train.steps=many"], "expects int"),
        (["config", "show", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["config", "show", "--preset", "huge"], "valid presets: tiny, vit_s16"),
    ]
    for args, expected in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("prepretrain: error: ") and expected in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_presets_table_lists_every_preset(capsys):
    assert main(["config", "presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "vit_b16", "vit_l16", "vit_h14", "vit_2b14", "vit_6.5b14"): assert name in out
    assert "1,890.4M" in out  # the 2B trunk's analytic parameter count


def test_group_without_subcommand_is_a_usage_error():
    res = run("config")
    assert res.returncode == 2 and "required: SUBCOMMAND" in res.stderr and "usage: prepretrain config" in res.stderr


def test_env_reports_versions(capsys):
    import torch
    assert main(["env"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["versions"]["torch"] == torch.__version__ and "commit" in record["git"]


def test_demo_builds_shards_and_runs_the_tiny_mae_on_a_batch(capsys, tmp_path):
    assert main(["demo", "--set", "data.batch_size=2", "--out", str(tmp_path), "--num-samples", "100"]) == 0
    assert (tmp_path / "demo" / "shards" / "shapes" / "shapes.yaml").is_file()
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{", out.index("== MAE model")):out.rindex("}") + 1])
    tiny = load_config(preset="tiny")
    assert summary["encoder_params"] == tiny.model.encoder_params()
    assert summary["images"] == [2, 3, tiny.model.img_size, tiny.model.img_size]
    assert summary["visible_per_image"] == int(tiny.model.num_patches * (1 - tiny.mae.mask_ratio))
    assert summary["pred"] == [2, tiny.model.num_patches, tiny.model.patch_size ** 2 * 3]
    assert summary["loss_at_init"] > 0
