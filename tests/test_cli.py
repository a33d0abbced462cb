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


def test_demo_is_the_demo_experiment_and_dry_run_plans_it(tmp_path):
    res = run("demo", "--dry-run", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"== experiment demo: 36 stage runs in {tmp_path.resolve() / 'demo'}" in res.stdout
    for line in ("mae/seed=0", "wsp/scratch,seed=2", "wsp/from_mae,seed=1", "knn/seed=2,init=mae", "finetune/seed=0,init=mae",
                 "zeroshot/seed=0,init=scratch", "report/main"):
        assert line in res.stdout, line
    assert not (tmp_path / "demo").exists()          # a dry run writes nothing


def test_run_status_and_report_subcommands(tmp_path):
    res = run("run", "demo", "--dry-run", "--out", str(tmp_path), "--set", "steps=3", "--set", "seed=[1]")
    assert res.returncode == 0 and "wsp/from_mae" in res.stdout, res.stderr
    res = run("run", "demo", "--dry-run", "--set", "stepz=3")
    assert res.returncode == 2 and "--set stepz: no stage of demo has such a parameter" in res.stderr
    res = run("run", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "experiment file not found" in res.stderr
    res = run("status", str(tmp_path))
    assert res.returncode == 0 and "no stage runs found" in res.stdout
    res = run("status", str(tmp_path / "nope"))
    assert res.returncode == 2 and "no such folder" in res.stderr
    res = run("report", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("prepretrain: error: ")


def test_train_applies_the_stage_recipe(tmp_path, shapes_manifest):
    from prepretrain_lit.cli import main
    from prepretrain_lit.config import load_config
    out = tmp_path / "wsp"
    assert main(["train", "wsp", "--preset", "tiny", "--set", f"data.dataset={shapes_manifest}", "--set", "train.steps=2",
                 "--set", "data.num_workers=0", "--set", "data.batch_size=8", "--out", str(out)]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.stage == "wsp" and cfg.optim.betas == (0.9, 0.999) and cfg.head.global_pool is False
    assert (out / "model.pt").is_file()


def test_evaluate_writes_results_and_prints_the_summary(tmp_path, digits_manifests, capsys):
    from prepretrain_lit.cli import main
    train_m, test_m = digits_manifests
    assert main(["evaluate", "lowshot", "--preset", "tiny", "--set", f"data.dataset={train_m}", "--set",
                 f"eval.dataset={test_m}", "--set", "probe.shots=[1]", "--set", "probe.splits=2", "--set",
                 "eval.num_workers=0", "--out", str(tmp_path / "low")]) == 0
    assert '"top1@1shot"' in capsys.readouterr().out and (tmp_path / "low" / "results.json").is_file()
    assert main(["evaluate", "probe", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
