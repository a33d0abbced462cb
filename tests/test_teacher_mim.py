"""The teacher-feature objective (nbs/05b_teacher_mim.ipynb) is a stage through the registry alone.

Its chapter registers `teacher_mim` with one `register_stage` call and the package finds the chapter by its entry point
(settings.ini's `stage_modules`). These tests run it as a user does: `prepretrain train teacher_mim`, `export`,
`status`, `prepretrain run` of an experiment (papermill, nbs/stages/teacher_mim.ipynb) and `report`; and check in one
process that the teacher stays frozen through the trainer (no gradient, eval mode, outside the optimiser and model.pt).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from project import ROOT
PRETRAIN = Path(sys.executable).parent / "prepretrain"
TINY = ["--preset", "tiny", "--set", "data.dataset=synthetic", "--set", "data.batch_size=8"]


def cli(*args: str) -> subprocess.CompletedProcess:
    "The installed console script, as a user runs it: no stage module named, the entry point finds the chapter."
    env = {k: v for k, v in os.environ.items() if k != "PREPRETRAIN_STAGE_MODULES"}
    return subprocess.run([str(PRETRAIN), *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    "A teacher the project trained: 2 steps of MAE on synthetic images, a run folder with config.yaml and model.pt."
    out = tmp_path_factory.mktemp("teacher") / "mae-teacher"
    res = cli("train", "mae", *TINY, "--set", "train.steps=2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def test_the_stage_comes_from_its_chapter_through_the_entry_point():
    res = cli("train", "--help")
    assert res.returncode == 0 and "teacher_mim" in res.stdout, res.stdout
    from prepretrain_lit.registry import stage_spec
    spec = stage_spec("teacher_mim")
    assert spec.module == "prepretrain_lit.teacher_mim" and spec.role == "pretrain" and spec.section[0] == "teacher"


def test_prepretrain_train_teacher_mim_then_export_and_status(teacher_run, tmp_path):
    out = tmp_path / "student"
    res = cli("train", "teacher_mim", *TINY, "--set", "train.steps=3", "--set", f"teacher.checkpoint={teacher_run}",
              "--set", "teacher.layer=2", "--set", "teacher.loss=cosine", "--out", str(out))
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stage"] == "teacher_mim" and saved["teacher"]["layer"] == 2 and saved["teacher"]["loss"] == "cosine"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records[-1]["step"] == 3 and "target_cosine" in records[-1]

    from prepretrain_lit.presets import load_config
    from prepretrain_lit.vit import vit_from_config
    trunk_keys = set(vit_from_config(load_config(preset="tiny").model).state_dict())
    model = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("teacher") for k in model)                      # the teacher is not saved
    assert {k for k in model if not k.startswith(("decoder_", "mask_token"))} == trunk_keys
    assert model["decoder_pred.weight"].shape[0] == 64                           # one teacher feature (64 wide) a patch

    res = cli("export", str(out), "--to", "safetensors")
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file
    trunk = load_file(str(out / "export-safetensors" / "trunk.safetensors"))
    vit_from_config(load_config(preset="tiny").model).load_state_dict(trunk, strict=True)   # exactly a ViT trunk

    status = cli("status", str(out))
    assert status.returncode == 0, status.stderr
    assert any("complete" in line and "teacher_mim" in line for line in status.stdout.splitlines()), status.stdout


def test_a_missing_or_mismatched_teacher_is_one_line(teacher_run, tmp_path, capsys):
    from prepretrain_lit.cli import main                     # in this process: the same code path, no start-up per case
    cases = [([], "teacher.checkpoint is not set"),
             (["--set", f"teacher.checkpoint={tmp_path / 'nowhere'}"], "no such file or folder"),
             (["--set", f"teacher.checkpoint={teacher_run}", "--set", "model.img_size=64"], "patch grid is 8x8")]
    for i, (extra, expected) in enumerate(cases):
        code = main(["train", "teacher_mim", *TINY, "--set", "train.steps=1", *extra, "--out", str(tmp_path / f"x{i}")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err, (extra, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_teacher_stays_frozen_through_the_trainer(tmp_path):
    from prepretrain_lit.presets import load_config, save_config
    from prepretrain_lit.objectives import classifier_from_config
    from prepretrain_lit.teacher_mim import teacher_mim_objective
    from prepretrain_lit.trainer import SyntheticImages, Trainer
    wsp_cfg = load_config(preset="tiny", stage="wsp")                            # a WSP run folder, as the stage leaves it
    folder = tmp_path / "wsp"; folder.mkdir()
    save_config(wsp_cfg, folder / "config.yaml")
    torch.save({"model": classifier_from_config(wsp_cfg.model, 24, global_pool=False).state_dict()}, folder / "model.pt")

    cfg = load_config(preset="tiny", stage="teacher_mim", overrides=[
        "data.dataset=synthetic", "data.batch_size=8", "train.steps=3", f"teacher.checkpoint={folder}"])
    objective = teacher_mim_objective(cfg)
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in objective.model.state_dict().items()}
    trainer = Trainer(cfg, objective, SyntheticImages(8, 32, 64, 0), tmp_path / "run", progress=False)
    trainer.fit()
    assert all(torch.equal(v, objective.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert any(not torch.equal(v, objective.model.state_dict()[k]) for k, v in student_before.items())
    assert not objective.teacher.training and objective.model.training
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in objective.teacher.parameters()}
    assert optimised == {id(p) for p in objective.model.parameters() if p.requires_grad}
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    assert saved.keys() == objective.model.state_dict().keys()


def test_the_stage_notebook_declares_its_teacher():
    from prepretrain_lit.pipeline_stage import notebook_parameters
    params = notebook_parameters(ROOT / "nbs" / "stages" / "teacher_mim.ipynb")
    assert {"teacher", "out_dir", "dataset", "steps", "seed", "overrides"} <= set(params)


@pytest.mark.slow
def test_an_experiment_runs_teacher_mim_with_status_and_report(tmp_path, digits_manifests):
    train, test = digits_manifests
    judge = {"dataset": str(train), "eval_dataset": str(test), "batch_size": 64}
    experiment = {
        "name": "targets", "defaults": {"preset": "tiny"},
        "stages": {
            "teacher": {"notebook": "mae", "params": {"steps": 2, "batch_size": 8}},
            "student": {"notebook": "teacher_mim", "inputs": {"teacher": "teacher"},
                        "params": {"steps": 2, "batch_size": 8, "overrides": ["teacher.layer=3"]}},
            "judge": {"notebook": "knn", "inputs": {"init_checkpoint": "student/model.pt"}, "params": judge}}}
    path = tmp_path / "targets.yaml"
    path.write_text(yaml.safe_dump(experiment))
    res = cli("run", str(path), "--out", str(tmp_path / "runs"), "--quiet")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    folder = tmp_path / "runs" / "targets"
    student = folder / "student" / "main"
    assert (student / "model.pt").is_file() and (folder / "judge" / "main" / "results.json").is_file()
    saved = yaml.safe_load((student / "config.yaml").read_text())
    assert saved["teacher"]["checkpoint"] == str(folder / "teacher" / "main") and saved["teacher"]["layer"] == 3

    status = cli("status", str(folder))
    assert status.returncode == 0, status.stderr
    assert any("student" in line and "complete" in line and "teacher_mim" in line for line in status.stdout.splitlines()), status.stdout

    report = cli("report", str(folder), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    knn_rows = [line for line in report.stdout.splitlines() if line.startswith("knn")]
    trunk_rows = [line for line in knn_rows if " pixels " not in line]            # the raw-pixel arm stands beside it
    assert trunk_rows and all("teacher-feature MIM" in line for line in trunk_rows), report.stdout


def test_a_teacher_written_relative_or_absolute_is_one_run(tmp_path, monkeypatch):
    "`teacher.checkpoint` is a path key of the stage (`StageSpec.path_keys`): the same file gives the same identity."
    from prepretrain_lit.presets import config_hash, load_config
    (tmp_path / "wsp").mkdir()
    monkeypatch.chdir(tmp_path)
    cfgs = [load_config(preset="tiny", stage="teacher_mim", overrides=[f"teacher.checkpoint={p}"])
            for p in ("wsp", str(tmp_path / "wsp"), "./wsp/")]
    assert len({config_hash(c) for c in cfgs}) == 1
    other = load_config(preset="tiny", stage="teacher_mim", overrides=[f"teacher.checkpoint={tmp_path}"])
    assert config_hash(other) != config_hash(cfgs[0])
