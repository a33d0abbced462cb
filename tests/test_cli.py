"""The `prepretrain` console script: version, config show/presets, env, demo, and user errors without tracebacks."""
import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prepretrain_lit.cli import main
from prepretrain_lit.presets import config_hash, load_config

from project import ROOT
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
    assert f"== experiment demo: 75 stage runs in {tmp_path.resolve() / 'demo'}" in res.stdout
    for line in ("mae/seed=0", "wsp/scratch,seed=2", "wsp/from_mae,seed=1", "knn/seed=2,init=mae", "knn_mae/seed=1", "knn_random/seed=2", "finetune/seed=0,init=mae",
                 "zeroshot/seed=0,init=scratch", "knn_shape_count_random/seed=1", "linear_probe_shape_count/seed=2,init=mae",
                 "linear_probe_shape_count_random/seed=0", "report/main"):
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
    from prepretrain_lit.presets import load_config
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


# -- errors that name what the user set ------------------------------------------------------------

def test_config_show_stage_shows_the_recipe_the_stage_uses():
    res = run("config", "show", "--preset", "vit_b16", "--stage", "finetune")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["stage"] == "finetune" and shown["optim"]["base_lr"] == 5e-4 and shown["optim"]["layer_decay"] == 0.65
    assert shown["head"]["mixup"] == 0.8 and shown["model"]["drop_path_rate"] == 0.1
    res = run("config", "show", "--preset", "vit_b16", "--set", "stage=finetune")   # a record, not the recipe
    assert res.returncode == 2 and "pass --stage finetune" in res.stderr


def test_train_suggests_a_stage_train_accepts():
    res = run("train", "mea", "--out", "/nonexistent/run")
    assert res.returncode == 2 and "did you mean 'mae'" in res.stderr and "lowshot" not in res.stderr.split(";")[0]
    res = run("train", "lowshot", "--out", "/nonexistent/run")
    assert res.returncode == 2 and "prepretrain evaluate lowshot" in res.stderr


def test_a_typo_in_eval_dataset_is_reported_as_eval_dataset(tmp_path):
    res = run("evaluate", "knn", "--preset", "tiny", "--set", "data.dataset=digits.yaml", "--set",
              "eval.dataset=digitz-test.yaml", "--out", str(tmp_path / "knn"))
    assert res.returncode == 2 and "eval.dataset='digitz-test.yaml' is not a manifest file" in res.stderr, res.stderr
    assert "data.dataset" not in res.stderr


def test_a_file_that_is_no_checkpoint_says_so(tmp_path, shapes_manifest):
    import torch
    torch.save({"model": {"w": torch.zeros(1)}, "make": print}, tmp_path / "pickled.pt")   # code, not only tensors
    for path, text in ((ROOT / "README.md", "not a checkpoint"), (tmp_path / "pickled.pt", "only weights are read")):
        res = run("train", "wsp", "--preset", "tiny", "--set", f"init.checkpoint={path}", "--set", f"data.dataset={shapes_manifest}",
                  "--set", "train.steps=1", "--set", "data.num_workers=0", "--out", str(tmp_path / path.stem))
        assert res.returncode == 2 and text in res.stderr, res.stderr
        assert "weights_only=False" not in res.stderr and "Traceback" not in res.stderr


def test_dry_run_piped_into_head_ends_quietly(tmp_path):
    res = subprocess.run(f"'{PRETRAIN}' demo --dry-run --out '{tmp_path}' | head -1", shell=True, capture_output=True,
                         text=True, timeout=300)
    assert res.stdout.startswith("== experiment demo") and "BrokenPipeError" not in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr


def test_a_missing_shard_is_found_at_the_start(tmp_path, shapes_manifest):
    m = yaml.safe_load(Path(shapes_manifest).read_text())
    shards = m["shards"] if isinstance(m["shards"], list) else [m["shards"]]
    m["shards"] = [str(tmp_path / "gone-000000.tar"), *(str(Path(shapes_manifest).parent / s) for s in shards)]
    m["shard_samples"] = [10, *m["shard_samples"]]
    m["num_samples"] += 10
    m.pop("sha256", None)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(m))
    res = run("train", "mae", "--preset", "tiny", "--set", f"data.dataset={path}", "--set", "train.steps=1",
              "--set", "data.num_workers=1", "--out", str(tmp_path / "mae"))
    assert res.returncode == 2 and "1 shard file(s) missing" in res.stderr and "gone-000000.tar" in res.stderr, res.stderr
    assert "DataLoader worker" not in res.stderr and "Traceback" not in res.stderr


# -- the documented commands run -------------------------------------------------------------------

def documented_commands(path: Path) -> list[tuple[str, bool]]:
    "(command, shown as an error) for each `prepretrain` line in the code blocks of markdown file `path`."
    import re
    blocks, block, inside = [], [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if inside: blocks.append(block)
            block, inside = [], not inside
        elif inside: block.append(line)
    out = []
    for block in blocks:
        lines = "\n".join(block).replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            shown = line.startswith("$ ")
            text = re.sub(r"^(\$ )?(\.venv/bin/)?", "", re.sub(r"\s+#\s.*$", "", line).strip())
            if text.startswith("prepretrain "):
                out.append((text, shown and i + 1 < len(lines) and lines[i + 1].startswith("prepretrain: error")))
    return out


def tiny_form(command: str, tmp: Path, example: Path) -> list[str] | None:
    """`command`'s arguments made dry or tiny: experiments dry-run into `tmp` (template manifests swapped for the
    built-in shapes, as experiments/README.md's tiny mode does), training a few steps, status/report on `example`."""
    import shlex
    from prepretrain_lit.manifest import TEMPLATE_MARK
    from prepretrain_lit.data import shipped_manifest
    from prepretrain_lit.pipeline_spec import load_experiment
    if "..." in command: return None                                   # a placeholder, not a command
    def relocate(arg: str) -> str:
        key, sep, value = arg.rpartition("=")
        return key + sep + (str(tmp / value.lstrip("/")) if value.startswith(("data/", "runs/", "/tmp/runs")) else value)
    args = [relocate(a) for a in shlex.split(command)[1:]]
    if args[0] == "--stage-module":                                    # a global option: keep it, shrink the command
        rest = tiny_form(shlex.join(["prepretrain", *args[2:]]), tmp, example)
        return None if rest is None else args[:2] + rest
    if args[0] == "run":
        extra = ["--dry-run", "--out", str(tmp / "runs")]
        for name, stage in load_experiment(args[1]).stages.items():
            manifest = stage.params.get("manifest")
            if stage.notebook == "shards" and manifest and TEMPLATE_MARK in shipped_manifest(manifest).read_text():
                extra += ["--set", f"{name}.manifest=shapes", "--set", f"{name}.name={manifest}"]
        return args + extra
    if args[0] in ("status", "report"): return [args[0], str(example)]
    if args[:2] == ["shards", "build"]: return args + ["--num-samples", "64"]
    if args[0] == "train": return args + ["--set", "train.steps=2", "--set", "data.num_workers=0", "--set", "data.batch_size=8"]
    return args


@pytest.mark.slow
def test_the_documented_commands_run(tmp_path, monkeypatch, capsys):
    "Every `prepretrain` command of README.md and experiments/README.md, in order, dry or tiny: rc 0 (2 where shown failing)."
    from prepretrain_lit._fixtures import example_runs
    monkeypatch.chdir(ROOT)
    for var in ("PREPRETRAIN_STAGE_MODULES", "PYTHONPATH"):           # `--stage-module` sets them: undone at the end
        monkeypatch.setenv(var, os.environ.get(var, ""))
    example = example_runs(tmp_path / "example")
    commands = documented_commands(ROOT / "README.md") + documented_commands(ROOT / "experiments" / "README.md")
    assert any("seed=[0]" in c for c, _ in commands) and any(c.startswith("prepretrain train") for c, _ in commands)
    ran = []
    for command, fails in commands:
        args = tiny_form(command, tmp_path, example)
        if args is None or args in ran: continue                        # the same command shown twice runs once
        status = main(args)
        err = capsys.readouterr().err
        assert status == (2 if fails else 0), (command, args, err[-2000:])
        ran.append(args)
        if "seed=[" in command:     # once for real, its first stage: a grid value must not reach a notebook as a list
            real = [a for a in args if a != "--dry-run"] + ["--only", "shapes", "--set", "shapes.num_samples=32", "--quiet"]
            assert main(real) == 0, capsys.readouterr()
    assert len(ran) >= 12


@pytest.mark.parametrize("override", ["optim.base_lr=nan", "optim.lr=inf", "optim.clip_grad=nan", "optim.weight_decay=inf",
                                      "optim.betas=[0.9, nan]"])
def test_a_value_that_is_not_finite_is_refused_before_the_run_folder_exists(tmp_path, override, capsys):
    assert main(["train", "mae", "--preset", "tiny", "--set", override, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "must be a finite number" in err and override.split("=")[0] in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
